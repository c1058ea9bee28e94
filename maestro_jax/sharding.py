"""Sharded train state: parameters and optimizer state split over a device mesh (FSDP style).

The rule, for every array of the state (parameters, optimizer moments, anything
else): an array with at least ``min_size`` elements is split along its largest
axis whose size the mesh axis divides (the earlier axis on a tie, which for a
factor ``A`` of shape ``(d_in, r)`` is ``d_in``, since ``r <= d_in``); smaller
arrays, scalars and arrays with no divisible axis are replicated. The rule
reads shapes only, so it applies unchanged to a shrunk state: after
:func:`maestro_jax.shrink` slices the rank axis, :func:`shard_state` places the
new arrays by the same rule (the train step recompiles once for the new shapes
anyway). Batches stay split along the same mesh axis, as in data parallelism:
XLA gathers each parameter where a layer needs it.

Orbax saves such a state sharded and restores it onto any mesh: restore with
the target :func:`state_shardings` (see ``tests/sharding_check.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

__all__ = ["data_mesh", "partition_spec", "state_shardings", "shard_state", "DEFAULT_MIN_SIZE"]

# Arrays smaller than this are replicated: splitting them saves little memory and costs a gather each step.
DEFAULT_MIN_SIZE = 2 ** 14


def data_mesh(devices: Sequence[Any] | None = None, axis: str = "data") -> Mesh:
  """A 1-D mesh over ``devices`` (default: all), named ``axis``."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (axis,))


def partition_spec(shape: Sequence[int], num_shards: int, *, axis: str = "data",
                   min_size: int = DEFAULT_MIN_SIZE) -> PartitionSpec:
  """Where an array of ``shape`` goes: its largest axis divisible by ``num_shards`` split over ``axis``, or replicated.

  Args:
    shape: the array's shape.
    num_shards: the size of the mesh axis.
    axis: the mesh axis name.
    min_size: arrays with fewer elements are replicated.

  Returns:
    ``PartitionSpec()`` (replicated) or one with ``axis`` at the chosen dimension.
  """
  shape = tuple(int(d) for d in shape)
  if num_shards <= 1 or not shape or int(np.prod(shape)) < min_size:
    return PartitionSpec()
  candidates = [i for i, d in enumerate(shape) if d % num_shards == 0]
  if not candidates:
    return PartitionSpec()
  best = max(candidates, key=lambda i: (shape[i], -i))
  return PartitionSpec(*(axis if i == best else None for i in range(len(shape))))


def state_shardings(state: Any, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """A ``NamedSharding`` for every array leaf of ``state`` (arrays or ``ShapeDtypeStruct``) by the rule above."""
  if len(mesh.axis_names) != 1:
    raise ValueError(f"expected a 1-D mesh, got axes {mesh.axis_names}")
  axis = mesh.axis_names[0]
  size = mesh.shape[axis]
  return jax.tree.map(lambda x: NamedSharding(mesh, partition_spec(np.shape(x), size, axis=axis, min_size=min_size)),
                      state)


def shard_state(state: Any, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SIZE) -> Any:
  """``state`` placed on ``mesh`` by :func:`state_shardings` (also after a shrink changed its shapes)."""
  return jax.device_put(state, state_shardings(state, mesh, min_size=min_size))
