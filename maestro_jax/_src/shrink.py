"""Progressive shrinking: new ranks from importance, and slicing params and optimizer state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maestro_jax._src import kinds, regularizers, tree


# One program per set of shapes: op by op, each primitive compiled its own small program (0.9 s a call for LeNet).
_importance = jax.jit(regularizers.importance)


def ranks_from_importance(params: Any, threshold: float,
                          ranks: Mapping[str, int] | None = None) -> dict[str, int]:
  """New rank per layer: ``#{b : s_b >= threshold}`` (a prefix, since ``s`` is non-increasing).

  A rank never grows: the result is at most the current rank when ``ranks`` is given.
  """
  if threshold < 0:
    raise ValueError(f"threshold must be >= 0, got {threshold}")
  ranks = dict(ranks or {})
  new = {}
  for name, s in _importance(params, ranks).items():
    count = int(np.sum(np.asarray(s) >= threshold))
    new[name] = min(count, int(ranks.get(name, count)))
  return new


def round_up_rank(rank: int, quantum: int, capacity: int) -> int:
  """The smallest multiple of ``quantum`` that holds ``rank``, at most ``capacity``."""
  if quantum < 1:
    raise ValueError(f"quantum must be >= 1, got {quantum}")
  return min(int(math.ceil(rank / quantum)) * quantum, capacity)


def new_capacities(params: Any, ranks: Mapping[str, int], quantum: int = 1,
                   min_saving: float = 0.0, component_costs: Mapping[str, float] | None = None) -> dict[str, int]:
  """Capacity per layer after shrinking to ``ranks`` with the given quantum.

  With ``min_saving > 0`` every capacity stays as it is unless the cuts together
  free at least that fraction of the model's factor parameters (or of
  ``component_costs``): each new set of shapes costs a compilation, so small
  cuts wait (masked) until they add up.

  Args:
    params: parameter tree.
    ranks: new rank per layer name.
    quantum: capacities are rounded up to a multiple of this.
    min_saving: the share of the total that the cuts must free (1: never cut
      shapes, only zero the components past each rank).
    component_costs: cost of one component per layer name (default: its
      parameters, ``d_in + d_out``). The runner passes multiply-adds per
      example, ``positions * (d_in + d_out)``: a compile pays off in time,
      and a convolution's component costs far more time than its parameters
      say.
  """
  if not 0 <= min_saving <= 1:
    raise ValueError(f"min_saving must be in [0, 1], got {min_saving}")
  caps = tree.capacities(params)
  new = {name: round_up_rank(rank, quantum, caps[name]) for name, rank in tree.resolve_ranks(params, ranks).items()}
  if min_saving > 0:
    per_component = {name: sum(kinds.matrix_dims(layer)) for name, layer in tree.factorized_layers(params).items()}
    if component_costs is not None:
      missing = sorted(set(per_component) - set(component_costs))
      if missing:
        raise ValueError(f"component_costs has no cost for layers {missing}")
      per_component = {name: component_costs[name] for name in per_component}
    total = sum(per_component[name] * cap for name, cap in caps.items())
    freed = sum(per_component[name] * (caps[name] - new[name]) for name in caps)
    if min_saving == 1 or freed < min_saving * total:
      return caps
  return new


def _slicers(params: Any, ranks: Mapping[str, int], caps: Mapping[str, int]):
  """A tree like ``params`` whose leaves are functions that cut that leaf to its new capacity."""

  def cut(rank, cap, axis):
    def fn(x):
      x = jax.lax.slice_in_dim(x, 0, cap, axis=axis)
      if rank < cap:  # Components between rank and capacity stay, zeroed and masked.
        live = (jnp.arange(cap) < rank).reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
        x = jnp.where(live, x, jnp.zeros((), x.dtype))
      return x
    return fn

  def layer_fn(name, layer):
    rank = int(ranks.get(name, caps[name]))
    out = {k: (lambda x: x) for k in layer}
    out["a"] = cut(rank, caps[name], -1)
    out["b"] = cut(rank, caps[name], 0)
    return out

  slicers = tree.map_layers(layer_fn, params)
  return jax.tree.map(lambda s: s if callable(s) else (lambda x: x), slicers, is_leaf=callable)


def shrink(params: Any, ranks: Mapping[str, int], *, quantum: int = 1, opt_state: Any = None,
           optimizer: optax.GradientTransformation | None = None, min_saving: float = 0.0,
           component_costs: Mapping[str, float] | None = None):
  """Cuts every factorized layer to ``round_up_rank(rank, quantum)`` components.

  Parameters and every parameter-shaped part of the optimizer state (momentum,
  Adam moments, ...) are sliced the same way, via ``optax.tree_map_params``.
  Components between the rank and the new capacity are zeroed; keep them masked
  by never sampling keep counts above the rank.

  Args:
    params: parameter tree (nested dicts).
    ranks: new rank per layer name; layers not named keep their capacity.
    quantum: capacities are rounded up to a multiple of this (1, 8, 128, ...).
    opt_state: optional optimizer state for ``params``.
    optimizer: the optax transformation that made ``opt_state`` (needed with it).
    min_saving: cut capacities only when together they free at least this
      fraction of the factor parameters (see :func:`new_capacities`); below it
      the shapes stay and the components past each rank are zeroed.
    component_costs: what ``min_saving`` weighs each layer's components by
      (see :func:`new_capacities`; default their parameters).

  Returns:
    ``(params, opt_state, capacities)``; ``opt_state`` is None when not given.
  """
  caps = new_capacities(params, ranks, quantum, min_saving, component_costs)
  slicers = _slicers(params, ranks, caps)
  new_params = jax.tree.map(lambda fn, x: fn(x), slicers, params, is_leaf=callable)
  new_state = None
  if opt_state is not None:
    if optimizer is None:
      raise ValueError("shrink needs the optimizer that made opt_state, to find its parameter-shaped parts")
    new_state = optax.tree_map_params(optimizer, lambda x, fn: fn(x), opt_state, slicers)
  return new_params, new_state, caps
