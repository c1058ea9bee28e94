"""The deployment benchmarks: what one trained checkpoint costs to sweep and to serve.

4. ``sweep_vs_loop``: one ``make_sweep`` call over LeNet rank settings against
   full-rank evaluations and the naive slice-and-re-jit loop, cold and steady.
5. ``export_latency``: exported (sliced, merged) models at rank fractions
   against the dense twin, batch 1 and 128.

Numbers are the suite's (see :mod:`benchmarks.suite`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import maestro_jax
from maestro_jax import data as data_lib
from maestro_jax import export as export_lib
from maestro_jax import sweep as sweep_lib
from maestro_jax import training
from maestro_train import layout

from benchmarks import timing
from benchmarks.common import MNIST_SHAPE, Settings, build, fraction_ranks, random_batch, rounded, section


# ------------------------------------------------------------------------------------- 4. sweep vs loop


def _eval_arrays(n: int) -> tuple[np.ndarray, np.ndarray, str]:
  """``n`` MNIST test images and labels (offline IDX files), or synthetic MNIST-shaped data."""
  idx_dir = layout.find_idx_dir("mnist")
  if idx_dir is not None:
    source = data_lib.load("mnist", "test", idx_dir=idx_dir)
    images, labels = source.take(np.arange(min(n, len(source))))
    return images, labels, f"MNIST test set, first {len(labels)} images (IDX files in shared/data/{Path(idx_dir).name})"
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, size=(n, *MNIST_SHAPE), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.int32),
          f"synthetic MNIST-shaped data, {n} images (no offline MNIST found)")


def _device_batches(images, labels, batch_size: int) -> list[dict[str, jax.Array]]:
  source = data_lib.Source.from_arrays(images, labels, name="mnist", split="test", num_classes=10,
                                       mean=(0.1307,), std=(0.3081,))
  return [{k: jnp.asarray(v) for k, v in b.items() if k in ("image", "label", "mask")}
          for b in data_lib.batches(source, batch_size, train=False)]


def _sweep_timings(s: Settings, examples: int, cold_rounds: int, steady_rounds: int) -> dict[str, Any]:
  """Cold and steady times of the sweep, K full-rank evaluations and the naive loop on ``examples`` images."""
  images, labels, described = _eval_arrays(examples)
  batches = _device_batches(images, labels, s.sweep_batch)
  fmodel, params, model_state = build("lenet5", MNIST_SHAPE, factorized=True)
  caps = maestro_jax.capacities(params)
  k = s.sweep_configs
  stacked = sweep_lib.fraction_grid(caps, [(i + 1) / k for i in range(k)])
  configs = sweep_lib.unstack(stacked)

  def run_sweep(fn):
    return sweep_lib.sweep(fmodel, params, model_state, batches, stacked, sweep_fn=fn)

  def run_full(eval_step):
    return [training.evaluate(eval_step, params, model_state, batches) for _ in range(k)]

  last: dict[str, Any] = {}  # The compiled functions of the last cold round, reused for the steady state.

  def sweep_cold():
    last["sweep"] = sweep_lib.make_sweep(fmodel)
    return run_sweep(last["sweep"])

  def full_cold():
    last["eval_step"] = training.make_eval_step(fmodel)
    return run_full(last["eval_step"])

  def naive_cold():
    pairs, results = [], []
    for config in configs:
      sliced, _, _ = maestro_jax.shrink(params, config)
      pairs.append((training.make_eval_step(fmodel), sliced))
      results.append(training.evaluate(pairs[-1][0], sliced, model_state, batches))
    last["naive"] = pairs
    return results

  cold_fns = {"sweep": sweep_cold, "full_rank_evals": full_cold, "naive_loop": naive_cold}
  cold: dict[str, list[float]] = {name: [] for name in cold_fns}
  names = list(cold_fns)
  for r in range(cold_rounds):
    shift = (r - cold_rounds + 1) % len(names)  # The last round runs the naive loop last.
    for name in names[shift:] + names[:shift]:
      jax.clear_caches()
      cold[name].append(timing.wall(cold_fns[name]))

  sweep_fn, eval_step, prepared = last["sweep"], last["eval_step"], last["naive"]

  def naive_steady():
    return [training.evaluate(step, sliced, model_state, batches) for step, sliced in prepared]

  steady = timing.interleaved({"full_rank_evals": lambda: run_full(eval_step), "sweep": lambda: run_sweep(sweep_fn),
                               "naive_loop": naive_steady}, rounds=steady_rounds, warmup=1)
  swept = run_sweep(sweep_fn)
  looped = naive_steady()
  agree = float(np.max(np.abs(swept["accuracy"] - np.asarray([r["accuracy"] for r in looped]))))
  return {"cold": cold, "steady": steady, "described": described, "agree": agree, "examples": len(labels)}


def bench_sweep_vs_loop(s: Settings) -> dict[str, Any]:
  """One make_sweep call over K LeNet rank settings vs K full-rank evaluations vs the naive re-jit loop."""
  k = s.sweep_configs
  out = section(f"Sweep of {k} LeNet rank settings vs per-configuration loops",
                 f"{k} full-rank evaluations (one compiled eval step) / the naive slice-and-re-jit loop",
                 ["eval images", "what", "cold s (compile incl.)", "steady s", "cold ratio", "steady ratio"])
  out["requirements"] = {}
  described = []
  for examples, cold_rounds, steady_rounds in s.sweep_sizes:
    t = _sweep_timings(s, examples, cold_rounds, steady_rounds)
    cold, steady, n = t["cold"], t["steady"], t["examples"]
    described.append(t["described"])
    ratios = {
        "sweep_vs_full_rank_evals_steady": timing.paired_ratio(steady, "sweep", "full_rank_evals"),
        "sweep_vs_full_rank_evals_cold": timing.paired_ratio(cold, "sweep", "full_rank_evals"),
        "naive_loop_vs_sweep_cold": timing.paired_ratio(cold, "naive_loop", "sweep"),
        "naive_loop_vs_sweep_steady": timing.paired_ratio(steady, "naive_loop", "sweep"),
    }
    out["ratios"].update({f"n{n}/{key}": rounded(v) for key, v in ratios.items()})
    out["requirements"].update({
        f"{n} images: sweep within 1.3x of {k} full-rank evaluations (steady)":
            ratios["sweep_vs_full_rank_evals_steady"] <= 1.3,
        f"{n} images: sweep at least 5x faster than the naive loop (compile incl.)":
            ratios["naive_loop_vs_sweep_cold"] >= 5.0,
    })
    for name, label in (("sweep", "make_sweep, one call, K stacked settings"),
                        ("full_rank_evals", f"{k} full-rank evaluations, one eval step"),
                        ("naive_loop", "naive loop: shrink + new jit per setting")):
      out["rows"].append([n, label, round(timing.median(cold[name]), 3), round(timing.median(steady[name]), 3),
                          rounded(timing.paired_ratio(cold, name, "sweep")),
                          rounded(timing.paired_ratio(steady, name, "sweep"))])
    out["notes"].append(f"{n} images: {cold_rounds} cold round(s), {steady_rounds} steady round(s); the sweep's "
                        f"accuracies match the naive loop's to {t['agree']:.2g} (max abs difference).")
  out["notes"] += [
      f"Eval set: {'; '.join(dict.fromkeys(described))}; batches of {s.sweep_batch}; LeNet-5 at initialization "
      f"(timing does not depend on the weights); settings: every layer at ceil(p * rank), p = 1/{k} .. {k}/{k}.",
      "Ratios in the table are against the sweep (sweep = 1). Cold: jax.clear_caches() before each run, so every "
      "jitted function compiles (the naive loop compiles once per setting, the sweep once); steady: the same "
      "functions already compiled, interleaved rounds, median of paired ratios.",
      "Requirements: " + "; ".join(f"{key}: {'met' if ok else 'NOT met'}"
                                   for key, ok in out["requirements"].items()) + ".",
  ]
  return out


# ------------------------------------------------------------------------------------ 5. export latency


MEASURED_FRACTIONS = (1.0, 0.5, 0.25)


def _program(fn, *args) -> str:
  """The optimized HLO instructions of ``fn(*args)``, without names and metadata (to compare programs)."""
  text = re.sub(r", metadata=\{[^}]*\}", "", fn.lower(*args).compile().as_text())
  text = re.sub(r"%[\w.\-]+", "%", text)
  return "\n".join(line.strip() for line in text.splitlines() if re.match(r"\s*(ROOT )?% = ", line))


def bench_export_latency(s: Settings) -> dict[str, Any]:
  """Inference latency of exported models at rank fractions vs the dense twin."""
  out = section("Exported-model inference latency vs dense",
                 "dense twin (factorized=False) forward pass, same batch",
                 ["model", "batch", "rank fraction", "merged layers", "median us", "time ratio", "FLOP ratio",
                  "dense twin's program"])
  fractions = (1.0, 0.5, 0.25, 0.1)
  for name in s.aux_models:
    dense_fm, dense_params, dense_state = build(name, MNIST_SHAPE, factorized=False)
    fmodel, params, model_state = build(name, MNIST_SHAPE, factorized=True)
    exported = {}
    for fraction in fractions:
      efm, eparams, estate = export_lib.export_functional(fmodel, params, model_state,
                                                          fraction_ranks(params, fraction), merge="auto")
      forms = export_lib.layer_forms(eparams)
      merged = sum(f["form"] == "dense" for f in forms.values())
      exported[fraction] = (efm, eparams, estate, f"{merged}/{len(forms)}")
    module = fmodel.to_module(params, model_state)
    for batch, inner in s.export_inner:
      x = random_batch(MNIST_SHAPE, batch)["image"]
      fns, flops = {}, {}
      measured = {}
      for fraction in MEASURED_FRACTIONS:
        # Merged layers chosen by timing each layer, then the whole model, at this batch (export.dense_by_latency).
        ranks = fraction_ranks(params, fraction)
        dense_layers = export_lib.dense_by_latency(module, MNIST_SHAPE, ranks, batch_size=batch,
                                                   repeats=s.export_rounds, whole_model=True)
        efm, eparams, estate = export_lib.export_functional(fmodel, params, model_state, ranks, merge="none",
                                                            dense=dense_layers)
        measured[f"{fraction}/measured"] = (efm, eparams, estate,
                                            f"{len(dense_layers)}/{len(export_lib.layer_forms(eparams))}")

      programs = {}

      def forward(fm, p, st, x):
        fn = jax.jit(lambda p, st, x: fm.apply(p, st, x)[0])
        flops_, _ = timing.compile_stats(fn, p, st, x)
        return (lambda: fn(p, st, x)), flops_, _program(fn, p, st, x)

      fns["dense"], flops["dense"], programs["dense"] = forward(dense_fm, dense_params, dense_state, x)
      for fraction, (efm, eparams, estate, _) in {**exported, **measured}.items():
        fns[fraction], flops[fraction], programs[fraction] = forward(efm, eparams, estate, x)
      times = timing.interleaved(fns, rounds=s.export_rounds, inner=inner, warmup=2)
      out["rows"].append([name, batch, "dense", "-", round(1e6 * timing.median(times["dense"]), 1), 1.0, 1.0, "-"])
      for fraction in [*fractions, *measured]:
        ratio = timing.paired_ratio(times, fraction, "dense")
        out["rows"].append([name, batch, fraction, {**exported, **measured}[fraction][3],
                            round(1e6 * timing.median(times[fraction]), 1), rounded(ratio),
                            rounded(flops[fraction] / flops["dense"]),
                            "same" if programs[fraction] == programs["dense"] else "differs"])
        out["ratios"][f"{name}/batch_{batch}/fraction_{fraction}/time_vs_dense"] = rounded(ratio)
        out["ratios"][f"{name}/batch_{batch}/fraction_{fraction}/flops_vs_dense"] = rounded(
            flops[fraction] / flops["dense"])
  out["notes"] += [
      "Exported with maestro_jax.export.export_functional(..., merge='auto'): factors cut to ceil(p * rank), a "
      "layer merged into one dense kernel when (d_in + d_out) r >= d_in d_out ('merged layers' column).",
      "Latency of one jitted forward call, blocked on; at batch 1 it is dominated by dispatch overhead.",
      "'p/measured': layers merged where export.dense_by_latency timed the dense kernel at least as fast as the "
      "factors at that rank and batch (the size rule where a layer cannot be timed), then every layer merged "
      "where the whole model timed faster so (whole_model=True, off by default: it may give up the size saving).",
      "dense twin's program: 'same' where the export compiles to the dense twin's optimized program (HLO "
      "instructions equal up to names and metadata), so its time ratio is 1 by construction and its distance "
      "from 1 is timing noise.",
  ]
  return out
