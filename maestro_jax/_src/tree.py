"""Finding factorized layers inside a model's parameter tree.

A factorized layer is any mapping node with the keys ``'a'`` and ``'b'``. Layers
are named by their dotted path, e.g. ``'features.0.conv'``; these names key the
keep-count, rank and capacity dicts used everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

PyTree = Any


def is_factorized(node: Any) -> bool:
  """Whether a node of a parameter tree is a factorized layer."""
  return isinstance(node, Mapping) and "a" in node and "b" in node and hasattr(node["a"], "shape")


def path_name(path: tuple) -> str:
  return ".".join(str(k) for k in path)


def _walk(node, path, out):
  if is_factorized(node):
    out[path] = node
  elif isinstance(node, Mapping):
    for key, child in node.items():
      _walk(child, path + (key,), out)


def layer_paths(params: PyTree) -> dict[str, tuple]:
  """Maps each factorized layer's name to its key path in ``params``."""
  found: dict[tuple, Any] = {}
  _walk(params, (), found)
  return {path_name(p): p for p in found}


def factorized_layers(params: PyTree) -> dict[str, Mapping]:
  """Maps each factorized layer's name to its params (``{'a', 'b', 'bias'?}``), in tree order."""
  found: dict[tuple, Any] = {}
  _walk(params, (), found)
  return {path_name(p): node for p, node in found.items()}


def capacities(params: PyTree) -> dict[str, int]:
  """Capacity (size of the rank axis) of every factorized layer."""
  return {name: int(layer["a"].shape[-1]) for name, layer in factorized_layers(params).items()}


def map_layers(fn: Callable[[str, Mapping], Any], params: PyTree) -> PyTree:
  """Rebuilds nested dicts with every factorized layer replaced by ``fn(name, layer)``."""

  def rebuild(node, path):
    if is_factorized(node):
      return fn(path_name(path), node)
    if isinstance(node, Mapping):
      return {k: rebuild(v, path + (k,)) for k, v in node.items()}
    return node

  return rebuild(params, ())


def check_names(names, known: Mapping[str, Any], what: str) -> None:
  """Raises a ValueError that lists the known layers when ``names`` has unknown ones."""
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; the model's factorized layers are {sorted(known)}")


def resolve_ranks(params: PyTree, ranks: Mapping[str, int] | None) -> dict[str, int]:
  """Every layer's rank as an int: the given one (checked ``0 <= rank <= capacity``) or its capacity."""
  caps = capacities(params)
  ranks = dict(ranks or {})
  check_names(ranks, caps, "layers in ranks")
  out = {}
  for name, cap in caps.items():
    rank = int(ranks.get(name, cap))
    if not 0 <= rank <= cap:
      raise ValueError(f"layer {name!r}: rank {rank} is out of range; need 0 <= rank <= capacity {cap}")
    out[name] = rank
  return out
