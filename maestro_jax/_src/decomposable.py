"""Decomposable-Net (Yaguchi et al.): a global share of all components, chosen by singular value.

:func:`decomposable_sampler` keeps a random share ``Z ~ U(low, high)`` per step;
:func:`global_budget_keeps` is its deterministic version (sweeps, deployment).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from maestro_jax._src import factorized
from maestro_jax._src import rules
from maestro_jax._src import sampling
from maestro_jax._src import tree

from maestro_jax._src.spectrum import SPECTRA
from maestro_jax._src.spectrum import layer_singular_values

Array = jax.Array
PyTree = Any

# --------------------------------------------------------------------------- Decomposable-Net


def _global_keeps(params: PyTree, fraction, ranks: Mapping[str, Any] | None, normalized: bool, spectrum: str,
                  min_keep: int) -> dict[str, Array]:
  """Keeps ``ceil(fraction * sum(ranks))`` components network-wide with the largest scores.

  Each layer's scores are its singular values (descending), optionally divided
  by its largest one. All layers' scores are concatenated (static length: the
  sum of capacities), components past a layer's rank score ``-inf``, and a
  stable descending argsort picks exactly ``K`` components (ties go to the
  earlier layer, then the earlier component). Since scores are descending
  within a layer, a layer's picked components are a prefix and its keep count
  is just how many of them were picked.
  """
  if spectrum not in SPECTRA:
    raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {list(SPECTRA)}")
  if min_keep < 0:
    raise ValueError(f"min_keep must be >= 0, got {min_keep}")
  layers = tree.factorized_layers(params)
  if not layers:
    raise ValueError("the model has no factorized layers to choose components from")
  ranks = dict(ranks or {})
  tree.check_names(ranks, layers, "layers in ranks")
  params = jax.lax.stop_gradient(params)
  names, scores, live_ranks, caps = [], [], [], []
  for name, layer in layers.items():
    cap = factorized.capacity(layer)
    rank = jnp.clip(jnp.asarray(ranks.get(name, cap), jnp.int32), 0, cap)
    s = layer_singular_values(layer, rank, spectrum=spectrum)
    if normalized:
      top = s[0]
      s = jnp.where(top > 0, s / jnp.where(top > 0, top, 1.0), 0.0)
    scores.append(jnp.where(jnp.arange(cap) < rank, s, -jnp.inf))
    names.append(name)
    live_ranks.append(rank)
    caps.append(cap)
  r = jnp.stack(live_ranks)
  total = jnp.sum(r)
  # A (num, den) pair is a static fraction carried through vmap exactly (see sweep.global_budget).
  k = rules.parts_to_rank(*fraction, total) if isinstance(fraction, tuple) else rules.fraction_to_rank(fraction, total)
  v = jnp.concatenate(scores)
  order = jnp.argsort(-v, stable=True)
  position = jnp.zeros(v.shape, jnp.int32).at[order].set(jnp.arange(v.shape[0], dtype=jnp.int32))
  picked = (position < k).astype(jnp.int32)
  keeps, start = {}, 0
  for name, rank, cap in zip(names, live_ranks, caps):
    count = jnp.sum(picked[start:start + cap])
    keeps[name] = jnp.maximum(count, jnp.minimum(min_keep, rank)).astype(jnp.int32)
    start += cap
  return keeps


def global_budget_keeps(params: PyTree, fraction: float | Array, ranks: Mapping[str, Any] | None = None, *,
                        normalized: bool = False, spectrum: str = "svd", min_keep: int = 0) -> dict[str, Array]:
  """Decomposable-Net's deterministic global budget: keep counts for a share of all components.

  ``K = ceil(fraction * sum(ranks))`` components are kept network-wide — those
  with the largest singular values across all layers (raw ``sigma_k``, or with
  ``normalized`` ``sigma_k / sigma_0`` of their layer, i.e. ``sigma_k / ||W||_2``).
  Within a layer singular values are descending, so each layer keeps a prefix;
  its keep count is the number of its singular values among the global top ``K``.
  Ties are broken by layer order, so the counts sum to exactly ``K``
  (``min_keep > 0`` can only add to that). Jittable; ``fraction`` and ``ranks``
  may be traced (vmap over ``fraction`` for a sweep).

  Args:
    params: parameter tree holding factorized layers.
    fraction: share of components to keep, in ``(0, 1]``.
    ranks: current rank per layer name (defaults to capacity); components past
      the rank are neither counted in the total nor kept.
    normalized: rank components by ``sigma_k / sigma_0`` of their layer.
    spectrum: ``'svd'`` (exact singular values of the factors' product, via
      :func:`factor_svd`) or ``'scales'`` (``||A_k|| ||B_k||``, sorted; cheaper,
      exact only for balanced SVD factors). See :func:`layer_singular_values`.
    min_keep: every layer keeps at least ``min(min_keep, rank)`` components
      (0, the paper's rule, lets a layer drop to its bias).

  Returns:
    ``{layer name: int32 scalar}`` for every factorized layer, ``0 <= keep <= rank``.
  """
  return _global_keeps(params, fraction, ranks, normalized, spectrum, min_keep)


def decomposable_sampler(low: float = 0.01, high: float = 1.0, normalized: bool = False, *,
                         spectrum: str = "svd", min_keep: int = 0) -> sampling.ParamSampler:
  """Decomposable-Net's sampler: a global share ``Z ~ U(low, high)`` of all components per step.

  The returned sampler is a :class:`maestro_jax.samplers.ParamSampler`, called
  as ``sampler(key, ranks, params)`` (as :func:`maestro_jax.training.make_train_step`
  does); it draws ``Z`` and returns :func:`global_budget_keeps` at ``Z``
  (``K = ceil(Z * sum(ranks))`` components with the largest singular values
  network-wide). Jittable with traced ranks; the singular values are
  recomputed from the (gradient-stopped) factors every call.

  Args:
    low: smallest share, ``0 < low <= high``.
    high: largest share, ``<= 1``.
    normalized: rank components by ``sigma_k / sigma_0`` of their layer.
    spectrum: ``'svd'`` (exact, default) or ``'scales'`` (cheap; see
      :func:`layer_singular_values`).
    min_keep: minimum keep count per layer (see :func:`global_budget_keeps`).

  Returns:
    ``sampler(key, ranks, params) -> {layer name: int32 scalar}``.
  """
  if not 0.0 < low <= high <= 1.0:
    raise ValueError(f"need 0 < low <= high <= 1, got low={low}, high={high}")
  if spectrum not in SPECTRA:
    raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {list(SPECTRA)}")

  def sample(key: Array, ranks: Mapping[str, Any] | None, params: PyTree) -> dict[str, Array]:
    z = jax.random.uniform(key, (), jnp.float32, low, high)
    return _global_keeps(params, z, ranks, normalized, spectrum, min_keep)

  return sampling.ParamSampler(sample)
