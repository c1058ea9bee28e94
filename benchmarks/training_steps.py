"""The training-step benchmarks: each times Maestro's train step against a baseline step in the same process.

1. ``train_step_vs_dense``: the Maestro step against the same network built
   from plain ``nnx.Linear``/``nnx.Conv``, at full rank and shrunk to 25%.
2. ``ordered_dropout_overhead``: the ``single_layer`` sampler against keep = capacity.
3. ``compile_count``: compilations of the runner's train step over a real run
   against ``1 + capacity-changing shrink events``.
6. ``freezing``: one factor of every layer frozen against nothing frozen.

Numbers are the suite's (see :mod:`benchmarks.suite`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import maestro_jax
from maestro_jax._src import shrink as shrink_lib

from benchmarks import timing
from benchmarks.common import CIFAR_SHAPE, LASSO, MNIST_SHAPE, FrozenGradients, Settings
from benchmarks.common import build, fraction_ranks, ms, paper_optimizer, random_batch, rounded, section, stepper


# ------------------------------------------------------------------------- 1. train step vs dense


def _step_models(s: Settings) -> list[dict[str, Any]]:
  specs = [dict(name=name, label=name, shape=MNIST_SHAPE, batch=s.batch, kwargs={}, rounds=s.rounds, inner=s.inner)
           for name in s.aux_models]
  if s.big_models:
    for name in ("vgg19", "resnet18"):
      specs.append(dict(name=name, label=name, shape=CIFAR_SHAPE, batch=s.big_batch, kwargs={"width": s.big_width},
                        rounds=s.big_rounds, inner=1))
    for name in s.real_width_models:
      specs.append(dict(name=name, label=f"{name}_width64", shape=CIFAR_SHAPE, batch=s.big_batch,
                        kwargs={"width": 64}, rounds=s.real_width_rounds, inner=1))
  return specs


def bench_train_step_vs_dense(s: Settings) -> dict[str, Any]:
  """Train-step time and FLOPs of the Maestro model vs its dense twin, full rank and shrunk to 25%."""
  out = section("Train step: Maestro vs the same net from flax Dense/Conv",
                 "dense twin (factorized=False), same optimizer, same batch",
                 ["model", "batch", "variant", "median ms/step", "time ratio", "FLOP ratio", "compile s"])
  opt = paper_optimizer()
  for spec in _step_models(s):
    name, label, shape, batch = spec["name"], spec["label"], spec["shape"], spec["batch"]
    data = random_batch(shape, batch)
    dense = build(name, shape, factorized=False, **spec["kwargs"])
    fmodel, params, model_state = build(name, shape, factorized=True, **spec["kwargs"])
    # The same model forced onto the two-factor path everywhere (the only path before per-layer choice).
    factors_model, _, _ = build(name, shape, factorized=True, compute_path="factors", **spec["kwargs"])
    shrunk, _, _ = maestro_jax.shrink(params, fraction_ranks(params, 0.25))
    sampler = maestro_jax.samplers.single_layer()
    variants = {
        "dense": stepper(*dense, opt, data, sampler=maestro_jax.samplers.none(), lasso=0.0),
        "maestro_full_rank": stepper(fmodel, params, model_state, opt, data, sampler=sampler, lasso=LASSO),
        "maestro_shrunk_25": stepper(fmodel, shrunk, model_state, opt, data, sampler=sampler, lasso=LASSO),
        "factors_full_rank": stepper(factors_model, params, model_state, opt, data, sampler=sampler, lasso=LASSO),
        "factors_shrunk_25": stepper(factors_model, shrunk, model_state, opt, data, sampler=sampler, lasso=LASSO),
    }
    times = timing.interleaved({k: v[0] for k, v in variants.items()}, rounds=spec["rounds"], inner=spec["inner"])
    base_flops = variants["dense"][1]
    for variant, (_, flops, compile_s) in variants.items():
      ratio = timing.paired_ratio(times, variant, "dense")
      flop_ratio = flops / base_flops
      out["rows"].append([label, batch, variant, ms(timing.median(times[variant])), rounded(ratio), rounded(flop_ratio),
                          round(compile_s, 2)])
      if variant != "dense":
        out["ratios"][f"{label}/{variant}/time_vs_dense"] = rounded(ratio)
        out["ratios"][f"{label}/{variant}/flops_vs_dense"] = rounded(flop_ratio)
    out["ratios"][f"{label}/shrunk_25_vs_full_rank_time"] = rounded(
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
    if s.real_width_models:
      out["notes"].append(f"*_width64: the real width, same batch ({', '.join(s.real_width_models)}). At width 16 "
                          "ResNet-18's first stage (32x32 maps, 16 channels, rank 4 at 25%) cannot shrink on XLA CPU, "
                          "whose direct convolution runs 4 output channels at the cost of 16.")
  return out


# ------------------------------------------------------------------------ 2. ordered dropout overhead


def _rows_against_none(out: dict[str, Any], name: str, variants: dict[str, tuple], s: Settings
                       ) -> dict[str, tuple[float, float]]:
  """Times ``variants`` (``stepper`` results) interleaved and adds a row each against the variant ``'none'``.

  Returns:
    ``{variant: (time ratio, FLOP ratio)}`` against ``'none'``.
  """
  times = timing.interleaved({k: v[0] for k, v in variants.items()}, rounds=s.rounds, inner=s.inner)
  ratios = {}
  for variant, (_, flops, _) in variants.items():
    ratios[variant] = (timing.paired_ratio(times, variant, "none"), flops / variants["none"][1])
    out["rows"].append([name, variant, ms(timing.median(times[variant])), *map(rounded, ratios[variant])])
  return ratios


def bench_ordered_dropout_overhead(s: Settings) -> dict[str, Any]:
  """The sampled step (single_layer) vs the same step at keep = capacity (sampler none)."""
  out = section("Ordered-dropout overhead: sampled keep counts vs keep = capacity",
                 "same factorized step with sampler 'none' (keep = capacity, mask still applied)",
                 ["model", "sampler", "median ms/step", "time ratio", "FLOP ratio"])
  opt = paper_optimizer()
  for name in s.aux_models:
    data = random_batch(MNIST_SHAPE, s.batch)
    fmodel, params, model_state = build(name, MNIST_SHAPE, factorized=True)
    variants = {sampler: stepper(fmodel, params, model_state, opt, data, sampler=maestro_jax.make_sampler(sampler),
                                  lasso=LASSO) for sampler in ("none", "single_layer")}
    ratios = _rows_against_none(out, name, variants, s)
    out["ratios"][f"{name}/single_layer_vs_none_time"] = rounded(ratios["single_layer"][0])
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
                             rank_quantum=quantum, reslice_min_saving=0.0, checkpoint_every_steps=10_000,
                             log_every_steps=10_000, eval_batch_size=512).validate()


def bench_compile_count(s: Settings) -> dict[str, Any]:
  """Compilations of the train step over a real training run, per rank quantum."""
  from maestro_train import train as train_lib  # pylint: disable=import-outside-toplevel
  out = section("Compilations of the train step over a training run (digits, MLP, train_and_evaluate)",
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
    out["ratios"][f"quantum_{quantum}/compiles_vs_expected"] = rounded(compiles / expected)
    out["ratios"][f"quantum_{quantum}/compiles_per_epoch"] = rounded(compiles / config.epochs)
    if quantum != s.compile_quanta[0]:
      out["ratios"][f"quantum_{quantum}/wall_vs_quantum_{s.compile_quanta[0]}"] = rounded(
          walls[quantum] / walls[s.compile_quanta[0]])
  out["notes"] += [
      "Compiles are read from the captured jitted step's _cache_size() after the run.",
      "A shrink at the end of the last epoch changes capacities but no train step runs after it, so it is "
      "listed but not counted; a rank change that keeps every capacity (rank quantum) must not recompile.",
      f"Config: digits_mlp with hidden {tuple(s.compile_hidden)}, {s.compile_epochs} epochs, lr 0.1, "
      "lambda 1e-2, threshold 5e-2 (strong enough to shrink within a few epochs), reslice_min_saving 0 (every "
      "capacity change reshapes the state, as the expected count assumes). Wall times include "
      "evaluation, checkpoints and plots.",
  ]
  return out


# ------------------------------------------------------------------------------------------ 6. freezing


def bench_freezing(s: Settings) -> dict[str, Any]:
  """The train step with one factor of every layer frozen vs no freezing."""
  out = section("Factor freezing: one factor of every layer frozen",
                 "same factorized step, nothing frozen",
                 ["model", "frozen", "median ms/step", "time ratio", "FLOP ratio"])
  opt = paper_optimizer()
  sampler = maestro_jax.samplers.single_layer()
  for name in s.aux_models:
    data = random_batch(MNIST_SHAPE, s.batch)
    fmodel, params, model_state = build(name, MNIST_SHAPE, factorized=True)
    layers = list(maestro_jax.capacities(params))
    variants = {"none": stepper(fmodel, params, model_state, opt, data, sampler=sampler, lasso=0.0)}
    for factor in ("a", "b"):
      mask = maestro_jax.freeze_mask(params, {layer: factor for layer in layers})
      variants[f"factor_{factor}"] = stepper(FrozenGradients(fmodel, mask), params, model_state,
                                              maestro_jax.frozen_optimizer(opt, mask), data, sampler=sampler,
                                              lasso=0.0)
    for variant, (ratio, flop_ratio) in _rows_against_none(out, name, variants, s).items():
      if variant != "none":
        out["ratios"][f"{name}/{variant}_frozen/time_vs_none"] = rounded(ratio)
        out["ratios"][f"{name}/{variant}_frozen/flops_vs_none"] = rounded(flop_ratio)
  out["notes"] += [
      "Frozen: maestro_jax.stop_frozen_gradients on the params inside the loss (so XLA drops the frozen "
      "factors' weight-gradient matmuls) plus maestro_jax.frozen_optimizer (no optimizer work or state for them).",
      "No group lasso in this benchmark (its gradient would reach the frozen factors); sampler single_layer.",
  ]
  return out
