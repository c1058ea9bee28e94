"""The benchmark suite: seven measurements, each a ratio against a baseline timed in the same process.

1. ``train_step_vs_dense``: the Maestro train step (factorized layers, sampled
   keep counts, group lasso) against the same network built from plain
   ``nnx.Linear``/``nnx.Conv`` (``factorized=False``), at full rank and with
   every layer shrunk to 25% of its rank, with XLA's FLOP ratio beside it.
2. ``ordered_dropout_overhead``: the step with the ``single_layer`` sampler
   against the same step with keep = capacity (sampler ``none``).
3. ``compile_count``: compilations of the train step over a real run of
   ``train.train.train_and_evaluate`` on digits, for several rank quanta,
   against ``1 + capacity-changing shrink events``.
4. ``sweep_vs_loop``: one ``make_sweep`` call over 16 LeNet rank settings
   against 16 full-rank evaluations and against the naive loop that slices and
   re-jits a model per setting; cold (compilation included) and steady state.
5. ``export_latency``: inference latency of exported (sliced, merged) models at
   several rank fractions against the dense twin, batch 1 and 128.
6. ``freezing``: the train step with factor ``a`` (or ``b``) of every layer
   frozen against no freezing.
7. ``end_to_end``: LeNet/MNIST epochs with the real runner (full mode); set
   beside the official PyTorch code's reference figure on a 2-core CPU (not re-measured).

``python -m benchmarks`` runs the full suite; ``--small`` a quick version for
CI (same code, smaller shapes and fewer repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import maestro_jax
from maestro_jax import data as data_lib
from maestro_jax import export as export_lib
from maestro_jax import models
from maestro_jax import sweep as sweep_lib
from maestro_jax import training
from maestro_jax._src import shrink as shrink_lib

from benchmarks import markdown
from benchmarks import timing

PACKAGE_DIR = Path(__file__).resolve().parent
MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
PYTORCH_REFERENCE_2_EPOCHS_S = 44.0
PYTORCH_REFERENCE_10_EPOCHS_S = 194.0
LASSO = 1e-4


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes and repeats of one mode of the suite.

  Attributes:
    mode: ``'small'`` or ``'full'``.
    batch: MNIST-shape training batch.
    rounds: timed rounds of the MNIST-shape step benchmarks.
    inner: steps per function per round.
    big_models: also time VGG-19 and ResNet-18 at CIFAR shapes.
    big_width: their first-stage width (64 is the real network).
    big_batch: their batch.
    big_rounds: timed rounds for them.
    sweep_sizes: eval-set sizes of the sweep benchmark, each ``(examples,
      cold (cache-cleared) rounds, steady-state rounds)``.
    sweep_batch: evaluation batch of the sweep benchmark.
    sweep_configs: rank settings swept.
    export_rounds: rounds of the latency benchmark.
    export_inner: ``{batch: calls per round}``.
    compile_epochs: epochs of the compile-count runs.
    compile_hidden: hidden widths of their MLP.
    compile_quanta: rank quanta tried.
    aux_models: models of the ordered-dropout and freezing benchmarks.
    e2e_full: run real LeNet/MNIST for 2 epochs (else a subset).
  """

  mode: str
  batch: int = 128
  rounds: int = 15
  inner: int = 5
  big_models: bool = True
  big_width: int = 16
  big_batch: int = 32
  big_rounds: int = 5
  sweep_sizes: tuple = ((2000, 3, 5), (10000, 1, 2))
  sweep_batch: int = 1000
  sweep_configs: int = 16
  export_rounds: int = 15
  export_inner: tuple = ((1, 50), (128, 10))
  compile_epochs: int = 6
  compile_hidden: tuple = (256, 256)
  compile_quanta: tuple = (1, 8, 64)
  aux_models: tuple = ("mlp", "lenet5")
  e2e_full: bool = True


FULL = Settings(mode="full")
SMALL = Settings(mode="small", rounds=3, inner=2, big_models=False, sweep_sizes=((512, 1, 2),), sweep_batch=256,
                 export_rounds=3, export_inner=((1, 5), (128, 2)),
                 compile_epochs=3, compile_hidden=(32,), compile_quanta=(1, 8), aux_models=("mlp",),
                 e2e_full=False)


# ------------------------------------------------------------------------------------------- helpers


def _build(name: str, image_shape, *, factorized: bool, seed: int = 0, **kwargs):
  """``(FunctionalModel, params, model_state)`` of a reference model."""
  model = models.make_model(name, num_classes=10, image_shape=image_shape, factorized=factorized,
                            rngs=nnx.Rngs(seed), **kwargs)
  return training.FunctionalModel.from_module(model)


def _optimizer() -> optax.GradientTransformation:
  """The paper's LeNet optimizer: SGD momentum 0.9, coupled weight decay 1e-4, lr 0.01."""
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))


def _batch(image_shape, batch: int, seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(batch, *image_shape)).astype(np.float32)),
          "label": jnp.asarray(rng.integers(0, 10, size=(batch,)).astype(np.int32))}


def _fraction_ranks(params, fraction: float) -> dict[str, int]:
  """``ceil(fraction * capacity)`` (at least 1) per factorized layer."""
  return {name: max(1, math.ceil(round(fraction * cap, 6))) for name, cap in maestro_jax.capacities(params).items()}


def _stepper(fmodel, params, model_state, optimizer, batch, *, sampler, lasso: float):
  """A compiled, ready-to-time train step: ``(Stepper, flops, compile seconds)``."""
  # A private copy: the step donates its state, and variants may share leaves (e.g. biases shrink leaves alone).
  state = jax.tree.map(jnp.copy, training.init_state(params, model_state, optimizer))
  step = training.make_train_step(fmodel, optimizer, sampler=sampler, lasso=lasso)
  flops, seconds = timing.compile_stats(step, state, batch, jax.random.key(0))
  return timing.Stepper(step, state, batch, jax.random.key(1)), flops, seconds


def _ms(seconds: float) -> float:
  return round(1e3 * seconds, 4)


def _r(x: float) -> float:
  return round(float(x), 4)


class _FrozenGradients:
  """A FunctionalModel view whose apply stops gradients at frozen factors (``stop_frozen_gradients``)."""

  def __init__(self, model: training.FunctionalModel, mask):
    self.model, self.mask = model, mask

  def apply(self, params, model_state, x, keeps=None, *, train: bool = False):
    return self.model.apply(maestro_jax.stop_frozen_gradients(params, self.mask), model_state, x, keeps,
                            train=train)


def _section(title: str, baseline: str, columns: list[str]) -> dict[str, Any]:
  return {"title": title, "baseline": baseline, "columns": columns, "rows": [], "ratios": {}, "notes": []}


# ------------------------------------------------------------------------- 1. train step vs dense


def _step_models(s: Settings) -> list[dict[str, Any]]:
  specs = [dict(name="mlp", shape=MNIST_SHAPE, batch=s.batch, kwargs={}, rounds=s.rounds, inner=s.inner),
           dict(name="lenet5", shape=MNIST_SHAPE, batch=s.batch, kwargs={}, rounds=s.rounds, inner=s.inner)]
  if s.big_models:
    for name in ("vgg19", "resnet18"):
      specs.append(dict(name=name, shape=CIFAR_SHAPE, batch=s.big_batch, kwargs={"width": s.big_width},
                        rounds=s.big_rounds, inner=1))
  return specs


def bench_train_step_vs_dense(s: Settings) -> dict[str, Any]:
  """Train-step time and FLOPs of the Maestro model vs its dense twin, full rank and shrunk to 25%."""
  out = _section("Train step: Maestro vs the same net from flax Dense/Conv",
                 "dense twin (factorized=False), same optimizer, same batch",
                 ["model", "batch", "variant", "median ms/step", "time ratio", "FLOP ratio", "compile s"])
  opt = _optimizer()
  for spec in _step_models(s):
    name, shape, batch = spec["name"], spec["shape"], spec["batch"]
    data = _batch(shape, batch)
    dense = _build(name, shape, factorized=False, **spec["kwargs"])
    fmodel, params, model_state = _build(name, shape, factorized=True, **spec["kwargs"])
    # The same model forced onto the two-factor path everywhere (the only path before per-layer choice).
    factors_model, _, _ = _build(name, shape, factorized=True, compute_path="factors", **spec["kwargs"])
    shrunk, _, _ = maestro_jax.shrink(params, _fraction_ranks(params, 0.25))
    sampler = maestro_jax.samplers.single_layer()
    variants = {
        "dense": _stepper(*dense, opt, data, sampler=maestro_jax.samplers.none(), lasso=0.0),
        "maestro_full_rank": _stepper(fmodel, params, model_state, opt, data, sampler=sampler, lasso=LASSO),
        "maestro_shrunk_25": _stepper(fmodel, shrunk, model_state, opt, data, sampler=sampler, lasso=LASSO),
        "factors_full_rank": _stepper(factors_model, params, model_state, opt, data, sampler=sampler, lasso=LASSO),
        "factors_shrunk_25": _stepper(factors_model, shrunk, model_state, opt, data, sampler=sampler, lasso=LASSO),
    }
    times = timing.interleaved({k: v[0] for k, v in variants.items()}, rounds=spec["rounds"], inner=spec["inner"])
    base_flops = variants["dense"][1]
    for variant, (_, flops, compile_s) in variants.items():
      ratio = timing.paired_ratio(times, variant, "dense")
      flop_ratio = flops / base_flops
      out["rows"].append([name, batch, variant, _ms(timing.median(times[variant])), _r(ratio), _r(flop_ratio),
                          round(compile_s, 2)])
      if variant != "dense":
        out["ratios"][f"{name}/{variant}/time_vs_dense"] = _r(ratio)
        out["ratios"][f"{name}/{variant}/flops_vs_dense"] = _r(flop_ratio)
    out["ratios"][f"{name}/shrunk_25_vs_full_rank_time"] = _r(
        timing.paired_ratio(times, "maestro_shrunk_25", "maestro_full_rank"))
  out["notes"] += [
      "Maestro step = factorized layers with a traced keep-count mask, the single_layer sampler and the group "
      f"lasso (lambda {LASSO}); the dense twin has neither.",
      "maestro_*: compute_path 'auto' (each layer runs the cheaper of the two-factor apply and the formed kernel "
      "A diag(mask) B, chosen from shapes); factors_*: the same step with compute_path 'factors' everywhere.",
      "maestro_shrunk_25: every layer cut (maestro_jax.shrink) to ceil(0.25 * capacity) components, a fresh "
      "optimizer state.",
      "FLOP ratio: XLA cost analysis of the compiled steps (Compiled.cost_analysis()['flops']).",
  ]
  if s.big_models:
    out["notes"].append(f"VGG-19 and ResNet-18 at CIFAR shapes (32x32x3) are reduced for a CPU: width {s.big_width} "
                        f"(1/{64 // s.big_width} of the real 64) and batch {s.big_batch}.")
  return out


# ------------------------------------------------------------------------ 2. ordered dropout overhead


def bench_ordered_dropout_overhead(s: Settings) -> dict[str, Any]:
  """The sampled step (single_layer) vs the same step at keep = capacity (sampler none)."""
  out = _section("Ordered-dropout overhead: sampled keep counts vs keep = capacity",
                 "same factorized step with sampler 'none' (keep = capacity, mask still applied)",
                 ["model", "sampler", "median ms/step", "time ratio", "FLOP ratio"])
  opt = _optimizer()
  for name in s.aux_models:
    data = _batch(MNIST_SHAPE, s.batch)
    fmodel, params, model_state = _build(name, MNIST_SHAPE, factorized=True)
    variants = {sampler: _stepper(fmodel, params, model_state, opt, data, sampler=maestro_jax.make_sampler(sampler),
                                  lasso=LASSO) for sampler in ("none", "single_layer")}
    times = timing.interleaved({k: v[0] for k, v in variants.items()}, rounds=s.rounds, inner=s.inner)
    for sampler, (_, flops, _) in variants.items():
      ratio = timing.paired_ratio(times, sampler, "none")
      flop_ratio = flops / variants["none"][1]
      out["rows"].append([name, sampler, _ms(timing.median(times[sampler])), _r(ratio), _r(flop_ratio)])
    out["ratios"][f"{name}/single_layer_vs_none_time"] = _r(timing.paired_ratio(times, "single_layer", "none"))
  out["notes"].append(f"Both steps use the group lasso (lambda {LASSO}) and the same batch of {s.batch}.")
  return out


# ----------------------------------------------------------------------------------- 3. compile count


@contextlib.contextmanager
def _capture_train_steps(steps: list):
  """Records every jitted step ``train.train`` builds (``training.make_train_step`` patched)."""
  from maestro_train import train as train_lib  # pylint: disable=import-outside-toplevel
  make = train_lib.training.make_train_step

  def capture(*args, **kwargs):
    step = make(*args, **kwargs)
    steps.append(step)
    return step

  train_lib.training.make_train_step = capture
  try:
    yield
  finally:
    train_lib.training.make_train_step = make


def _shrink_events(records: list[dict], initial_caps: Mapping[str, int], quantum: int) -> list[dict[str, Any]]:
  """Epochs whose end-of-epoch shrink changed ranks, and whether it changed capacities."""
  caps, ranks, events = dict(initial_caps), dict(initial_caps), []
  for i, record in enumerate(records):
    new_ranks = {k: int(v) for k, v in record["ranks"].items()}
    if new_ranks != ranks:
      new_caps = {k: shrink_lib.round_up_rank(new_ranks[k], quantum, caps[k]) for k in caps}
      events.append({"epoch": record["epoch"], "capacity_changed": new_caps != caps,
                     "before_last_epoch": i < len(records) - 1, "capacities": new_caps})
      caps = new_caps
    ranks = new_ranks
  return events


def compile_config(s: Settings, quantum: int):
  """The digits/MLP run of the compile-count benchmark (a lasso strong enough to shrink within a few epochs)."""
  from maestro_train import config as config_lib  # pylint: disable=import-outside-toplevel
  base = config_lib.load("digits_mlp")
  return dataclasses.replace(base, model_kwargs={"hidden": tuple(s.compile_hidden)}, epochs=s.compile_epochs,
                             batch_size=64, learning_rate=0.1, lasso=1e-2, shrink_threshold=5e-2,
                             rank_quantum=quantum, checkpoint_every_steps=10_000, log_every_steps=10_000,
                             eval_batch_size=512).validate()


def bench_compile_count(s: Settings) -> dict[str, Any]:
  """Compilations of the train step over a real training run, per rank quantum."""
  from maestro_train import train as train_lib  # pylint: disable=import-outside-toplevel
  out = _section("Compilations of the train step over a training run (digits, MLP, train_and_evaluate)",
                 "expected = 1 + capacity-changing shrink events before the last epoch",
                 ["quantum", "epochs", "steps", "rank changes", "capacity changes (counted)", "compiles", "expected",
                  "wall s", "final capacities"])
  out["runs"] = []
  walls = {}
  for quantum in s.compile_quanta:
    config = compile_config(s, quantum)
    steps: list = []
    with tempfile.TemporaryDirectory() as workdir, _capture_train_steps(steps), \
        contextlib.redirect_stdout(io.StringIO()):
      start = time.perf_counter()
      summary = train_lib.train_and_evaluate(config, workdir, progress=False)
      walls[quantum] = time.perf_counter() - start
      records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    if len(steps) != 1:
      raise RuntimeError(f"expected train_and_evaluate to build one train step, it built {len(steps)}")
    compiles = int(steps[0]._cache_size())  # pylint: disable=protected-access
    initial_caps = {name: int(cap) for name, (_, cap) in summary["ranks"].items()}
    events = _shrink_events(records, initial_caps, quantum)
    counted = sum(e["capacity_changed"] and e["before_last_epoch"] for e in events)
    expected = 1 + counted
    final_caps = events[-1]["capacities"] if events else initial_caps
    steps_run = int(records[-1]["step"])
    out["runs"].append({"quantum": quantum, "epochs": config.epochs, "steps": steps_run, "compiles": compiles,
                        "expected": expected, "rank_change_events": len(events),
                        "capacity_change_events": sum(e["capacity_changed"] for e in events),
                        "capacity_change_events_before_last_epoch": counted, "events": events,
                        "initial_capacities": initial_caps, "final_ranks": records[-1]["ranks"],
                        "test_accuracy": summary["test_accuracy"], "wall_seconds": round(walls[quantum], 2)})
    out["rows"].append([quantum, config.epochs, steps_run, len(events), counted, compiles, expected,
                        round(walls[quantum], 1), " ".join(f"{k}:{v}" for k, v in final_caps.items())])
    out["ratios"][f"quantum_{quantum}/compiles_vs_expected"] = _r(compiles / expected)
    out["ratios"][f"quantum_{quantum}/compiles_per_epoch"] = _r(compiles / config.epochs)
    if quantum != s.compile_quanta[0]:
      out["ratios"][f"quantum_{quantum}/wall_vs_quantum_{s.compile_quanta[0]}"] = _r(
          walls[quantum] / walls[s.compile_quanta[0]])
  out["notes"] += [
      "Compiles are read from the captured jitted step's _cache_size() after the run.",
      "A shrink at the end of the last epoch changes capacities but no train step runs after it, so it is "
      "listed but not counted; a rank change that keeps every capacity (rank quantum) must not recompile.",
      f"Config: digits_mlp with hidden {tuple(s.compile_hidden)}, {s.compile_epochs} epochs, lr 0.1, "
      "lambda 1e-2, threshold 5e-2 (strong enough to shrink within a few epochs). Wall times include "
      "evaluation, checkpoints and plots.",
  ]
  return out


# ------------------------------------------------------------------------------------- 4. sweep vs loop


def _eval_arrays(n: int) -> tuple[np.ndarray, np.ndarray, str]:
  """``n`` MNIST test images and labels (offline IDX files), or synthetic MNIST-shaped data."""
  idx_dir = data_lib.default_idx_dir("mnist")
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
  """Cold and steady times of the sweep, 16 full-rank evaluations and the naive loop on ``examples`` images."""
  images, labels, described = _eval_arrays(examples)
  batches = _device_batches(images, labels, s.sweep_batch)
  fmodel, params, model_state = _build("lenet5", MNIST_SHAPE, factorized=True)
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

  cold_fns = {"sweep": sweep_cold, "full_rank_x16": full_cold, "naive_loop": naive_cold}
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

  steady = timing.interleaved({"full_rank_x16": lambda: run_full(eval_step), "sweep": lambda: run_sweep(sweep_fn),
                               "naive_loop": naive_steady}, rounds=steady_rounds, warmup=1)
  swept = run_sweep(sweep_fn)
  looped = naive_steady()
  agree = float(np.max(np.abs(swept["accuracy"] - np.asarray([r["accuracy"] for r in looped]))))
  return {"cold": cold, "steady": steady, "described": described, "agree": agree, "examples": len(labels)}


def bench_sweep_vs_loop(s: Settings) -> dict[str, Any]:
  """One make_sweep call over K LeNet rank settings vs K full-rank evaluations vs the naive re-jit loop."""
  k = s.sweep_configs
  out = _section(f"Sweep of {k} LeNet rank settings vs per-configuration loops",
                 f"{k} full-rank evaluations (one compiled eval step) / the naive slice-and-re-jit loop",
                 ["eval images", "what", "cold s (compile incl.)", "steady s", "cold ratio", "steady ratio"])
  out["requirements"] = {}
  described = []
  for examples, cold_rounds, steady_rounds in s.sweep_sizes:
    t = _sweep_timings(s, examples, cold_rounds, steady_rounds)
    cold, steady, n = t["cold"], t["steady"], t["examples"]
    described.append(t["described"])
    ratios = {
        "sweep_vs_16_full_rank_evals_steady": timing.paired_ratio(steady, "sweep", "full_rank_x16"),
        "sweep_vs_16_full_rank_evals_cold": timing.paired_ratio(cold, "sweep", "full_rank_x16"),
        "naive_loop_vs_sweep_cold": timing.paired_ratio(cold, "naive_loop", "sweep"),
        "naive_loop_vs_sweep_steady": timing.paired_ratio(steady, "naive_loop", "sweep"),
    }
    out["ratios"].update({f"n{n}/{key}": _r(v) for key, v in ratios.items()})
    out["requirements"].update({
        f"{n} images: sweep within 1.3x of {k} full-rank evaluations (steady)":
            ratios["sweep_vs_16_full_rank_evals_steady"] <= 1.3,
        f"{n} images: sweep at least 5x faster than the naive loop (compile incl.)":
            ratios["naive_loop_vs_sweep_cold"] >= 5.0,
    })
    for name, label in (("sweep", "make_sweep, one call, K stacked settings"),
                        ("full_rank_x16", f"{k} full-rank evaluations, one eval step"),
                        ("naive_loop", "naive loop: shrink + new jit per setting")):
      out["rows"].append([n, label, round(timing.median(cold[name]), 3), round(timing.median(steady[name]), 3),
                          _r(timing.paired_ratio(cold, name, "sweep")), _r(timing.paired_ratio(steady, name, "sweep"))])
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


def bench_export_latency(s: Settings) -> dict[str, Any]:
  """Inference latency of exported models at rank fractions vs the dense twin."""
  out = _section("Exported-model inference latency vs dense",
                 "dense twin (factorized=False) forward pass, same batch",
                 ["model", "batch", "rank fraction", "merged layers", "median us", "time ratio", "FLOP ratio"])
  fractions = (1.0, 0.5, 0.25, 0.1)
  for name in ("mlp", "lenet5"):
    dense_fm, dense_params, dense_state = _build(name, MNIST_SHAPE, factorized=False)
    fmodel, params, model_state = _build(name, MNIST_SHAPE, factorized=True)
    exported = {}
    for fraction in fractions:
      efm, eparams, estate = export_lib.export_functional(fmodel, params, model_state,
                                                          _fraction_ranks(params, fraction), merge="auto")
      forms = export_lib.layer_forms(eparams)
      merged = sum(f["form"] == "dense" for f in forms.values())
      exported[fraction] = (efm, eparams, estate, f"{merged}/{len(forms)}")
    module = fmodel.to_module(params, model_state)
    for batch, inner in s.export_inner:
      x = _batch(MNIST_SHAPE, batch)["image"]
      fns, flops = {}, {}
      measured = {}
      for fraction in MEASURED_FRACTIONS:
        # Merged layers chosen by timing each layer at this batch (export.dense_by_latency).
        ranks = _fraction_ranks(params, fraction)
        dense_layers = export_lib.dense_by_latency(module, MNIST_SHAPE, ranks, batch_size=batch,
                                                   repeats=s.export_rounds)
        efm, eparams, estate = export_lib.export_functional(fmodel, params, model_state, ranks, merge="none",
                                                            dense=dense_layers)
        measured[f"{fraction}/measured"] = (efm, eparams, estate,
                                            f"{len(dense_layers)}/{len(export_lib.layer_forms(eparams))}")

      def forward(fm, p, st, x):
        fn = jax.jit(lambda p, st, x: fm.apply(p, st, x)[0])
        flops_, _ = timing.compile_stats(fn, p, st, x)
        return (lambda: fn(p, st, x)), flops_

      fns["dense"], flops["dense"] = forward(dense_fm, dense_params, dense_state, x)
      for fraction, (efm, eparams, estate, _) in {**exported, **measured}.items():
        fns[fraction], flops[fraction] = forward(efm, eparams, estate, x)
      times = timing.interleaved(fns, rounds=s.export_rounds, inner=inner, warmup=2)
      out["rows"].append([name, batch, "dense", "-", round(1e6 * timing.median(times["dense"]), 1), 1.0, 1.0])
      for fraction in [*fractions, *measured]:
        ratio = timing.paired_ratio(times, fraction, "dense")
        out["rows"].append([name, batch, fraction, {**exported, **measured}[fraction][3],
                            round(1e6 * timing.median(times[fraction]), 1), _r(ratio),
                            _r(flops[fraction] / flops["dense"])])
        out["ratios"][f"{name}/batch_{batch}/fraction_{fraction}/time_vs_dense"] = _r(ratio)
        out["ratios"][f"{name}/batch_{batch}/fraction_{fraction}/flops_vs_dense"] = _r(flops[fraction] / flops["dense"])
  out["notes"] += [
      "Exported with maestro_jax.export.export_functional(..., merge='auto'): factors cut to ceil(p * rank), a "
      "layer merged into one dense kernel when (d_in + d_out) r >= d_in d_out ('merged layers' column).",
      "Latency of one jitted forward call, blocked on; at batch 1 it is dominated by dispatch overhead.",
      "'p/measured': layers merged where export.dense_by_latency timed the dense kernel at least as fast as the "
      "factors at that rank and batch (the size rule where a layer cannot be timed).",
  ]
  return out


# ------------------------------------------------------------------------------------------ 6. freezing


def bench_freezing(s: Settings) -> dict[str, Any]:
  """The train step with one factor of every layer frozen vs no freezing."""
  out = _section("Factor freezing: one factor of every layer frozen",
                 "same factorized step, nothing frozen",
                 ["model", "frozen", "median ms/step", "time ratio", "FLOP ratio"])
  opt = _optimizer()
  sampler = maestro_jax.samplers.single_layer()
  for name in s.aux_models:
    data = _batch(MNIST_SHAPE, s.batch)
    fmodel, params, model_state = _build(name, MNIST_SHAPE, factorized=True)
    layers = list(maestro_jax.capacities(params))
    variants = {"none": _stepper(fmodel, params, model_state, opt, data, sampler=sampler, lasso=0.0)}
    for factor in ("a", "b"):
      mask = maestro_jax.freeze_mask(params, {layer: factor for layer in layers})
      variants[f"factor_{factor}"] = _stepper(_FrozenGradients(fmodel, mask), params, model_state,
                                              maestro_jax.frozen_optimizer(opt, mask), data, sampler=sampler,
                                              lasso=0.0)
    times = timing.interleaved({k: v[0] for k, v in variants.items()}, rounds=s.rounds, inner=s.inner)
    for variant, (_, flops, _) in variants.items():
      ratio = timing.paired_ratio(times, variant, "none")
      flop_ratio = flops / variants["none"][1]
      out["rows"].append([name, variant, _ms(timing.median(times[variant])), _r(ratio), _r(flop_ratio)])
      if variant != "none":
        out["ratios"][f"{name}/{variant}_frozen/time_vs_none"] = _r(ratio)
        out["ratios"][f"{name}/{variant}_frozen/flops_vs_none"] = _r(flop_ratio)
  out["notes"] += [
      "Frozen: maestro_jax.stop_frozen_gradients on the params inside the loss (so XLA drops the frozen "
      "factors' weight-gradient matmuls) plus maestro_jax.frozen_optimizer (no optimizer work or state for them).",
      "No group lasso in this benchmark (its gradient would reach the frozen factors); sampler single_layer.",
  ]
  return out


# --------------------------------------------------------------------------------------- 7. end to end


@contextlib.contextmanager
def _patched_data(train_src, test_src):
  from maestro_train import train as train_lib  # pylint: disable=import-outside-toplevel
  from maestro_train import tasks  # pylint: disable=import-outside-toplevel
  load, load_sources = train_lib.load_data, train_lib.load_sources
  factory_args = {"num_classes": int(train_src.num_classes),
                  "image_shape": tuple(int(d) for d in train_src.image_shape)}
  train_lib.load_data = lambda config, workdir=None: (train_src, test_src)
  train_lib.load_sources = lambda config, workdir=None: tasks.Sources(train_src, test_src, test_src, factory_args)
  try:
    yield
  finally:
    train_lib.load_data, train_lib.load_sources = load, load_sources


def _mnist_sources(train_n: int | None, test_n: int | None):
  """MNIST train/test sources (offline IDX; synthetic if missing), optionally cut to their first examples."""
  idx_dir = data_lib.default_idx_dir("mnist")
  if idx_dir is not None:
    sources = [data_lib.load("mnist", split, idx_dir=idx_dir) for split in ("train", "test")]
    described = f"MNIST from the IDX files in shared/data/{Path(idx_dir).name}"
  else:
    rng = np.random.default_rng(0)
    sources = [data_lib.Source.from_arrays(rng.integers(0, 256, size=(n, *MNIST_SHAPE), dtype=np.uint8),
                                           rng.integers(0, 10, size=n).astype(np.int32), name="mnist", split=split,
                                           num_classes=10, mean=(0.1307,), std=(0.3081,))
               for n, split in ((60000, "train"), (10000, "test"))]
    described = "synthetic MNIST-shaped data (no offline MNIST found)"
  out = []
  for source, n in zip(sources, (train_n, test_n)):
    if n is not None and n < len(source):
      images, labels = source.take(np.arange(n))
      source = data_lib.Source.from_arrays(images, labels, name="mnist", split=source.split, num_classes=10,
                                           mean=source.mean, std=source.std)
    out.append(source)
  return out[0], out[1], described


# The setting of the official PyTorch code's reference row (2 epochs, lr 0.01, batch 128, lambda 1e-6; the paper's sampler).
REFERENCE_OVERRIDES = {"sampler": "single_layer", "loss": "maestro", "learning_rate": 0.01, "schedule": "constant",
                       "lasso": 1e-6}


def _describe(config) -> str:
  return (f"sampler {config.sampler}, loss {config.loss}, lr {config.learning_rate:g} {config.schedule}, "
          f"lambda {config.lasso:g}, batch {config.batch_size}")


def _e2e_variants(s: Settings) -> list[tuple[str, dict[str, Any]]]:
  variants = [("mnist_lenet", {})]
  if s.e2e_full:
    variants.append(("reference_setting", REFERENCE_OVERRIDES))
  return variants


def bench_end_to_end(s: Settings) -> dict[str, Any]:
  """LeNet/MNIST epochs with the real runner: config mnist_lenet (and the reference's setting), 2 epochs."""
  from maestro_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from maestro_train import train as train_lib  # pylint: disable=import-outside-toplevel
  out = _section("End to end: LeNet-5 on MNIST with the real runner (train_and_evaluate)",
                 f"official PyTorch code on a 2-core CPU: {PYTORCH_REFERENCE_2_EPOCHS_S:.0f} s for 2 epochs "
                 "(the project's reference measurement; not re-measured here)",
                 ["run", "epoch", "steps", "train-loop s", "test accuracy", "ranks"])
  if s.e2e_full:
    train_src, test_src, described = _mnist_sources(None, None)
  else:
    train_src, test_src, described = _mnist_sources(1024, 500)
    described += ", cut to 1024 training / 500 test images (small mode: not comparable with the reference)"
  out["runs"] = {}
  for label, overrides in _e2e_variants(s):
    config = dataclasses.replace(config_lib.load("mnist_lenet"), epochs=2, idx_dir=None, **overrides).validate()
    with tempfile.TemporaryDirectory() as workdir, _patched_data(train_src, test_src), \
        contextlib.redirect_stdout(io.StringIO()):
      start = time.perf_counter()
      summary = train_lib.train_and_evaluate(config, workdir, progress=False)
      total = time.perf_counter() - start
      records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    previous = 0
    for record in records:
      out["rows"].append([label, record["epoch"], record["step"] - previous, record["epoch_seconds"],
                          round(record["test_accuracy"], 4),
                          " ".join(f"{k}:{v}" for k, v in record["ranks"].items())])
      previous = record["step"]
    train_loop = sum(r["epoch_seconds"] for r in records)
    out["runs"][label] = {"config": _describe(config), "overrides": overrides, "total_seconds": round(total, 2),
                          "train_loop_seconds": round(train_loop, 2),
                          "seconds_per_epoch": round(total / len(records), 2),
                          "test_accuracy": summary["test_accuracy"]}
    out["ratios"][f"{label}/epoch_1_vs_epoch_2_train_loop"] = _r(
        records[0]["epoch_seconds"] / records[-1]["epoch_seconds"])
    out["ratios"][f"{label}/train_loop_vs_total"] = _r(train_loop / total)
    if s.e2e_full:
      out["ratios"][f"{label}/total_2_epochs_vs_pytorch_reference"] = _r(total / PYTORCH_REFERENCE_2_EPOCHS_S)
      out["ratios"][f"{label}/train_loop_2_epochs_vs_pytorch_reference"] = _r(train_loop / PYTORCH_REFERENCE_2_EPOCHS_S)
    out["notes"].append(
        f"{label} ({_describe(config)}"
        f"{', overrides ' + ', '.join(f'{k}={v}' for k, v in overrides.items()) if overrides else ''}): "
        f"total {total:.1f} s for {len(records)} epochs ({total / len(records):.1f} s per epoch) including data "
        f"loading, compilation, evaluation, checkpoints and plots; train loops alone {train_loop:.1f} s (epoch 1 "
        f"includes the step's compilation); final test accuracy {100 * summary['test_accuracy']:.2f}%.")
  out["notes"] += [
      f"Data: {described}. The official code's reference row used the paper's sampler and loss (single_layer, "
      "maestro), lr 0.01 constant and lambda 1e-6, reaching 97.4% after 2 epochs; 'reference_setting' runs that "
      "setting (full mode only), 'mnist_lenet' the repository's current config.",
      f"The PyTorch figures ({PYTORCH_REFERENCE_2_EPOCHS_S:.0f} s for 2 epochs, {PYTORCH_REFERENCE_10_EPOCHS_S:.0f} s "
      "for 10 epochs at 98.6%) are the project's reference measurement of the official code, not re-measured here.",
  ]
  return out


# ------------------------------------------------------------------------------------------- the suite


BENCHMARKS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "train_step_vs_dense": bench_train_step_vs_dense,
    "ordered_dropout_overhead": bench_ordered_dropout_overhead,
    "compile_count": bench_compile_count,
    "sweep_vs_loop": bench_sweep_vs_loop,
    "export_latency": bench_export_latency,
    "freezing": bench_freezing,
    "end_to_end": bench_end_to_end,
}


def _versions() -> dict[str, str]:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
          "maestro_jax": maestro_jax.__version__}


def machine_info() -> dict[str, Any]:
  """Platform, CPUs, library versions, JAX devices and the load average."""
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "cpus_usable": affinity, "versions": _versions(),
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def run(settings: Settings, names: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmarks (all, or ``names``); returns the results dict."""
  names = list(BENCHMARKS) if not names else names
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise ValueError(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
  results = {"mode": settings.mode, "settings": dataclasses.asdict(settings), "machine": machine_info(),
             "benchmarks": {}}
  start = time.perf_counter()
  for i, name in enumerate(names):
    t0 = time.perf_counter()
    section = BENCHMARKS[name](settings)
    section["seconds"] = round(time.perf_counter() - t0, 1)
    results["benchmarks"][name] = section
    log(f"[{i + 1}/{len(names)}] {name} ({section['seconds']:.1f} s): {markdown.headline(name, section)}")
  results["total_seconds"] = round(time.perf_counter() - start, 1)
  if hasattr(os, "getloadavg"):
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
  """Writes ``results.json`` and the markdown report into ``out_dir``; returns their paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path = out_dir / "results.json"
  json_path.write_text(json.dumps(results, indent=2, default=export_lib.json_default) + "\n")
  report_path = out_dir / "RESULTS.md"
  report_path.write_text(markdown.render(results))
  return json_path, report_path


def main(argv: list[str] | None = None) -> int:
  """Command line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="quick CI version (tiny shapes, few repeats)")
  parser.add_argument("--out", type=Path, default=None,
                      help="output folder (default: benchmarks/results for --small, benchmarks for the full run)")
  parser.add_argument("--only", nargs="+", default=None, choices=list(BENCHMARKS), help="run only these")
  args = parser.parse_args(argv)
  settings = SMALL if args.small else FULL
  out_dir = args.out or (PACKAGE_DIR / "results" if args.small else PACKAGE_DIR)
  print(f"maestro_jax benchmarks ({settings.mode}) on {jax.devices()}, {os.cpu_count()} CPUs", flush=True)
  results = run(settings, args.only, log=lambda line: print(line, flush=True))
  json_path, report_path = write(results, out_dir)
  print(f"done in {results['total_seconds']:.1f} s; wrote {json_path} and {report_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
