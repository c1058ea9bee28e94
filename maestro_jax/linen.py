"""Flax Linen layers over the functional core, plus helpers for their variables.

Factors are ordinary ``params`` (``a``, ``b``, ``bias``). The keep count of each
layer is the variable ``keep`` in the :data:`KEEP_COLLECTION` collection. Apply
without that collection to use full rank, or pass one (e.g. from
:func:`set_keep_counts`) to choose keep counts for the whole model::

  variables = model.init(key, x)              # holds 'params' and 'keep_count'
  variables = maestro_jax.linen.set_keep_counts(variables, {'Dense_0': 4})
  y = model.apply(variables, x)

Module names match ``flax.linen``'s (``Dense_0``, ``Conv_1``, ...), so swapping
``nn.Dense`` for :class:`Dense` keeps the parameter paths and
:func:`factorize_params` converts a pretrained params tree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from maestro_jax._src import convert
from maestro_jax._src import factorized as core
from maestro_jax._src import tree

__all__ = ["KEEP_COLLECTION", "Dense", "DenseGeneral", "Conv", "MultiHeadDotProductAttention", "capacities", "keep_counts",
           "set_keep_counts", "init_keep_counts", "factorize_params"]

KEEP_COLLECTION = "keep_count"


class _Factorized(nn.Module):
  """Declares the factors and the keep-count variable of one layer."""

  def _factors(self, kernel_shape: tuple[int, ...]) -> core.Params:
    names = ("a", "b", "bias") if self.use_bias else ("a", "b")
    if self.has_variable("params", "kernel"):  # A merged layer (see maestro_jax.merge).
      names = ("kernel", "bias") if self.use_bias else ("kernel",)
    if self.has_variable("params", names[0]):
      # Read existing factors directly: their rank is data (it shrinks), so
      # Linen's check against a fresh init's shapes in ``self.param`` must not apply.
      missing = [k for k in names if not self.has_variable("params", k)]
      if missing:
        raise ValueError(f"layer {self.name!r}: params lack {missing}")
      return {k: self.get_variable("params", k) for k in names}
    if not self.is_mutable_collection("params"):
      raise ValueError(f"layer {self.name!r}: no factorized params; initialize the model or convert its "
                       "params with factorize_params")
    # One draw for both factors: A and B must come from the same SVD.
    fresh = core.init_layer(self.make_rng("params"), kernel_shape, self.rank, use_bias=self.use_bias,
                      init_method=self.init_method, kernel_init=self.kernel_init, bias_init=self.bias_init,
                      param_dtype=self.param_dtype, name=self.name, init_scale=self.init_scale)
    if self.is_mutable_collection(KEEP_COLLECTION):
      self.variable(KEEP_COLLECTION, "keep", lambda: jnp.asarray(fresh["a"].shape[-1], jnp.int32))
    return {k: self.param(k, lambda _, v=fresh[k]: v) for k in names}

  def _keep(self, keep):
    if keep is None and self.has_variable(KEEP_COLLECTION, "keep"):
      return self.get_variable(KEEP_COLLECTION, "keep")
    return keep


class Dense(_Factorized):
  """Factorized dense layer ``y = ((x @ A) * mask) @ B + bias``; input ``(..., d_in)``.

  Attributes:
    features: output features.
    rank: capacity; defaults to ``min(d_in, features)``.
    use_bias: add a bias.
    init_method: ``'svd'`` or ``'random'`` (see :func:`maestro_jax.init_layer`).
    kernel_init: initializer of the dense kernel split by SVD.
    bias_init: initializer of the bias.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: matmul precision.
    init_scale: default weight scale, ``'lecun'`` or ``'pytorch'`` (see :func:`maestro_jax.init_layer`).
    compute_path: ``'auto'`` (the cheaper path for the call's shapes), ``'factors'``
      or ``'kernel'`` (see :func:`maestro_jax.dense`).
  """
  features: int
  rank: int | None = None
  use_bias: bool = True
  init_method: str = "svd"
  kernel_init: Any = None
  bias_init: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  init_scale: str = "lecun"
  compute_path: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, keep: core.KeepCount = None) -> jax.Array:
    params = self._factors((x.shape[-1], self.features))
    return core.dense(params, x, self._keep(keep), dtype=self.dtype, precision=self.precision, name=self.name,
                      compute_path=self.compute_path)


class DenseGeneral(_Factorized):
  """Factorized ``flax.linen.DenseGeneral``: contracts ``axis`` of the input into ``features`` output axes.

  Stored as a dense layer over the flattened axes (``A`` is ``(prod(contracted), r)``,
  ``B`` is ``(r, prod(features))``, ``bias`` flat), so sweeps, export and
  accounting treat it as a dense layer; :func:`factorize_params` with
  ``general={name: n_contracted_axes}`` converts a trained ``nn.DenseGeneral``.

  Attributes:
    features: output feature size or shape.
    axis: contracted axis or axes of the input.
    rank, use_bias, init_method, kernel_init, bias_init, dtype, param_dtype,
      precision, init_scale, compute_path: as in :class:`Dense` (``kernel_init`` draws the flattened matrix).
  """
  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  rank: int | None = None
  use_bias: bool = True
  init_method: str = "svd"
  kernel_init: Any = None
  bias_init: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  init_scale: str = "lecun"
  compute_path: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, keep: core.KeepCount = None) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = core.normalize_axes(self.axis, x.ndim)
    d_in = math.prod(x.shape[a] for a in axes)
    params = self._factors((d_in, math.prod(features)))
    return core.dense_general(params, x, self._keep(keep), axis=axes, features=features, dtype=self.dtype,
                              precision=self.precision, name=self.name, compute_path=self.compute_path)


class Conv(_Factorized):
  """Factorized 2-D convolution (NHWC); input ``(..., H, W, c_in)``.

  Attributes:
    features: output channels.
    kernel_size: int or pair.
    strides: int or pair.
    padding: ``'SAME'``, ``'VALID'``, an int, or pairs.
    kernel_dilation: int or pair.
    feature_group_count: must be 1 (grouped convolutions are not supported).
    rank, use_bias, init_method, kernel_init, bias_init, dtype, param_dtype,
      precision, init_scale, compute_path: as in :class:`Dense`.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  rank: int | None = None
  use_bias: bool = True
  init_method: str = "svd"
  kernel_init: Any = None
  bias_init: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  init_scale: str = "lecun"
  compute_path: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, keep: core.KeepCount = None) -> jax.Array:
    if self.feature_group_count != 1:
      raise ValueError(f"layer {self.name!r}: feature_group_count={self.feature_group_count} is not supported; "
                       "factorized convolutions need feature groups of 1")
    kernel_size = core.int_pairs(self.kernel_size, 2, "kernel_size", self.name)
    params = self._factors(kernel_size + (x.shape[-1], self.features))
    return core.conv(params, x, self._keep(keep), strides=self.strides, padding=self.padding,
                     dilation=self.kernel_dilation, dtype=self.dtype, precision=self.precision, name=self.name,
                     compute_path=self.compute_path)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with factorized ``query``, ``key``, ``value`` and ``out`` :class:`Dense` layers.

  Inputs ``(..., q_len, d)`` (and optionally ``(..., kv_len, d_kv)``); output ``(..., q_len, out_features)``.

  Attributes:
    num_heads: number of heads; must divide ``qkv_features``.
    qkv_features: projection width; defaults to the query input features.
    out_features: output features; defaults to the query input features.
    rank: optional capacity of every projection.
    use_bias, init_method, dtype, param_dtype, precision, init_scale, compute_path: as in :class:`Dense`.
  """
  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  rank: int | None = None
  use_bias: bool = True
  init_method: str = "svd"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  init_scale: str = "lecun"
  compute_path: str = "auto"

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None, inputs_v: jax.Array | None = None,
               *, mask: jax.Array | None = None) -> jax.Array:
    width = self.qkv_features or inputs_q.shape[-1]
    kw = dict(use_bias=self.use_bias, init_method=self.init_method, dtype=self.dtype,
              param_dtype=self.param_dtype, precision=self.precision, init_scale=self.init_scale,
              compute_path=self.compute_path)

    def proj(which, x):
      features = (self.out_features or inputs_q.shape[-1]) if which == "out" else width
      rank = None if self.rank is None else min(self.rank, x.shape[-1], features)
      return Dense(features, rank=rank, name=which, **kw)(x)

    return core.attention_forward(proj, inputs_q, inputs_k, inputs_v, num_heads=self.num_heads, mask=mask,
                                  precision=self.precision, name=self.name)


# ----------------------------------------------------------------------------- variable helpers


def capacities(params: Mapping) -> dict[str, int]:
  """Capacity of every factorized layer in a ``params`` tree, keyed by dotted path."""
  return tree.capacities(params)


def keep_counts(variables: Mapping) -> dict[str, jax.Array]:
  """The keep counts in ``variables[KEEP_COLLECTION]`` as a flat dict keyed by layer path."""
  flat = traverse_util.flatten_dict(dict(variables.get(KEEP_COLLECTION, {})))
  return {tree.path_name(path[:-1]): value for path, value in flat.items()}


def init_keep_counts(params: Mapping) -> dict:
  """A full-rank keep-count collection for a ``params`` tree (e.g. one from :func:`factorize_params`)."""
  flat = {}
  for name, path in tree.layer_paths(params).items():
    flat[path + ("keep",)] = jnp.asarray(tree.capacities(params)[name], jnp.int32)
  return traverse_util.unflatten_dict(flat)


def set_keep_counts(variables: Mapping, keeps: Mapping[str, Any]) -> dict:
  """Returns ``variables`` with the named layers' keep counts replaced (ints or traced int32 scalars).

  Static ints are checked against capacities; a missing keep-count collection is
  created at full rank first.
  """
  params = variables["params"]
  paths = tree.layer_paths(params)
  tree.check_names(keeps, paths, "layers in keep counts")
  caps = tree.capacities(params)
  collection = variables.get(KEEP_COLLECTION) or init_keep_counts(params)
  flat = traverse_util.flatten_dict(dict(collection))
  for name, keep in keeps.items():
    keep = core.check_keep(keep, caps[name], name)
    flat[paths[name] + ("keep",)] = jnp.asarray(keep, jnp.int32)
  out = dict(variables)
  out[KEEP_COLLECTION] = traverse_util.unflatten_dict(flat)
  return out


def factorize_params(params: Mapping, *, rank_fraction: float | None = None, ranks: Mapping[str, int] | None = None,
                     skip: Sequence[str] = (), general: Mapping[str, int] | None = None) -> dict:
  """Converts a Linen ``params`` tree of Dense/Conv/attention kernels into factorized layers by SVD.

  Every ``{'kernel': 2-D or 4-D, 'bias'?}`` node becomes ``{'a', 'b', 'bias'?}``,
  and ``nn.MultiHeadDotProductAttention`` kernels are reshaped to matrices first
  (see :func:`maestro_jax.factorize_dense_params`, the same converter). Apply the
  result with the same model built from this module's layers; at full rank the
  function is unchanged. A params tree does not say whether a 4-D kernel
  belongs to a grouped or transposed convolution: convert only models whose
  convolutions are plain ``nn.Conv`` with ``feature_group_count=1`` (the layers
  of this module refuse anything else).

  Args:
    params: the ``params`` collection.
    rank_fraction: keep ``fraction_to_rank(rank_fraction, full_rank)`` components instead of all.
    ranks: explicit rank per layer name.
    skip: dotted paths of layers to leave dense (unknown names are errors).
    general: ``nn.DenseGeneral`` layers to convert for :class:`DenseGeneral`,
      ``{name: number of contracted axes}``.
  """
  return convert.factorize_tree(params, rank_fraction=rank_fraction, ranks=ranks, skip=skip, general=general)
