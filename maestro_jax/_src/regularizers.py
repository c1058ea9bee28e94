"""Hierarchical group lasso, component importance and Frobenius decay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from maestro_jax._src import tree

Array = jax.Array


def _safe_sqrt(x: Array) -> Array:
  """``sqrt`` with gradient 0 (not inf/NaN) where ``x`` is exactly zero."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def component_sq_norms(layer: Mapping[str, Array], rank: Array | int | None = None) -> tuple[Array, Array]:
  """Squared norms of each component: columns of ``A`` and rows of ``B``, shape ``(r,)`` each.

  Components at index ``>= rank`` (if given) count as zero.
  """
  a, b = layer["a"].astype(jnp.float32), layer["b"].astype(jnp.float32)
  col = jnp.sum(jnp.square(a.reshape(-1, a.shape[-1])), axis=0)
  row = jnp.sum(jnp.square(b), axis=1)
  if rank is not None:
    live = jnp.arange(col.shape[0]) < rank
    col, row = jnp.where(live, col, 0.0), jnp.where(live, row, 0.0)
  return col, row


def _tail_sums(x: Array) -> Array:
  """``out[b] = sum(x[b:])``, a reverse cumulative sum."""
  return jnp.flip(jnp.cumsum(jnp.flip(x)))


def layer_group_lasso(layer: Mapping[str, Array], rank: Array | int | None = None) -> Array:
  """``sum_b ||A[..., b:]||_F + ||B[b:, :]||_F`` over ``b = 0..r-1`` in O(d r).

  Group ``b`` holds component ``b`` and every later one, so later components sit
  in more groups and are penalized more.
  """
  col, row = component_sq_norms(layer, rank)
  return jnp.sum(_safe_sqrt(_tail_sums(col))) + jnp.sum(_safe_sqrt(_tail_sums(row)))


def group_lasso(params: Any, ranks: Mapping[str, Any] | None = None) -> Array:
  """The hierarchical group lasso summed over every factorized layer in ``params``.

  Args:
    params: a parameter tree (nested dicts) holding factorized layers.
    ranks: optional current rank per layer name; components past the rank are
      masked and left out.
  """
  ranks = ranks or {}
  total = jnp.zeros((), jnp.float32)
  for name, layer in tree.factorized_layers(params).items():
    total = total + layer_group_lasso(layer, ranks.get(name))
  return total


def layer_importance(layer: Mapping[str, Array], rank: Array | int | None = None) -> Array:
  """``s_b = ||A[..., b:]||_F * ||B[b:, :]||_F`` for ``b = 0..r-1``; non-increasing in ``b``."""
  col, row = component_sq_norms(layer, rank)
  return jnp.sqrt(_tail_sums(col)) * jnp.sqrt(_tail_sums(row))


def importance(params: Any, ranks: Mapping[str, Any] | None = None) -> dict[str, Array]:
  """:func:`layer_importance` for every factorized layer, keyed by name."""
  ranks = ranks or {}
  return {name: layer_importance(layer, ranks.get(name))
          for name, layer in tree.factorized_layers(params).items()}


def component_scales(layer: Mapping[str, Array]) -> Array:
  """``||A[..., k]|| * ||B[k]||`` per component; the singular values when the factors are balanced."""
  col, row = component_sq_norms(layer)
  return jnp.sqrt(col * row)


def frobenius_decay(params: Any) -> Array:
  """``sum ||A @ B||_F^2`` over layers, as ``trace((A^T A)(B B^T))`` without forming ``A @ B``."""
  total = jnp.zeros((), jnp.float32)
  for layer in tree.factorized_layers(params).values():
    a = layer["a"].reshape(-1, layer["a"].shape[-1]).astype(jnp.float32)
    b = layer["b"].astype(jnp.float32)
    total = total + jnp.sum((a.T @ a) * (b @ b.T))
  return total
