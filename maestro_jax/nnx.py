"""Flax NNX layers over the functional core, plus model-level helpers.

Factors live in ``nnx.Param`` (so an optimizer over ``nnx.Param`` trains them);
the keep count lives in a :class:`KeepCount` variable, so a train step can set
the keep counts of the whole model from one dict and a sweep can vmap over a
stacked one::

  model = MyModel(rngs=nnx.Rngs(0))           # built from maestro_jax.nnx layers
  graphdef, params, keeps = nnx.split(model, nnx.Param, maestro_jax.nnx.KeepCount)
  maestro_jax.nnx.set_keep_counts(model, {'fc1': 10, 'fc2': 5})

Layer names are dotted module paths (``'blocks.0.mlp'``), the same names the
functional core gives to ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maestro_jax._src import convert
from maestro_jax._src import factorized as core
from maestro_jax._src import rules
from maestro_jax._src import tree

__all__ = ["KeepCount", "FactorizedModule", "iter_modules", "Linear", "LinearGeneral", "Conv", "MultiHeadAttention",
           "factorized_layers", "capacities", "keep_counts", "set_keep_counts", "reset_keep_counts", "factorize"]


# Marks an attribute as pytree data even when it is None (flax >= 0.12 needs this to later hold a Param).
_data = getattr(nnx, "data", lambda value: value)


def get_value(variable: nnx.Variable):
  """A variable's value (``get_value`` on flax >= 0.12, where ``.value`` is deprecated)."""
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def set_value(variable: nnx.Variable, value) -> None:
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:
    variable.value = value


def iter_modules(model):
  """``(path, module)`` of every sub-module, on any flax version."""
  if hasattr(nnx, "iter_modules"):
    return nnx.iter_modules(model)
  return model.iter_modules()


class KeepCount(nnx.Variable):
  """The keep count of one factorized layer: an int32 scalar, ``0 <= keep <= capacity``."""


class FactorizedModule(nnx.Module):
  """Base of every factorized NNX layer (:class:`Linear`, :class:`LinearGeneral`, :class:`Conv`): factors, bias, keep count."""

  def _set_factors(self, params: core.Params) -> None:
    self.a = nnx.Param(params["a"])
    self.b = nnx.Param(params["b"])
    self.bias = _data(nnx.Param(params["bias"]) if "bias" in params else None)
    self.keep = KeepCount(jnp.asarray(params["a"].shape[-1], jnp.int32))

  def factor_params(self) -> core.Params:
    """The layer's parameters as the functional core's dict (factors, or a merged ``kernel``)."""
    if self.merged:
      params = {"kernel": get_value(self.kernel)}
    else:
      params = {"a": get_value(self.a), "b": get_value(self.b)}
    if self.bias is not None:
      params["bias"] = get_value(self.bias)
    return params

  @property
  def merged(self) -> bool:
    return hasattr(self, "kernel")

  @property
  def capacity(self) -> int:
    if self.merged:
      return core.full_rank(get_value(self.kernel).shape)
    return int(get_value(self.a).shape[-1])

  def merge(self, keep: int | None = None) -> None:
    """Replaces the factors, in place, by one dense ``kernel = A[..., :keep] @ B[:keep]``.

    Use it where the factorized form is not smaller; the layer then ignores keep counts.
    """
    if self.merged:
      return
    kernel = core.dense_kernel(self.factor_params(), keep)
    del self.a, self.b
    self.kernel = nnx.Param(kernel)
    set_value(self.keep, jnp.asarray(self.capacity, jnp.int32))

  def _keep(self, keep):
    return get_value(self.keep) if keep is None else keep


class Linear(FactorizedModule):
  """Factorized dense layer ``y = ((x @ A) * mask) @ B + bias``.

  Input ``(..., in_features)``, output ``(..., out_features)``.

  Args:
    in_features: input features.
    out_features: output features.
    rank: capacity of the rank axis; defaults to ``min(in_features, out_features)``.
    use_bias: add a bias.
    init_method: ``'svd'`` (a dense init split by SVD, components ordered) or ``'random'``.
    kernel_init: initializer of the dense kernel for ``'svd'``.
    bias_init: initializer of the bias.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: matmul precision.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    init_scale: default weight scale, ``'lecun'`` or ``'pytorch'`` (see :func:`maestro_jax.init_layer`).
    compute_path: ``'auto'`` (the cheaper path for the call's shapes), ``'factors'``
      or ``'kernel'`` (see :func:`maestro_jax.dense`).
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int | None = None, use_bias: bool = True,
               init_method: str = "svd", kernel_init=None, bias_init=None, dtype=None, param_dtype=jnp.float32,
               precision=None, rngs: nnx.Rngs, init_scale: str = "lecun", compute_path: str = "auto"):
    self.in_features, self.out_features = in_features, out_features
    self.dtype, self.precision, self.compute_path = dtype, precision, compute_path
    self._set_factors(core.init_layer(rngs.params(), (in_features, out_features), rank, use_bias=use_bias,
                                init_method=init_method, kernel_init=kernel_init, bias_init=bias_init,
                                param_dtype=param_dtype, name=self._name(), init_scale=init_scale))

  def _name(self) -> str:
    return f"Linear({self.in_features}->{self.out_features})"

  def __call__(self, x: jax.Array, keep: core.KeepCount = None) -> jax.Array:
    """Applies the layer; ``keep`` overrides the layer's :class:`KeepCount` for this call."""
    return core.dense(self.factor_params(), x, self._keep(keep), dtype=self.dtype, precision=self.precision,
                      name=self._name(), compute_path=self.compute_path)

  @classmethod
  def from_kernel(cls, kernel: jax.Array, bias: jax.Array | None = None, *, rank: int | None = None,
                  dtype=None, precision=None, compute_path: str = "auto") -> Linear:
    """A layer computing ``x @ kernel + bias`` (exactly at full rank), factorized by SVD."""
    layer = cls(kernel.shape[0], kernel.shape[1], rank=1, use_bias=False, init_method="random", dtype=dtype,
                precision=precision, rngs=nnx.Rngs(0), compute_path=compute_path)
    layer._set_factors(core.factorize_kernel(kernel, bias, rank, name=layer._name()))
    return layer


class LinearGeneral(FactorizedModule):
  """Factorized ``nnx.LinearGeneral``: contracts ``axis`` (of sizes ``in_features``) into ``out_features`` axes.

  Stored as a dense layer over the flattened axes (``A`` is ``(prod(in_features), r)``,
  ``B`` is ``(r, prod(out_features))``, ``bias`` flat), so sweeps, export and
  accounting treat it as a dense layer. :func:`factorize` converts an
  ``nnx.LinearGeneral`` with the same outputs.

  Args:
    in_features: size or sizes of the contracted axes.
    out_features: size or shape of the output feature axes.
    axis: contracted axis or axes of the input.
    rank, use_bias, init_method, kernel_init, bias_init, dtype, param_dtype,
      precision, rngs, init_scale, compute_path: as in :class:`Linear`.
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
               axis: int | Sequence[int] = -1, rank: int | None = None, use_bias: bool = True,
               init_method: str = "svd", kernel_init=None, bias_init=None, dtype=None, param_dtype=jnp.float32,
               precision=None, rngs: nnx.Rngs, init_scale: str = "lecun", compute_path: str = "auto"):
    self.in_features = (in_features,) if isinstance(in_features, int) else tuple(in_features)
    self.out_features = (out_features,) if isinstance(out_features, int) else tuple(out_features)
    self.axis = axis
    if len(self.in_features) != (1 if isinstance(axis, int) else len(tuple(axis))):
      raise ValueError(f"LinearGeneral: in_features {self.in_features} and axis {axis} differ in length")
    self.dtype, self.precision, self.compute_path = dtype, precision, compute_path
    shape = (math.prod(self.in_features), math.prod(self.out_features))
    self._set_factors(core.init_layer(rngs.params(), shape, rank, use_bias=use_bias, init_method=init_method,
                                      kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype,
                                      name=self._name(), init_scale=init_scale))

  def _name(self) -> str:
    return f"LinearGeneral({self.in_features}->{self.out_features})"

  def __call__(self, x: jax.Array, keep: core.KeepCount = None) -> jax.Array:
    """Applies the layer; ``keep`` overrides the layer's :class:`KeepCount` for this call."""
    return core.dense_general(self.factor_params(), x, self._keep(keep), axis=self.axis, features=self.out_features,
                              dtype=self.dtype, precision=self.precision, name=self._name(),
                              compute_path=self.compute_path)

  @classmethod
  def from_module(cls, module: nnx.LinearGeneral, *, rank: int | None = None,
                  compute_path: str = "auto") -> LinearGeneral:
    """The factorized twin of an ``nnx.LinearGeneral`` (exact at full rank), by SVD of its flattened kernel."""
    layer = cls(module.in_features, module.out_features, axis=module.axis, rank=1, use_bias=False,
                init_method="random", dtype=module.dtype, precision=module.precision, rngs=nnx.Rngs(0),
                compute_path=compute_path)
    kernel = get_value(module.kernel)
    matrix = kernel.reshape(math.prod(layer.in_features), math.prod(layer.out_features))
    layer._set_factors(core.factorize_kernel(matrix, _bias(module), rank, name=layer._name()))
    return layer


class Conv(FactorizedModule):
  """Factorized 2-D convolution: a ``kh x kw`` conv ``in -> r`` then a 1x1 conv ``r -> out``.

  Input ``(..., H, W, in_features)`` (NHWC), output ``(..., H', W', out_features)``.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: int or pair.
    strides: int or pair.
    padding: ``'SAME'``, ``'VALID'``, an int, or pairs.
    kernel_dilation: int or pair.
    feature_group_count: must be 1 (grouped convolutions are not supported).
    rank: capacity; defaults to ``min(kh * kw * in_features, out_features)``.
    use_bias, init_method, kernel_init, bias_init, dtype, param_dtype, precision, rngs,
      init_scale, compute_path: as in :class:`Linear`.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, padding: core.Padding = "SAME",
               kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1, rank: int | None = None,
               use_bias: bool = True, init_method: str = "svd", kernel_init=None, bias_init=None, dtype=None,
               param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs, init_scale: str = "lecun",
               compute_path: str = "auto"):
    kernel_size = core.int_pairs(kernel_size, 2, "kernel_size", "Conv")
    if feature_group_count != 1:
      raise ValueError(f"Conv({in_features}->{out_features}): feature_group_count={feature_group_count} is not "
                       "supported; factorized convolutions need feature groups of 1")
    self.in_features, self.out_features, self.kernel_size = in_features, out_features, kernel_size
    self.strides, self.padding, self.kernel_dilation = strides, padding, kernel_dilation
    self.dtype, self.precision, self.compute_path = dtype, precision, compute_path
    self._set_factors(core.init_layer(rngs.params(), kernel_size + (in_features, out_features), rank,
                                use_bias=use_bias, init_method=init_method, kernel_init=kernel_init, bias_init=bias_init,
                                param_dtype=param_dtype, name=self._name(), init_scale=init_scale))

  def _name(self) -> str:
    return f"Conv({self.in_features}->{self.out_features}, {self.kernel_size[0]}x{self.kernel_size[1]})"

  def __call__(self, x: jax.Array, keep: core.KeepCount = None) -> jax.Array:
    """Applies the layer; ``keep`` overrides the layer's :class:`KeepCount` for this call."""
    return core.conv(self.factor_params(), x, self._keep(keep), strides=self.strides, padding=self.padding,
                     dilation=self.kernel_dilation, dtype=self.dtype, precision=self.precision,
                     name=self._name(), compute_path=self.compute_path)

  @classmethod
  def from_kernel(cls, kernel: jax.Array, bias: jax.Array | None = None, *, rank: int | None = None,
                  strides=1, padding: core.Padding = "SAME", kernel_dilation=1, dtype=None,
                  precision=None, compute_path: str = "auto") -> Conv:
    """A layer computing the convolution with an HWIO ``kernel``, factorized by SVD."""
    if kernel.ndim != 4:
      raise ValueError(f"Conv.from_kernel: kernel must be 4-D (kh, kw, c_in, c_out), got shape {kernel.shape}")
    kh, kw, c_in, c_out = kernel.shape
    layer = cls(c_in, c_out, (kh, kw), strides, padding=padding, kernel_dilation=kernel_dilation, rank=1,
                use_bias=False, init_method="random", dtype=dtype, precision=precision, rngs=nnx.Rngs(0),
                compute_path=compute_path)
    layer._set_factors(core.factorize_kernel(kernel, bias, rank, name=layer._name()))
    return layer


class MultiHeadAttention(nnx.Module):
  """Multi-head attention whose ``query``, ``key``, ``value`` and ``out`` projections are :class:`Linear`.

  Inputs ``(..., q_len, in_features)`` and optionally ``(..., kv_len, in_kv_features)``;
  output ``(..., q_len, out_features)``. Each projection has its own keep count.

  Args:
    num_heads: number of heads; must divide ``qkv_features``.
    in_features: query input features.
    qkv_features: projection width (``num_heads * head_dim``); defaults to ``in_features``.
    out_features: output features; defaults to ``in_features``.
    in_kv_features: key/value input features; defaults to ``in_features``.
    rank: optional capacity of every projection.
    use_bias, init_method, dtype, param_dtype, precision, rngs, init_scale, compute_path:
      as in :class:`Linear`.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, *, in_kv_features: int | None = None, rank: int | None = None,
               use_bias: bool = True, init_method: str = "svd", dtype=None, param_dtype=jnp.float32, precision=None,
               rngs: nnx.Rngs, init_scale: str = "lecun", compute_path: str = "auto"):
    qkv_features = qkv_features or in_features
    out_features = out_features or in_features
    in_kv_features = in_kv_features or in_features
    if qkv_features % num_heads:
      raise ValueError(f"MultiHeadAttention: qkv_features={qkv_features} is not divisible by "
                       f"num_heads={num_heads}")
    self.num_heads, self.precision = num_heads, precision
    kw = dict(use_bias=use_bias, init_method=init_method, dtype=dtype, param_dtype=param_dtype, precision=precision,
              rngs=rngs, init_scale=init_scale, compute_path=compute_path)
    cap = lambda d_in, d_out: None if rank is None else min(rank, d_in, d_out)
    self.query = Linear(in_features, qkv_features, rank=cap(in_features, qkv_features), **kw)
    self.key = Linear(in_kv_features, qkv_features, rank=cap(in_kv_features, qkv_features), **kw)
    self.value = Linear(in_kv_features, qkv_features, rank=cap(in_kv_features, qkv_features), **kw)
    self.out = Linear(qkv_features, out_features, rank=cap(qkv_features, out_features), **kw)

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None, inputs_v: jax.Array | None = None,
               *, mask: jax.Array | None = None) -> jax.Array:
    return core.attention_forward(lambda which, x: getattr(self, which)(x), inputs_q, inputs_k, inputs_v,
                                  num_heads=self.num_heads, mask=mask, precision=self.precision,
                                  name="MultiHeadAttention")


# ----------------------------------------------------------------------------- model helpers


def factorized_layers(model: nnx.Module) -> dict[str, FactorizedModule]:
  """Every factorized layer of ``model`` keyed by its dotted module path, in graph order."""
  return {tree.path_name(path): m for path, m in iter_modules(model) if isinstance(m, FactorizedModule)}


def capacities(model: nnx.Module) -> dict[str, int]:
  """Capacity of every factorized layer."""
  return {name: layer.capacity for name, layer in factorized_layers(model).items()}


def keep_counts(model: nnx.Module) -> dict[str, jax.Array]:
  """The current keep count of every factorized layer."""
  return {name: get_value(layer.keep) for name, layer in factorized_layers(model).items()}


def set_keep_counts(model: nnx.Module, keeps: Mapping[str, Any]) -> None:
  """Sets the keep counts of the named layers (ints or traced int32 scalars); others are unchanged.

  Static ints are checked against each layer's capacity.
  """
  layers = factorized_layers(model)
  tree.check_names(keeps, layers, "layers in keep counts")
  for name, keep in keeps.items():
    layer = layers[name]
    keep = core.check_keep(keep, layer.capacity, name)
    set_value(layer.keep, jnp.asarray(keep, jnp.int32))


def reset_keep_counts(model: nnx.Module) -> None:
  """Returns every factorized layer of ``model`` to full rank (keep count = capacity), in place.

  Keep counts written by :func:`set_keep_counts` persist in the model; the
  functional views (``maestro_jax.functional``) pass keep counts per call instead.
  """
  for layer in factorized_layers(model).values():
    set_value(layer.keep, jnp.asarray(layer.capacity, jnp.int32))


def _parent_and_key(model: nnx.Module, path: tuple):
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  return parent, path[-1]


def _bias(module) -> jax.Array | None:
  return get_value(module.bias).reshape(-1) if module.bias is not None else None


def _unsupported(module) -> str | None:
  """Why a Flax layer cannot become a factorized one (None when it can)."""
  if isinstance(module, nnx.Conv):
    kernel = get_value(module.kernel)
    if kernel.ndim != 4:
      return f"a {kernel.ndim - 2}-D nnx.Conv: only 2-D convolutions are supported"
    if module.feature_group_count != 1:
      return f"an nnx.Conv with feature_group_count={module.feature_group_count} (grouped convolution)"
    if any(d != 1 for d in jnp.atleast_1d(jnp.asarray(module.input_dilation))):
      return "an nnx.Conv with input_dilation != 1"
    if isinstance(module.padding, str) and module.padding.upper() not in ("SAME", "VALID"):
      return f"an nnx.Conv with padding={module.padding!r} (only SAME, VALID and explicit padding)"
    if getattr(module, "mask", None) is not None:
      return "an nnx.Conv with a kernel mask"
  if isinstance(module, nnx.Linear) and getattr(module, "dot_general", jax.lax.dot_general) is not jax.lax.dot_general:
    return "an nnx.Linear with a custom dot_general"
  if isinstance(module, nnx.LinearGeneral) and getattr(module, "batch_axis", None):
    return "an nnx.LinearGeneral with batch axes"
  if isinstance(module, nnx.MultiHeadAttention) and (module.decode or module.normalize_qk):
    return "an nnx.MultiHeadAttention with decode or normalize_qk"
  return None


_CONVERTIBLE = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.MultiHeadAttention)
_TRANSPOSED = (nnx.ConvTranspose,)


def _convert(module, name: str, rank_of: Callable[[int, str], int | None], compute_path: str = "auto"):
  """The factorized replacement of a Flax layer (checked by :func:`_unsupported` first)."""
  if isinstance(module, nnx.Linear):
    kernel = get_value(module.kernel)
    return Linear.from_kernel(kernel, _bias(module), rank=rank_of(min(kernel.shape), name),
                              dtype=module.dtype, precision=module.precision, compute_path=compute_path)
  if isinstance(module, nnx.LinearGeneral):
    return LinearGeneral.from_module(module, rank=rank_of(rules.full_rank(
        (math.prod(module.in_features), math.prod(module.out_features))), name), compute_path=compute_path)
  if isinstance(module, nnx.Conv):
    kernel = get_value(module.kernel)
    return Conv.from_kernel(kernel, _bias(module), rank=rank_of(rules.full_rank(kernel.shape), name),
                            strides=module.strides, padding=module.padding, kernel_dilation=module.kernel_dilation,
                            dtype=module.dtype, precision=module.precision, compute_path=compute_path)
  # nnx.MultiHeadAttention: its DenseGeneral projections as matrices, the same view the tree converter uses.
  q_kernel, k_kernel, o_kernel = (get_value(getattr(module, w).kernel) for w in ("query", "key", "out"))
  new = MultiHeadAttention(module.num_heads, q_kernel.shape[0], module.qkv_features, o_kernel.shape[-1],
                           in_kv_features=k_kernel.shape[0], use_bias=False, init_method="random", rank=1,
                           precision=module.precision, rngs=nnx.Rngs(0))
  for which in convert.ATTENTION_PROJECTIONS:
    proj = getattr(module, which)
    kernel = convert.attention_kernel_matrix(which, get_value(proj.kernel))
    setattr(new, which, Linear.from_kernel(kernel, _bias(proj), rank=rank_of(min(kernel.shape), f"{name}.{which}"),
                                           dtype=module.dtype, precision=module.precision,
                                           compute_path=compute_path))
  return new


def factorize(model: nnx.Module, *, rank_fraction: float | None = None, ranks: Mapping[str, int] | None = None,
              skip: Sequence[str] = (), compute_path: str = "auto") -> nnx.Module:
  """Replaces, in place, every ``nnx.Linear``, ``nnx.LinearGeneral``, 2-D ``nnx.Conv`` and ``nnx.MultiHeadAttention`` by SVD.

  At full rank (the default) the model computes the same function. This is how
  a pretrained Flax model is brought in. Every layer is checked before any is
  replaced: a layer that cannot be factorized exactly (a grouped, transposed,
  circular-padded or masked convolution, ...) is an error naming it; leave it
  dense with ``skip``.

  Args:
    model: the model to convert (modified in place and returned).
    rank_fraction: keep ``fraction_to_rank(rank_fraction, full_rank)`` components instead of all.
    ranks: explicit rank per layer name (attention projections as ``'attn.query'``).
    skip: dotted module paths to leave dense (unknown names are errors).
    compute_path: the new layers' compute path (see :class:`Linear`).

  Returns:
    ``model``.
  """
  convert.check_fraction(rank_fraction)
  ranks = dict(ranks or {})

  def rank_of(full: int, name: str) -> int | None:
    return convert.layer_rank(full, name, rank_fraction=rank_fraction, ranks=ranks)

  found = {tree.path_name(path): (path, module) for path, module in iter_modules(model)
           if path and isinstance(module, _CONVERTIBLE + _TRANSPOSED)}
  attention_parts = {f"{name}.{w}" for name, (_, m) in found.items() if isinstance(m, nnx.MultiHeadAttention)
                     for w in convert.ATTENTION_PROJECTIONS}
  tree.check_names(skip, found, "layers in skip")
  tree.check_names(ranks, dict.fromkeys(set(found) | attention_parts), "layers in ranks")
  targets, refused, reasons = [], [], []
  for name, (path, module) in found.items():
    inside = any(name.startswith(other + ".") for other in found if other != name and other not in skip)
    if name in skip or inside:
      continue  # left dense, or part of a layer being replaced (attention projections)
    reason = "an nnx.ConvTranspose (transposed convolution)" if isinstance(module, _TRANSPOSED) else _unsupported(module)
    if reason:
      refused.append(name)
      reasons.append(f"layer {name!r}: {reason} is not supported")
    else:
      targets.append((path, name, module))
  if refused:
    raise ValueError("cannot factorize " + "; ".join(reasons) + f". Leave such layers dense with skip={refused}")
  replacements = [(path, _convert(module, name, rank_of, compute_path)) for path, name, module in targets]
  for path, new in replacements:
    parent, key = _parent_and_key(model, path)
    if isinstance(key, int):
      parent[key] = new
    else:
      setattr(parent, key, new)
  return model
