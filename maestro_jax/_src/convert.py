"""One dense -> factorized converter for parameter trees, used by both skins and the baselines.

A dense layer is a node ``{'kernel': 2-D (d_in, d_out) or 4-D HWIO, 'bias'?, ...}``;
an attention layer is a node with ``query``, ``key``, ``value`` and ``out``
sub-nodes whose kernels are Flax's 3-D DenseGeneral kernels. Each becomes a
factorized layer by SVD (:func:`maestro_jax.factorize_kernel`): exact at full
rank, the best approximation of its rank otherwise. ``maestro_jax.nnx.factorize``
(modules), ``maestro_jax.linen.factorize_params`` and
``maestro_jax.factorize_dense_params`` (trees) all convert through here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from maestro_jax._src import factorized
from maestro_jax._src import kinds
from maestro_jax._src import rules
from maestro_jax._src import tree

PyTree = Any
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")


def attention_kernel_matrix(which: str, kernel):
  """A Flax attention projection's DenseGeneral kernel as a matrix.

  ``query``/``key``/``value`` kernels are ``(d, heads, head_dim)`` -> ``(d, heads * head_dim)``;
  the ``out`` kernel is ``(heads, head_dim, d)`` -> ``(heads * head_dim, d)``.
  """
  if kernel.ndim == 2:
    return kernel
  return kernel.reshape(-1, kernel.shape[-1]) if which == "out" else kernel.reshape(kernel.shape[0], -1)


def is_dense_node(node: Any) -> bool:
  """A plain layer node: a ``kernel`` of a known kind (2-D dense, 4-D conv)."""
  return (isinstance(node, Mapping) and "kernel" in node and hasattr(node["kernel"], "shape")
          and kinds.find_kind(node) is not None)


def is_attention_node(node: Any) -> bool:
  """A Flax attention node: ``query``/``key``/``value``/``out`` sub-nodes with 3-D kernels."""
  return isinstance(node, Mapping) and all(
      isinstance(node.get(k), Mapping) and getattr(node[k].get("kernel"), "ndim", 0) == 3
      for k in ATTENTION_PROJECTIONS)


def dense_layers(params: PyTree) -> list[str]:
  """Dotted names of the layers :func:`factorize_tree` converts, in tree order (attention projections included)."""
  found = []

  def walk(node, path):
    if is_dense_node(node):
      found.append(tree.path_name(path))
    elif is_attention_node(node):
      found.extend(tree.path_name(path + (k,)) for k in ATTENTION_PROJECTIONS)
    elif isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, path + (key,))

  walk(params, ())
  return found


def layer_rank(full: int, name: str, *, rank_fraction: float | None, ranks: Mapping[str, int]) -> int | None:
  """The rank a converted layer gets: ``ranks[name]``, else ``fraction_to_rank(rank_fraction, full)``, else full (None)."""
  if name in ranks:
    return int(ranks[name])
  if rank_fraction is None:
    return None
  return rules.fraction_to_rank(rank_fraction, full)


def check_fraction(rank_fraction: float | None) -> None:
  if rank_fraction is not None and not 0.0 < rank_fraction <= 1.0:
    raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}")


def _general_as_matrices(params: PyTree, general: Mapping[str, int]) -> PyTree:
  """The tree with each named DenseGeneral kernel reshaped to its matrix view (and its bias flattened)."""
  seen = set()

  def rebuild(node, path):
    name = tree.path_name(path)
    if name in general and isinstance(node, Mapping) and hasattr(node.get("kernel"), "shape"):
      kernel, n_in = node["kernel"], general[name]
      if not 1 <= n_in < kernel.ndim:
        raise ValueError(f"layer {name!r}: {n_in} contracted axes do not fit its kernel of shape {kernel.shape}")
      seen.add(name)
      out = dict(node)
      out["kernel"] = kernel.reshape(math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:]))
      if node.get("bias") is not None:
        out["bias"] = node["bias"].reshape(-1)
      return out
    if isinstance(node, Mapping):
      return {k: rebuild(v, path + (k,)) for k, v in node.items()}
    return node

  out = rebuild(params, ())
  missing = sorted(set(general) - seen)
  if missing:
    raise ValueError(f"unknown DenseGeneral layers {missing}: no such node with a kernel")
  return out


def factorize_tree(params: PyTree, *, rank_fraction: float | None = None, ranks: Mapping[str, int] | None = None,
                   skip: Sequence[str] = (), skip_first: int = 0, layer_order: Sequence[str] | None = None,
                   general: Mapping[str, int] | None = None) -> PyTree:
  """Factorizes every dense, conv and attention layer of a parameter tree by SVD.

  Every name is checked before anything is converted.

  Args:
    params: nested dicts (an NNX pure dict or a Linen ``params`` collection).
    rank_fraction: keep ``fraction_to_rank(rank_fraction, full_rank)``
      components of every layer; None keeps all (exact).
    ranks: explicit rank per layer name, overriding ``rank_fraction``.
    skip: layer names to leave dense (a whole attention node, or one of its projections).
    skip_first: leave the first ``skip_first`` layers (in ``layer_order``) dense.
    layer_order: names giving the order ``skip_first`` counts in; tree order by default.
    general: DenseGeneral layers, ``{name: number of contracted axes}``: the
      kernel ``(in..., out...)`` is converted as the matrix
      ``(prod(in), prod(out))`` and its bias flattened (apply it with
      ``maestro_jax.linen.DenseGeneral``). A kernel's shape alone does not
      say where its input axes end, hence the explicit count.

  Returns:
    The tree with the chosen layers as ``{'a', 'b', 'bias'?}``; everything else
    (and other keys next to a kernel) passes through.
  """
  check_fraction(rank_fraction)
  general = dict(general or {})
  if general:
    params = _general_as_matrices(params, general)
  names = dense_layers(params)
  attention = {name.rpartition(".")[0] for name in names if name.rpartition(".")[2] in ATTENTION_PROJECTIONS}
  known = dict.fromkeys(names + sorted(attention))
  ranks = dict(ranks or {})
  tree.check_names(ranks, dict.fromkeys(names), "layers in ranks")
  tree.check_names(skip, known, "layers in skip")
  order = names if layer_order is None else list(layer_order)
  tree.check_names(order, known, "layers in layer_order")
  if skip_first < 0:
    raise ValueError(f"skip_first must be >= 0, got {skip_first}")
  keep_dense = set(order[:skip_first]) | set(skip)

  def convert(node, name, kernel, bias):
    full = rules.full_rank(kernel.shape)
    rank = layer_rank(full, name, rank_fraction=rank_fraction, ranks=ranks)
    out = {k: v for k, v in node.items() if k not in ("kernel", "bias")}
    out.update(factorized.factorize_kernel(kernel, bias, rank, name=name))
    return out

  def rebuild(node, path):
    name = tree.path_name(path)
    if name in keep_dense:
      return node
    if is_dense_node(node):
      return convert(node, name, node["kernel"], node.get("bias"))
    if is_attention_node(node):
      out = dict(node)
      for which in ATTENTION_PROJECTIONS:
        sub, sub_name = node[which], f"{name}.{which}" if name else which
        kernel, bias = attention_kernel_matrix(which, sub["kernel"]), sub.get("bias")
        bias = None if bias is None else bias.reshape(-1)
        if sub_name in keep_dense:  # a merged (dense) projection of the factorized attention layer
          out[which] = {"kernel": kernel, **({} if bias is None else {"bias": bias})}
        else:
          out[which] = convert(sub, sub_name, kernel, bias)
      return out
    if isinstance(node, Mapping):
      return {k: rebuild(v, path + (k,)) for k, v in node.items()}
    return node

  return rebuild(params, ())
