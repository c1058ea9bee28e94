"""Exact BatchNorm recalibration for NNX models, as pure functions (jit- and vmap-friendly).

After shrinking, and for every evaluated rank setting, BatchNorm statistics
must be recomputed on training data: Decomposable-Net found per-rank
recalibration clearly better than reusing the full model's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maestro_jax.nnx import iter_modules

Array = jax.Array

__all__ = ["batch_norm_statistics", "recalibrate_batch_norm_state", "recalibrate_batch_norm"]


def _default_apply(model: nnx.Module, x: Array) -> Any:
  return model(x, train=True)


def _as_states(state) -> tuple:
  return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def batch_norm_statistics(graphdef: nnx.GraphDef, state, batches: Array | Iterable[Array], *,
                          apply: Callable[[nnx.Module, Array], Any] | None = None) -> nnx.State:
  """Exact BatchNorm statistics of a model over a set of batches, as a pure function.

  Each batch is run in training mode (every BatchNorm normalizes with its batch
  statistics, as during training); each layer's result is the plain average over
  batches of its per-batch mean and (biased) variance, i.e. PyTorch's cumulative
  moving average (``momentum=None``). Parameters and keep counts are only read,
  so the function can be jitted and vmapped over keep-count configurations.

  Args:
    graphdef: from ``nnx.split(model, ...)``.
    state: the model's state: one ``nnx.State`` or a tuple of them (everything
      ``nnx.merge(graphdef, *states)`` needs).
    batches: an array ``(n, B, ...)`` of ``n`` equally sized batches (scanned),
      or an iterable of batch arrays (unrolled; equal weight per batch).
    apply: ``apply(model, x)`` runs one training-mode forward pass; by default
      ``model(x, train=True)``.

  Returns:
    The ``nnx.BatchStat`` state (``mean``/``var`` of every BatchNorm), empty when
    the model has none.
  """
  apply = apply or _default_apply
  states = _as_states(state)

  def one(x):
    model = nnx.merge(graphdef, *states, copy=True)
    for _, module in iter_modules(model):
      if isinstance(module, nnx.BatchNorm):
        # Reset (so even NaN statistics are forgotten); with momentum 0 the running statistics become
        # exactly this batch's statistics.
        module.mean[...] = jnp.zeros_like(module.mean[...])
        module.var[...] = jnp.ones_like(module.var[...])
        module.momentum = 0.0
    apply(model, x)
    return nnx.state(model, nnx.BatchStat)

  if isinstance(batches, (jax.Array, np.ndarray)):
    batches = jnp.asarray(batches)
    if batches.ndim < 2 or batches.shape[0] < 1:
      raise ValueError(f"batches must be stacked as (n, B, ...) with n >= 1, got shape {batches.shape}")
    first = jax.eval_shape(one, batches[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

    def body(total, x):
      return jax.tree.map(jnp.add, total, one(x)), None

    total, _ = jax.lax.scan(body, zeros, batches)
    n = batches.shape[0]
  else:
    total, n = None, 0
    for x in batches:
      stats = one(jnp.asarray(x))
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
      n += 1
    if n == 0:
      raise ValueError("batch_norm_statistics needs at least one batch")
  return jax.tree.map(lambda t: t / jnp.asarray(n, t.dtype), total)


def _replace_stats(state: nnx.State, stats: nnx.State) -> nnx.State:
  new = dict(nnx.to_flat_state(stats))
  return nnx.from_flat_state([(path, new.get(path, var)) for path, var in nnx.to_flat_state(state)])


def recalibrate_batch_norm_state(graphdef: nnx.GraphDef, state, batches: Array | Iterable[Array], *,
                                 apply: Callable[[nnx.Module, Array], Any] | None = None):
  """Pure recalibration: ``state`` with every BatchNorm's running statistics recomputed.

  See :func:`batch_norm_statistics`; all other entries (parameters, keep counts)
  are returned unchanged. ``state`` may be one ``nnx.State`` or a tuple of them;
  the result has the same form. Vmap it over stacked keep counts to calibrate
  many configurations at once, e.g.::

    graphdef, params, keeps, rest = nnx.split(model, nnx.Param, maestro_jax.nnx.KeepCount, ...)
    fn = lambda keeps: recalibrate_batch_norm_state(graphdef, (params, keeps, rest), batches)[2]
    rests = jax.vmap(fn)(stacked_keeps)
  """
  stats = batch_norm_statistics(graphdef, state, batches, apply=apply)
  if isinstance(state, (tuple, list)):
    return type(state)(_replace_stats(s, stats) for s in state)
  return _replace_stats(state, stats)


def recalibrate_batch_norm(model: nnx.Module, batches: Array | Iterable[Array], *,
                           apply: Callable[[nnx.Module, Array], Any] | None = None, jit: bool = False) -> nnx.Module:
  """Resets and recomputes, in place, the running statistics of every BatchNorm of ``model``.

  The statistics become the exact average over ``batches`` of the per-batch
  statistics at the model's current keep counts (see
  :func:`batch_norm_statistics`); parameters and keep counts are unchanged.

  Args:
    model: the model (modified in place and returned).
    batches: an array ``(n, B, ...)`` or an iterable of batch arrays.
    apply: ``apply(model, x)`` runs one training-mode forward pass.
    jit: compile the computation (worth it for many batches or large models).

  Returns:
    ``model``.
  """
  graphdef, state = nnx.split(model)
  fn = lambda s, b: batch_norm_statistics(graphdef, s, b, apply=apply)
  if jit:
    fn = jax.jit(fn)
    if not isinstance(batches, (jax.Array, np.ndarray)):
      batches = list(batches)
  nnx.update(model, fn(state, batches))
  return model

