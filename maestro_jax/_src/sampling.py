"""Keep-count samplers for low-rank ordered dropout.

A sampler is a pure, jittable function ``sampler(key, ranks) -> keeps``: given a
PRNG key and a pytree of current per-layer ranks (Python ints or int32 arrays,
e.g. ``{'fc1': 120, 'fc2': 84}``), it returns a pytree of the same structure of
int32 scalars with ``0 <= keep <= rank``. Ranks may be traced, so a change of
rank that keeps the capacity does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from maestro_jax._src import rules

Sampler = Callable[[jax.Array, Any], Any]


class ParamSampler:
  """A sampler that also reads the parameters: ``sampler(key, ranks, params) -> keeps``.

  A distinct protocol (as optax separates ``GradientTransformationExtraArgs``):
  wrap a function of ``(key, ranks, params)`` in it, and every caller that draws
  keep counts (:func:`draw`) passes the parameters along.
  """

  def __init__(self, fn: Callable[[jax.Array, Any, Any], Any]):
    self.fn = fn

  def __call__(self, key: jax.Array, ranks: Any, params: Any) -> Any:
    return self.fn(key, ranks, params)


def draw(sampler: Sampler | ParamSampler, key: jax.Array, ranks: Any, params: Any) -> Any:
  """Keep counts from either protocol: ``sampler(key, ranks)`` or a :class:`ParamSampler`'s ``(key, ranks, params)``."""
  if isinstance(sampler, ParamSampler):
    return sampler(key, ranks, params)
  return sampler(key, ranks)


def _flat_ranks(ranks):
  leaves, treedef = jax.tree.flatten(ranks)
  if not leaves:
    raise ValueError("the model has no factorized layers to sample keep counts for")
  return jnp.stack([jnp.asarray(r, jnp.int32) for r in leaves]), treedef


def _unflatten(treedef, keeps):
  return jax.tree.unflatten(treedef, list(keeps))


def none() -> Sampler:
  """Every layer keeps its full current rank (plain factorized training)."""

  def sample(key, ranks):
    del key
    return jax.tree.map(lambda r: jnp.asarray(r, jnp.int32), ranks)

  return sample


def single_layer() -> Sampler:
  """The paper's default: one ``(layer, b)`` pair uniform over all pairs ``1 <= b <= r_l``.

  Layer ``l`` is picked with probability ``r_l / sum(r)`` and keeps ``b`` uniform
  in ``1..r_l``; every other layer keeps its full rank.
  """

  def sample(key, ranks):
    r, treedef = _flat_ranks(ranks)
    ends = jnp.cumsum(r)
    u = jax.random.randint(key, (), 0, jnp.maximum(ends[-1], 1))
    layer = jnp.sum(ends <= u)
    b = u - (ends[layer] - r[layer]) + 1
    keeps = jnp.where(jnp.arange(r.shape[0]) == layer, b, r)
    return _unflatten(treedef, keeps.astype(jnp.int32))

  return sample


def independent(min_fraction: float | None = None) -> Sampler:
  """Every layer draws its own keep count uniform in ``low_l..r_l``.

  ``low_l`` is 1 (the paper's range), or ``fraction_to_rank(min_fraction, r_l)``
  so that training spends no steps on truncations too small to deploy.
  """
  if min_fraction is not None:
    if not 0.0 < min_fraction <= 1.0:
      raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    num, den = rules.fraction_parts(min_fraction)

  def sample(key, ranks):
    r, treedef = _flat_ranks(ranks)
    low = jnp.ones_like(r) if min_fraction is None else rules.parts_to_rank(num, den, r)
    u = jax.random.uniform(key, r.shape)
    keeps = jnp.minimum(low + jnp.floor(u * (r - low + 1)).astype(jnp.int32), r)
    return _unflatten(treedef, keeps)

  return sample


def shared_fraction(fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0)) -> Sampler:
  """FjORD: one ``p`` uniform over ``fractions``; every layer keeps ``fraction_to_rank(p, r_l)``."""
  fractions = tuple(float(p) for p in fractions)
  if not fractions or not all(0.0 < p <= 1.0 for p in fractions):
    raise ValueError(f"fractions must be non-empty and in (0, 1], got {fractions}")
  # Each fraction as an exact ratio, picked by a traced index: the same rule as static fractions.
  nums, dens = (jnp.asarray(v, jnp.int32) for v in zip(*(rules.fraction_parts(p) for p in fractions)))

  def sample(key, ranks):
    r, treedef = _flat_ranks(ranks)
    i = jax.random.randint(key, (), 0, len(fractions))
    return _unflatten(treedef, rules.parts_to_rank(nums[i], dens[i], r))

  return sample


def fixed_fraction(fraction: float) -> Sampler:
  """Pufferfish-style baseline: every layer always keeps ``fraction_to_rank(fraction, r_l)``."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")

  def sample(key, ranks):
    del key
    r, treedef = _flat_ranks(ranks)
    return _unflatten(treedef, rules.fraction_to_rank(fraction, r))

  return sample
