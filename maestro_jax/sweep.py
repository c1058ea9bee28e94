"""Evaluating many rank settings in one compiled call, and the greedy budget search.

A *stacked keep dict* maps every factorized layer's dotted name to an int32
array of shape ``(K,)``: configuration ``k`` keeps ``stacked[name][k]``
components of layer ``name``. :func:`make_sweep` evaluates all ``K``
configurations of one batch in a single jitted ``jax.vmap`` (or, with
``chunk_size``, a ``jax.lax.map`` over chunks of that size so ``K`` times the
activations need not fit at once); keep counts are data, so a new set of ``K``
configurations never recompiles. :func:`sweep` runs it over a whole evaluation
set, with optional per-configuration BatchNorm recalibration.

Generators of stacked keep dicts: :func:`fraction_grid` (one share of every
layer's rank), :func:`per_layer` (vary one layer), :func:`global_budget`
(largest singular values network-wide, Decomposable-Net's rule) and
:func:`stack` (any list of keep dicts).

:func:`greedy_search` is the paper's deployment search: from the trained ranks,
repeatedly cut the one layer whose reduction costs the least loss per MAC (or
parameter) saved, until a budget is met.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maestro_jax import accounting
from maestro_jax import training
from maestro_jax._src import decomposable
from maestro_jax._src import factorized
from maestro_jax._src import kinds
from maestro_jax._src import rules
from maestro_jax._src import tree

__all__ = ["stack", "unstack", "num_configs", "fraction_grid", "per_layer", "global_budget", "make_sweep",
           "make_recalibration", "sweep", "costs", "GreedyResult", "greedy_search"]

PyTree = Any
Stacked = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------- stacked keeps


def stack(configs: Sequence[Mapping[str, Any]]) -> Stacked:
  """Stacks keep dicts ``[{layer: int}, ...]`` into ``{layer: int32 (K,)}``.

  Every dict must name the same layers.

  Raises:
    ValueError: for an empty list or dicts naming different layers.
  """
  configs = list(configs)
  if not configs:
    raise ValueError("stack needs at least one keep dict")
  names = list(configs[0])
  for i, config in enumerate(configs):
    if set(config) != set(names):
      raise ValueError(f"keep dict {i} names layers {sorted(config)}, but keep dict 0 names {sorted(names)}")
  return {name: np.asarray([int(c[name]) for c in configs], np.int32) for name in names}


def num_configs(stacked: Mapping[str, Any]) -> int:
  """``K``, the number of configurations in a stacked keep dict."""
  sizes = {int(np.shape(v)[0]) for v in stacked.values() if np.ndim(v) == 1}
  if len(sizes) != 1 or any(np.ndim(v) != 1 for v in stacked.values()):
    raise ValueError(f"a stacked keep dict needs one (K,) array per layer, got shapes "
                     f"{ {k: np.shape(v) for k, v in stacked.items()} }")
  return sizes.pop()


def unstack(stacked: Mapping[str, Any]) -> list[dict[str, int]]:
  """The ``K`` keep dicts (Python ints) of a stacked keep dict."""
  k = num_configs(stacked)
  host = {name: np.asarray(v) for name, v in stacked.items()}
  return [{name: int(v[i]) for name, v in host.items()} for i in range(k)]


def _check_fractions(fractions: Iterable[float]) -> list[float]:
  fractions = [float(p) for p in fractions]
  if not fractions:
    raise ValueError("need at least one fraction")
  bad = [p for p in fractions if not 0.0 < p <= 1.0]
  if bad:
    raise ValueError(f"fractions must be in (0, 1], got {bad}")
  return fractions


def fraction_grid(ranks: Mapping[str, int], fractions: Iterable[float]) -> Stacked:
  """One configuration per fraction ``p``: every layer keeps ``ceil(p * rank)`` components (at least 1).

  Args:
    ranks: current rank per layer name.
    fractions: shares in ``(0, 1]``.

  Returns:
    ``{layer: int32 (K,)}`` with ``K = len(fractions)``.
  """
  fractions = _check_fractions(fractions)
  return {name: np.asarray([rules.fraction_to_rank(p, int(r)) for p in fractions], np.int32) for name, r in ranks.items()}


def per_layer(ranks: Mapping[str, int], layer: str, values: Iterable[int]) -> Stacked:
  """Varies one layer's keep count over ``values``; every other layer keeps its full rank.

  Raises:
    ValueError: for an unknown layer or a value outside ``0..rank``.
  """
  tree.check_names([layer], ranks, "layer")
  values = [int(v) for v in values]
  bad = [v for v in values if not 0 <= v <= int(ranks[layer])]
  if bad:
    raise ValueError(f"layer {layer!r}: keep counts {bad} are out of range 0..{int(ranks[layer])}")
  return {name: np.asarray(values if name == layer else [int(r)] * len(values), np.int32)
          for name, r in ranks.items()}


def global_budget(params: PyTree, ranks: Mapping[str, int] | None, fractions: Iterable[float], *,
                  normalized: bool = False, spectrum: str = "svd", min_keep: int = 0) -> Stacked:
  """One configuration per fraction: ``fraction_to_rank(p, sum(ranks))`` components with the largest singular values.

  The components are chosen network-wide by :func:`maestro_jax.global_budget_keeps`
  (Decomposable-Net's rule), vmapped over the fractions.

  Args:
    params: parameter tree holding factorized layers.
    ranks: current rank per layer (None: capacities).
    fractions: shares in ``(0, 1]`` of all components.
    normalized, spectrum, min_keep: see :func:`maestro_jax.global_budget_keeps`.

  Returns:
    ``{layer: int32 (K,)}`` for every factorized layer.
  """
  fractions = _check_fractions(fractions)
  ranks = None if ranks is None else {k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()}
  # Each fraction as its exact ratio (the rule of maestro_jax.fraction_to_rank), vmapped as int32 pairs.
  nums, dens = (jnp.asarray(v, jnp.int32) for v in zip(*(rules.fraction_parts(p) for p in fractions)))
  fn = lambda num, den: decomposable.global_budget_keeps(params, (num, den), ranks, normalized=normalized,
                                                         spectrum=spectrum, min_keep=min_keep)
  out = jax.jit(jax.vmap(fn))(nums, dens)
  return {name: np.asarray(v, np.int32) for name, v in out.items()}


def _check_stacked(params: PyTree, stacked: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Validates a stacked keep dict against the params; returns it as int32 device arrays."""
  caps = tree.capacities(params)
  tree.check_names(stacked, caps, "layers in stacked keep counts")
  num_configs(stacked)
  for name, values in stacked.items():
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"layer {name!r}: keep counts must be integers, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > caps[name]):
      raise ValueError(f"layer {name!r}: keep counts {values.tolist()} are out of range 0..capacity {caps[name]}")
  return {name: jnp.asarray(v, jnp.int32) for name, v in stacked.items()}


# ------------------------------------------------------------------------------------------- the sweep


def _map(fn: Callable, xs: PyTree, chunk_size: int | None) -> PyTree:
  """``fn`` over stacked keep-count configurations, every layer on its factor path.

  Mapped over configurations, the kernel path forms one kernel per
  configuration and XLA runs them as grouped convolutions (1.35-1.74x slower
  for a LeNet sweep on CPU); the factor path shares ``x @ A`` across them.
  """
  with factorized.compute_path_scope("factors"):
    if chunk_size is None:
      return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk_size)


def _check_chunk(chunk_size: int | None) -> None:
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def make_sweep(model: training.FunctionalModel, *, chunk_size: int | None = None,
               per_config_state: bool = False) -> Callable:
  """Builds the jitted evaluation of ``K`` keep-count configurations on one batch.

  The returned function is
  ``sweep_fn(params, model_state, images, labels, mask, stacked_keeps) -> metrics``:
  params and the batch are shared by all configurations, ``stacked_keeps``
  (``{layer: int32 (K,)}``) is mapped. Keep counts are traced, so any ``K``
  configurations of the same ``K`` reuse one compilation.

  Args:
    model: the functional model.
    chunk_size: None evaluates all ``K`` in one ``jax.vmap``; an int runs
      ``jax.lax.map(..., batch_size=chunk_size)``: chunks of that many
      configurations vmapped, the chunks in sequence (memory ``chunk_size``
      times the activations instead of ``K`` times).
    per_config_state: ``model_state`` carries a leading ``K`` axis on every leaf
      (e.g. per-configuration BatchNorm statistics from
      :func:`make_recalibration`) and is mapped with the keep counts.

  Returns:
    The jitted function; ``metrics`` holds ``(K,)`` float32 arrays ``loss`` and
    ``accuracy`` (means over unmasked examples) and ``loss_sum``, ``correct``,
    ``count`` (sums, for accumulating over batches). ``mask`` (``(B,)``, bool or
    float) excludes padding; pass ``None`` for none.
  """
  _check_chunk(chunk_size)

  def evaluate(params, model_state, images, labels, mask, stacked_keeps):
    weight = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    count = jnp.sum(weight)

    def one(xs):
      keeps, state = xs
      logits, _ = model.apply(params, state, images, keeps, train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
      loss_sum, correct = jnp.sum(losses * weight), jnp.sum(correct * weight)
      denom = jnp.maximum(count, 1.0)
      return {"loss": loss_sum / denom, "accuracy": correct / denom, "loss_sum": loss_sum, "correct": correct,
              "count": count}

    if per_config_state:
      return _map(one, (stacked_keeps, model_state), chunk_size)
    return _map(lambda keeps: one((keeps, model_state)), stacked_keeps, chunk_size)

  return jax.jit(evaluate)


def make_recalibration(model: training.FunctionalModel, *, chunk_size: int | None = None) -> Callable:
  """Jitted ``(params, model_state, images (n, B, ...), stacked_keeps) -> stacked model_state``.

  Recomputes BatchNorm statistics for every configuration at once
  (:meth:`FunctionalModel.recalibrate` vmapped over the keep counts); every leaf
  of the result has a leading ``K`` axis. Feed it to a sweep built with
  ``per_config_state=True``.
  """
  _check_chunk(chunk_size)

  def recalibrate(params, model_state, images, stacked_keeps):
    return _map(lambda keeps: model.recalibrate(params, model_state, images, keeps), stacked_keeps, chunk_size)

  return jax.jit(recalibrate)


def _has_state(model_state: PyTree) -> bool:
  return bool(jax.tree.leaves(model_state))


def sweep(model: training.FunctionalModel, params: PyTree, model_state: PyTree,
          batches: Iterable[Mapping[str, Any]], stacked_keeps: Mapping[str, Any], *,
          chunk_size: int | None = None, calibration_images: Any = None,
          sweep_fn: Callable | None = None, recalibration_fn: Callable | None = None) -> dict[str, Any]:
  """Accuracy and mean loss of ``K`` configurations over a whole evaluation set.

  Args:
    model: the functional model.
    params: its parameters (pure dict).
    model_state: its other state (BatchNorm statistics, ...).
    batches: an iterable of ``{'image', 'label', 'mask'?}`` batches (e.g.
      ``maestro_jax.data.batches(test, 500, train=False)``); padding rows with
      ``mask`` False are excluded.
    stacked_keeps: ``{layer: int (K,)}``; layers not named keep their capacity.
    chunk_size: see :func:`make_sweep`.
    calibration_images: ``(n, B, ...)`` training images; when given and the
      model has state (BatchNorm), the statistics are recomputed for every
      configuration before evaluating it.
    sweep_fn: a function from :func:`make_sweep` to reuse (its compilation);
      it must match ``chunk_size`` and whether calibration is used.
    recalibration_fn: likewise, from :func:`make_recalibration`.

  Returns:
    ``{'accuracy': float64 (K,), 'loss': float64 (K,), 'count': int, 'keeps': stacked keeps}``.

  Raises:
    ValueError: for unknown layers, keep counts out of range, or no batches.
  """
  keeps = _check_stacked(params, stacked_keeps)
  per_config = calibration_images is not None and _has_state(model_state)
  state = model_state
  if per_config:
    recalibration_fn = recalibration_fn or make_recalibration(model, chunk_size=chunk_size)
    state = recalibration_fn(params, model_state, jnp.asarray(calibration_images), keeps)
  sweep_fn = sweep_fn or make_sweep(model, chunk_size=chunk_size, per_config_state=per_config)
  loss_sum = correct = None
  count = 0.0
  for batch in batches:
    mask = batch.get("mask")
    out = sweep_fn(params, state, jnp.asarray(batch["image"]), jnp.asarray(batch["label"]),
                   None if mask is None else jnp.asarray(mask), keeps)
    out = jax.device_get(out)
    loss_sum = out["loss_sum"].astype(np.float64) + (0.0 if loss_sum is None else loss_sum)
    correct = out["correct"].astype(np.float64) + (0.0 if correct is None else correct)
    count += float(out["count"][0])
  if loss_sum is None:
    raise ValueError("sweep got no batches")
  denom = max(count, 1.0)
  return {"accuracy": correct / denom, "loss": loss_sum / denom, "count": int(count),
          "keeps": {k: np.asarray(v) for k, v in stacked_keeps.items()}}


def costs(params: PyTree, stacked_keeps: Mapping[str, Any], positions: Mapping[str, int] | None) -> dict[str, Any]:
  """Deployed (merged) parameters and MACs of every configuration, via :func:`maestro_jax.accounting.count`.

  Returns:
    ``{'params': int64 (K,), 'macs': int64 (K,) or None}``.
  """
  reports = [accounting.count(params, keeps, positions) for keeps in unstack(stacked_keeps)]
  macs = [r.macs_merged for r in reports]
  return {"params": np.asarray([r.params_merged for r in reports], np.int64),
          "macs": None if any(m is None for m in macs) else np.asarray(macs, np.int64)}


# ------------------------------------------------------------------------------------------ greedy search


@dataclasses.dataclass(frozen=True)
class GreedyResult:
  """What :func:`greedy_search` found.

  Attributes:
    ranks: the chosen rank of every factorized layer.
    path: one entry per point visited, the start first: ``{'step', 'layer'
      (None at the start), 'rank', 'ranks', 'macs', 'params', 'loss',
      'ratio'}`` where ``ratio`` is the loss increase per unit of the budgeted
      cost saved by that step.
    metric: ``'macs'`` or ``'params'``, what the budget counts.
    budget: the budget.
  """

  ranks: dict[str, int]
  path: list[dict[str, Any]]
  metric: str
  budget: int

  @property
  def macs(self) -> int | None:
    return self.path[-1]["macs"]

  @property
  def params(self) -> int:
    return self.path[-1]["params"]

  @property
  def loss(self) -> float:
    return self.path[-1]["loss"]


def _cost(params, ranks, positions) -> tuple[int | None, int]:
  report = accounting.count(params, ranks, positions)
  return report.macs_merged, report.params_merged


def _candidate(rank: int, floor: int, step: int, d_in: int, d_out: int) -> int | None:
  """The next rank to try for a layer: ``rank - step``, or lower when the layer would still be merged.

  A layer whose factorized form is not smaller than its kernel,
  ``(d_in + d_out) r >= d_in d_out``, is deployed (and counted) as the dense
  kernel, so cutting it saves nothing until its rank drops below
  ``d_in d_out / (d_in + d_out)``; the candidate then jumps by whole steps to
  the first rank that is factorized.
  """
  if rank <= floor:
    return None
  new = max(rank - step, floor)
  if rules.should_merge(d_in, d_out, new):
    first_factorized = rules.largest_factorized_rank(d_in, d_out)
    if first_factorized < floor:
      new = floor
    else:
      new = max(rank - step * math.ceil((rank - first_factorized) / step), floor)
  return new


def greedy_search(model: training.FunctionalModel, params: PyTree, model_state: PyTree,
                  batch: Mapping[str, Any], ranks: Mapping[str, int] | None, positions: Mapping[str, int] | None,
                  *, budget_macs: int | None = None, budget_params: int | None = None, step: int = 1,
                  min_rank: int = 1, chunk_size: int | None = None, calibration_images: Any = None,
                  max_steps: int | None = None) -> GreedyResult:
  """Greedily removes rank components until a MAC or parameter budget is met.

  Each greedy step builds every single-layer reduction of the current ranks (one
  layer's rank minus ``step``, never below ``min_rank``; a layer still counted
  as a dense kernel jumps by whole steps to its first rank that actually saves,
  see below), evaluates all of them together with the current ranks in one
  vmapped call on the calibration ``batch`` (shapes are fixed, so it compiles
  once), and applies the reduction with the smallest
  ``(loss(candidate) - loss(current)) / saved`` where ``saved`` is the drop in
  the budgeted cost (MACs or parameters, :func:`maestro_jax.accounting.count`
  merged totals: a layer whose factorized form is not smaller,
  ``(d_in + d_out) r >= d_in d_out``, counts as its dense kernel). Ties go to
  the earlier layer. It stops as soon as the cost is within the budget (the
  start may already be).

  ``min_rank`` defaults to 1: a layer at rank 0 outputs only its bias, which
  cuts the network; pass 0 to allow it (the paper's global-budget rule does).

  Args:
    model: the functional model.
    params: its parameters (capacities >= ranks).
    model_state: its other state.
    batch: calibration batch ``{'image', 'label', 'mask'?}`` (training data).
    ranks: starting rank per layer (layers not named, or None: capacity).
    positions: output positions per layer (:func:`maestro_jax.accounting.layer_positions`);
      needed for a MAC budget.
    budget_macs: MACs per example to reach; give exactly one budget.
    budget_params: deployed parameters to reach.
    step: the rank quantum of one greedy move (1, 8, ...).
    min_rank: the smallest rank any layer may reach.
    chunk_size: see :func:`make_sweep`.
    calibration_images: ``(n, B, ...)`` images; with BatchNorm, statistics are
      recomputed for every candidate before its loss is measured.
    max_steps: optional cap on greedy steps (then the budget may not be met).

  Returns:
    A :class:`GreedyResult`; its ``path`` starts at the given ranks and its
    budgeted cost strictly decreases.

  Raises:
    ValueError: no or two budgets, unknown layer names, ranks above capacity or
      negative, a bad ``step``/``min_rank``, a MAC budget without positions, or a
      budget below the smallest model (every layer at ``min_rank``; the message
      gives the smallest achievable cost).
  """
  if (budget_macs is None) == (budget_params is None):
    raise ValueError("give exactly one of budget_macs and budget_params")
  metric = "macs" if budget_macs is not None else "params"
  budget = int(budget_macs if budget_macs is not None else budget_params)
  if metric == "macs" and positions is None:
    raise ValueError("a MAC budget needs positions (maestro_jax.accounting.layer_positions)")
  if not isinstance(step, int) or step < 1:
    raise ValueError(f"step must be an int >= 1, got {step!r}")
  if min_rank < 0:
    raise ValueError(f"min_rank must be >= 0, got {min_rank}")
  layers = tree.factorized_layers(params)
  if not layers:
    raise ValueError("the model has no factorized layers to search over")
  caps = tree.capacities(params)
  current = tree.resolve_ranks(params, ranks)
  floor = {name: min(rank, min_rank) for name, rank in current.items()}
  index = 0 if metric == "macs" else 1
  smallest = _cost(params, floor, positions)
  if budget < smallest[index]:
    raise ValueError(f"budget of {budget:,} {metric} is below the smallest model: {smallest[index]:,} {metric} "
                     f"({smallest[1 - index] if smallest[1 - index] is not None else '-'} "
                     f"{'params' if index == 0 else 'MACs'}) with every layer at rank {min_rank}")

  names = list(caps)
  dims = {name: kinds.matrix_dims(layers[name]) for name in names}
  per_config = calibration_images is not None and _has_state(model_state)
  sweep_fn = make_sweep(model, chunk_size=chunk_size, per_config_state=per_config)
  recal_fn = make_recalibration(model, chunk_size=chunk_size) if per_config else None
  images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  mask = batch.get("mask")
  mask = None if mask is None else jnp.asarray(mask)
  calib = None if calibration_images is None else jnp.asarray(calibration_images)

  def evaluate(configs: list[dict[str, int]]) -> np.ndarray:
    keeps = {k: jnp.asarray(v) for k, v in stack(configs).items()}
    state = recal_fn(params, model_state, calib, keeps) if per_config else model_state
    return np.asarray(jax.device_get(sweep_fn(params, state, images, labels, mask, keeps)["loss"]), np.float64)

  cost = _cost(params, current, positions)
  width = len(names) + 1  # K is fixed (the current ranks first, unused slots repeat them): one compilation
  loss = float(evaluate([dict(current)] * width)[0])
  path = [{"step": 0, "layer": None, "rank": None, "ranks": dict(current), "macs": cost[0], "params": cost[1],
           "loss": loss, "ratio": None}]
  while cost[index] > budget and (max_steps is None or len(path) <= max_steps):
    candidates: list[tuple[str, int, tuple]] = []
    for name in names:
      new = _candidate(current[name], floor[name], step, *dims[name])
      if new is None:
        continue
      new_cost = _cost(params, dict(current, **{name: new}), positions)
      if new_cost[index] < cost[index]:
        candidates.append((name, new, new_cost))
    if not candidates:  # cannot happen when the budget is above the smallest model; kept as a guard
      raise ValueError(f"no layer can be cut further, yet {cost[index]:,} {metric} exceed the budget {budget:,}")
    configs = [dict(current)] + [dict(current, **{name: new}) for name, new, _ in candidates]
    losses = evaluate(configs + [dict(current)] * (width - len(configs)))
    ratios = np.asarray([(losses[i + 1] - losses[0]) / (cost[index] - c[index])
                         for i, (_, _, c) in enumerate(candidates)])
    best = int(np.argmin(ratios))
    name, new, cost = candidates[best]
    current = dict(current, **{name: new})
    path.append({"step": len(path), "layer": name, "rank": new, "ranks": dict(current), "macs": cost[0],
                 "params": cost[1], "loss": float(losses[best + 1]), "ratio": float(ratios[best])})
  return GreedyResult(ranks=dict(current), path=path, metric=metric, budget=budget)
