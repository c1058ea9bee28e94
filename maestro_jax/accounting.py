"""Exact parameter and multiply-accumulate (MAC) counts of factorized models.

Every weight layer is counted three ways at its keep count ``k``:

* ``dense``: the equivalent dense kernel, ``prod(kernel) + bias`` parameters;
* ``factorized``: the kept factors, ``size(A[..., :k]) + size(B[:k]) + bias``;
* ``merged``: how the layer is deployed, the smaller of the two. A layer whose
  factors are not smaller than its kernel, ``(d_in + d_out) k >= d_in d_out``
  (``d_in = kh * kw * c_in`` for a convolution), is merged into one dense kernel.

MACs are per example. A layer applied at ``P`` output positions (``H_out *
W_out`` for a convolution, the number of tokens for a dense layer on a
sequence, 1 for a dense layer on a vector) costs ``P * d_in * d_out`` dense and
``P * (d_in + d_out) * k`` factorized; biases, norms, activations, pooling and
the attention score/value products (which have no weights) are not counted.
:func:`layer_positions` measures ``P`` for every layer by tracing the model
once with :func:`jax.eval_shape`.

Plain ``nnx.Linear``/``nnx.Conv``/``nnx.LinearGeneral`` layers (any dict with a
``'kernel'``) are reported as non-factorized layers, counted the same in all
three columns; every other parameter (norm scales, embeddings, positional
tables) is added to the totals as ``other_params``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maestro_jax import nnx as mnnx
from maestro_jax._src import kinds
from maestro_jax._src import recording
from maestro_jax._src import rules
from maestro_jax._src import tree

__all__ = ["LayerCount", "Report", "count", "layer_positions", "format_table"]


@dataclasses.dataclass(frozen=True)
class LayerCount:
  """Counts of one weight layer.

  Attributes:
    name: dotted layer name.
    kind: ``'dense'`` or ``'conv'`` (see :data:`maestro_jax.kinds.KINDS`).
    factorized: whether the layer is stored as factors ``A``, ``B``.
    kernel_shape: shape of the (equivalent) dense kernel.
    d_in: input size of the matrix view, ``prod(kernel_shape[:-1])`` (for an
      ``nnx.LinearGeneral`` counted from a model, the product of its input features).
    d_out: output size, ``kernel_shape[-1]`` (product of the output features).
    capacity: size of the rank axis (None for a plain layer).
    keep: kept components ``k`` (None for a plain layer).
    bias: bias parameters.
    positions: output positions per example (None when not given).
    params_dense, params_factorized, params_merged: parameter counts.
    macs_dense, macs_factorized, macs_merged: MACs per example (None without positions).
    merged_as: ``'dense'`` or ``'factorized'``, the form the merged count uses.
  """

  name: str
  kind: str
  factorized: bool
  kernel_shape: tuple[int, ...]
  d_in: int
  d_out: int
  capacity: int | None
  keep: int | None
  bias: int
  positions: int | None
  params_dense: int
  params_factorized: int
  params_merged: int
  macs_dense: int | None
  macs_factorized: int | None
  macs_merged: int | None
  merged_as: str


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-layer counts plus the parameters outside weight layers.

  Totals include ``other_params`` (norms, embeddings, ...); the MAC totals are
  None when no positions were given.
  """

  layers: tuple[LayerCount, ...]
  other_params: int

  def _total(self, field: str, extra: int) -> int | None:
    values = [getattr(layer, field) for layer in self.layers]
    if any(v is None for v in values):
      return None
    return sum(values) + extra

  @property
  def params_dense(self) -> int:
    return self._total("params_dense", self.other_params)

  @property
  def params_factorized(self) -> int:
    return self._total("params_factorized", self.other_params)

  @property
  def params_merged(self) -> int:
    return self._total("params_merged", self.other_params)

  @property
  def macs_dense(self) -> int | None:
    return self._total("macs_dense", 0)

  @property
  def macs_factorized(self) -> int | None:
    return self._total("macs_factorized", 0)

  @property
  def macs_merged(self) -> int | None:
    return self._total("macs_merged", 0)

  @property
  def totals(self) -> dict[str, int | None]:
    """All totals keyed ``params_dense``, ..., ``macs_merged``."""
    return {f"{what}_{form}": getattr(self, f"{what}_{form}") for what in ("params", "macs")
            for form in ("dense", "factorized", "merged")}

  def layer(self, name: str) -> LayerCount:
    """The counts of the named layer."""
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(f"no layer {name!r}; layers are {[l.name for l in self.layers]}")

  def to_dict(self) -> dict[str, Any]:
    """Plain dicts (JSON-friendly)."""
    return {"layers": [dataclasses.asdict(l) for l in self.layers], "other_params": self.other_params,
            "totals": self.totals}


# ------------------------------------------------------------------------------------------- counting


def _size(shape: Sequence[int]) -> int:
  return int(math.prod(int(d) for d in shape))


def _is_plain(node: Any) -> bool:
  return isinstance(node, Mapping) and "kernel" in node and hasattr(node["kernel"], "shape")


def _walk(node: Any, path: tuple, layers: list, other: list) -> None:
  if tree.is_factorized(node):
    layers.append((tree.path_name(path), node, True))
  elif _is_plain(node):
    layers.append((tree.path_name(path), node, False))
    # anything next to the kernel other than its bias is counted as "other"
    for key, value in node.items():
      if key not in ("kernel", "bias"):
        _walk(value, path + (key,), layers, other)
  elif isinstance(node, Mapping):
    for key, child in node.items():
      _walk(child, path + (key,), layers, other)
  elif hasattr(node, "shape"):
    other.append(_size(node.shape))


def _params_tree(params_or_model: Any) -> Any:
  if isinstance(params_or_model, nnx.Module):
    return nnx.to_pure_dict(nnx.state(params_or_model, nnx.Param))
  if isinstance(params_or_model, nnx.State):
    return nnx.to_pure_dict(params_or_model)
  return params_or_model


def _keep_int(value: Any, name: str) -> int:
  try:
    return int(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"layer {name!r}: keep count must be a concrete int, got {value!r}") from e


def _layer_count(name: str, node: Mapping, factorized: bool, keep: int | None, positions: int | None,
                 dims: tuple[int, int] | None = None) -> LayerCount:
  bias = _size(node["bias"].shape) if node.get("bias") is not None else 0
  if factorized:
    a_shape, b_shape = tuple(node["a"].shape), tuple(node["b"].shape)
    kernel_shape = a_shape[:-1] + (b_shape[-1],)
    capacity = a_shape[-1]
    keep = capacity if keep is None else keep
    if not 0 <= keep <= capacity:
      raise ValueError(f"layer {name!r}: keep count {keep} is out of range; need 0 <= keep <= capacity {capacity}")
  else:
    kernel_shape = tuple(node["kernel"].shape)
    capacity = keep = None
  d_in, d_out = dims if dims is not None else (_size(kernel_shape[:-1]), int(kernel_shape[-1]))
  # A plain DenseGeneral kernel (3-D and more) has no factorized kind; it is counted as its matrix view.
  kind = (kinds.find_kind(node) or kinds.KINDS["dense"]).name
  dense_w = _size(kernel_shape)
  if factorized:
    fact_w = rules.factorized_weights(d_in, d_out, keep)
    merged_as = "dense" if rules.should_merge(d_in, d_out, keep) else "factorized"
  else:
    fact_w, merged_as = dense_w, "dense"
  merged_w = dense_w if merged_as == "dense" else fact_w
  macs = (None, None, None) if positions is None else tuple(positions * w for w in (dense_w, fact_w, merged_w))
  return LayerCount(name=name, kind=kind, factorized=factorized, kernel_shape=kernel_shape, d_in=d_in,
                    d_out=d_out, capacity=capacity, keep=keep, bias=bias, positions=positions,
                    params_dense=dense_w + bias, params_factorized=fact_w + bias, params_merged=merged_w + bias,
                    macs_dense=macs[0], macs_factorized=macs[1], macs_merged=macs[2], merged_as=merged_as)


def _general_dims(model: nnx.Module) -> dict[str, tuple[int, int]]:
  """``(d_in, d_out)`` of every ``nnx.LinearGeneral`` (whose kernel shape alone does not tell them)."""
  return {tree.path_name(path): (_size(m.in_features), _size(m.out_features))
          for path, m in mnnx.iter_modules(model) if path and isinstance(m, nnx.LinearGeneral)}


def count(params_or_model: Any, keeps: Mapping[str, Any] | None = None,
          positions: Mapping[str, int] | None = None) -> Report:
  """Counts parameters and MACs of every layer at the given keep counts.

  Args:
    params_or_model: an ``nnx.Module`` (its ``nnx.Param`` state is counted), an
      ``nnx.State`` or a nested dict of parameters (e.g. ``nnx.to_pure_dict``).
    keeps: keep count per factorized layer name (concrete ints); layers not named
      are counted at full capacity. Pass ``maestro_jax.nnx.keep_counts(model)``
      for a model's current keep counts.
    positions: output positions per example for every weight layer, from
      :func:`layer_positions`; without it MACs are None.

  Returns:
    A :class:`Report`.

  Raises:
    ValueError: for keep counts of unknown or non-factorized layers, keep counts
      out of range, or positions missing a layer.
  """
  params = _params_tree(params_or_model)
  found: list = []
  other: list = []
  _walk(params, (), found, other)
  keeps = dict(keeps or {})
  factorized_names = {name: node for name, node, is_fact in found if is_fact}
  tree.check_names(keeps, factorized_names, "layers in keep counts")
  if positions is not None:
    missing = sorted(name for name, _, _ in found if name not in positions)
    if missing:
      raise ValueError(f"positions lack layers {missing}; they have {sorted(positions)}")
  dims = _general_dims(params_or_model) if isinstance(params_or_model, nnx.Module) else {}
  layers = []
  for name, node, is_fact in found:
    keep = _keep_int(keeps[name], name) if name in keeps else None
    pos = None if positions is None else int(positions[name])
    layers.append(_layer_count(name, node, is_fact, keep, pos, dims.get(name)))
  return Report(layers=tuple(layers), other_params=int(sum(other)))


# ------------------------------------------------------------------------------------------ positions


def _out_features(module: nnx.Module) -> int:
  if isinstance(module, mnnx.FactorizedModule):
    return int((module.kernel if module.merged else module.b)[...].shape[-1])
  if isinstance(module, nnx.LinearGeneral):
    return _size(module.out_features)
  return int(module.out_features)


_WEIGHT_LAYERS = (mnnx.FactorizedModule, nnx.Linear, nnx.LinearGeneral, nnx.Conv)


def layer_positions(model: nnx.Module, input_shape: Sequence[int], *, dtype=jnp.float32,
                    apply: Callable[[nnx.Module, jax.Array], Any] | None = None) -> dict[str, int]:
  """Output positions per example of every weight layer, found by tracing the model once.

  The model is run abstractly (:func:`jax.eval_shape`, no FLOPs, the model is
  not modified) on one example of ``input_shape`` with a batch dimension of 1.
  A layer's positions are its output size divided by its output features:
  ``H_out * W_out`` for a convolution, the product of the leading non-batch
  dimensions for a dense layer (tokens), summed over calls when a layer is
  applied more than once, 0 when it is never called.

  Args:
    model: the model (factorized or plain layers).
    input_shape: shape of one example, without the batch dimension, e.g.
      ``(28, 28, 1)``; ``(L,)`` with ``dtype=jnp.int32`` for token ids.
    dtype: input dtype.
    apply: ``apply(model, x)`` runs the model; by default ``model(x)``.

  Returns:
    ``{layer name: positions}`` for every factorized layer and every
    ``nnx.Linear``/``nnx.LinearGeneral``/``nnx.Conv`` (the names :func:`count` uses).
  """
  graphdef, state = nnx.split(model)
  calls = recording.record_calls(
      lambda s: nnx.merge(graphdef, s, copy=True), state,
      jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in input_shape), dtype),
      layers=lambda m: {tree.path_name(path): module for path, module in mnnx.iter_modules(m)
                        if path and isinstance(module, _WEIGHT_LAYERS)},
      observe=lambda module, x, out: _size(out.shape) // _out_features(module),
      apply=apply or (lambda m, x: m(x)))
  return {name: sum(positions) for name, positions in calls.items()}


# --------------------------------------------------------------------------------------------- table


def _fmt(value: int | None) -> str:
  return "-" if value is None else f"{value:,}"


def format_table(report: Report) -> str:
  """A fixed-width text table of a :class:`Report`, one row per layer and the totals."""
  header = ("layer", "kind", "d_in", "d_out", "keep/cap", "pos", "params dense", "params fact",
            "params merged", "MACs dense", "MACs fact", "MACs merged")
  rows = []
  for l in report.layers:
    kind = l.kind + ("" if l.factorized else " (plain)")
    keep = f"{l.keep}/{l.capacity}" if l.factorized else "-"
    merged = _fmt(l.params_merged) + ("*" if l.factorized and l.merged_as == "dense" else "")
    rows.append((l.name, kind, str(l.d_in), str(l.d_out), keep, _fmt(l.positions), _fmt(l.params_dense),
                 _fmt(l.params_factorized), merged, _fmt(l.macs_dense), _fmt(l.macs_factorized),
                 _fmt(l.macs_merged)))
  rows.append(("(other params)", "", "", "", "", "", _fmt(report.other_params), _fmt(report.other_params),
               _fmt(report.other_params), "", "", ""))
  rows.append(("total", "", "", "", "", "", _fmt(report.params_dense), _fmt(report.params_factorized),
               _fmt(report.params_merged), _fmt(report.macs_dense), _fmt(report.macs_factorized),
               _fmt(report.macs_merged)))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  sep = "-" * len(line(header))
  out = [line(header), sep] + [line(r) for r in rows[:-1]] + [sep, line(rows[-1])]
  out.append("* merged into one dense kernel: (d_in + d_out) * keep >= d_in * d_out")
  return "\n".join(out)
