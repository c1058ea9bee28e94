"""Keep-count samplers for low-rank ordered dropout, and their registry.

The protocol: a sampler is a pure, jittable function ``sampler(key, ranks) ->
keeps``. ``ranks`` is a pytree of each layer's current rank (Python ints or
int32 arrays, e.g. ``{'fc1': 120, 'fc2': 84}``, possibly traced); ``keeps`` has
the same structure, int32 scalars with ``0 <= keep <= rank``. A sampler that
also needs the parameters (Decomposable-Net's, which ranks components by
singular value) is a :class:`ParamSampler`, called ``sampler(key, ranks,
params)``; :func:`draw` calls either kind.

Samplers are built by name from :data:`SAMPLERS` with :func:`make_sampler`.
Adding one is a factory in a module of its own plus an entry in that table::

  def first_half():
    return lambda key, ranks: jax.tree.map(lambda r: jnp.maximum(r // 2, 1), ranks)
  SAMPLERS['first_half'] = first_half
"""

from __future__ import annotations

from collections.abc import Callable

from maestro_jax._src.decomposable import decomposable_sampler as decomposable
from maestro_jax._src.sampling import ParamSampler
from maestro_jax._src.sampling import Sampler
from maestro_jax._src.sampling import draw
from maestro_jax._src.sampling import fixed_fraction
from maestro_jax._src.sampling import independent
from maestro_jax._src.sampling import none
from maestro_jax._src.sampling import shared_fraction
from maestro_jax._src.sampling import single_layer

__all__ = ["Sampler", "ParamSampler", "draw", "SAMPLERS", "make_sampler", "single_layer", "independent",
           "shared_fraction", "fixed_fraction", "none", "decomposable"]

SAMPLERS: dict[str, Callable[..., Sampler | ParamSampler]] = {
    "single_layer": single_layer,
    "independent": independent,
    "shared_fraction": shared_fraction,
    "fixed_fraction": fixed_fraction,
    "none": none,
    "decomposable": decomposable,
}


def make_sampler(name: str, **kwargs) -> Sampler | ParamSampler:
  """Builds a sampler by name (one of :data:`SAMPLERS`) with its keyword arguments."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
  return SAMPLERS[name](**kwargs)
