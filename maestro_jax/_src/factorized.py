"""Factorized dense, convolution and attention layers as pure functions.

A factorized layer is a dict ``{'a': A, 'b': B}`` plus an optional ``'bias'``.
For a dense layer ``A`` is ``(d_in, r)`` and ``B`` is ``(r, d_out)`` so that the
kernel is ``W = A @ B``. For a 2-D convolution ``A`` is a spatial kernel
``(kh, kw, c_in, r)`` and ``B`` is the ``(r, c_out)`` matrix of a 1x1 conv. In
both cases the rank axis is the last axis of ``A`` and the first axis of ``B``;
component ``k`` is ``A[..., k]`` with ``B[k]``.

Every apply takes a keep count: the number of leading components used. A Python
int slices the factors (cheapest, shape-static); a traced int32 scalar masks the
rank axis, so changing it never recompiles.

Every apply runs on one of two paths with the same function and gradients: the
factors (``x @ A``, mask, ``@ B``) or the kernel ``A diag(mask) B`` formed once
and applied as one matmul or convolution. ``compute_path='auto'`` picks the
cheaper from static shapes (:func:`maestro_jax._src.rules.choose_compute_path`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maestro_jax._src.rules import COMPUTE_PATHS
from maestro_jax._src.rules import CPU_CONV_LANES
from maestro_jax._src.rules import SHIFTED_SUM_COPIES
from maestro_jax._src.rules import choose_compute_path
from maestro_jax._src.rules import full_rank
from maestro_jax._src.rules import use_matmul_input_grad
from maestro_jax._src.rules import use_patches_conv
from maestro_jax._src.rules import use_shifted_conv

Array = jax.Array
Params = dict[str, Any]
KeepCount = int | Array | None
Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _layer(name: str | None) -> str:
  return f"layer {name!r}" if name else "factorized layer"


def capacity(params: Params) -> int:
  """The physical size of the rank axis of a factorized layer."""
  return params["a"].shape[-1]


def is_merged(params: Params) -> bool:
  """Whether a layer holds one dense ``kernel`` (a merged layer, see :func:`merge_layer`) instead of factors."""
  return "kernel" in params and "a" not in params


def _check_factors(params: Params, name: str | None) -> None:
  if hasattr(params, "keys") and is_merged(params):
    return
  if not hasattr(params, "keys") or "a" not in params or "b" not in params:
    raise ValueError(f"{_layer(name)}: expected a dict with factors 'a' and 'b' (or a merged 'kernel'), "
                     f"got {type(params).__name__}")
  a, b = params["a"], params["b"]
  if b.ndim != 2 or a.shape[-1] != b.shape[0]:
    raise ValueError(
        f"{_layer(name)}: factor shapes {tuple(a.shape)} and {tuple(b.shape)} do not share a rank axis "
        "(need A[..., r] and B[r, d_out])")


def check_keep(keep: KeepCount, cap: int, name: str | None) -> KeepCount:
  """Validates a keep count: static ints are range-checked, traced ones must be integer scalars."""
  if keep is None:
    return cap
  if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
    keep = int(keep)
    if not 0 <= keep <= cap:
      raise ValueError(f"{_layer(name)}: keep count {keep} is out of range; need 0 <= keep <= capacity {cap}")
    return keep
  keep = jnp.asarray(keep)
  if keep.ndim != 0 or not jnp.issubdtype(keep.dtype, jnp.integer):
    raise ValueError(f"{_layer(name)}: keep count must be an integer scalar, got shape {keep.shape} "
                     f"dtype {keep.dtype}")
  return keep


def _check_path(compute_path: str, name: str | None) -> str:
  if compute_path not in COMPUTE_PATHS:
    raise ValueError(f"{_layer(name)}: compute_path must be one of {list(COMPUTE_PATHS)}, got {compute_path!r}")
  return compute_path


_SCOPE = threading.local()


@contextlib.contextmanager
def compute_path_scope(compute_path: str) -> Iterator[None]:
  """Within the block, every factorized layer set to ``'auto'`` takes ``compute_path`` instead.

  For code that maps a model over keep-count configurations with ``jax.vmap``
  (sweeps, greedy search): under ``vmap`` the kernel path forms one kernel per
  configuration and XLA runs the convolutions grouped (1.7x slower for a LeNet
  sweep of 16 settings on CPU), while the factor path shares ``x @ A`` of an
  unbatched input across configurations. The choice is made while tracing, so
  enter the scope *inside* the function that is jitted (a jit cache does not
  see it)::

    def evaluate(params, x, keeps):
      with compute_path_scope("factors"):
        return jax.vmap(lambda k: model.apply(params, x, k))(keeps)

  Args:
    compute_path: ``'factors'``, ``'kernel'`` or ``'auto'`` (back to the rule).
  """
  _check_path(compute_path, None)
  previous = getattr(_SCOPE, "path", "auto")
  _SCOPE.path = compute_path
  try:
    yield
  finally:
    _SCOPE.path = previous


def _rank_mask(keep: Array, cap: int, ndim: int, dtype) -> Array:
  """A 0/1 mask over the last axis of an ``ndim``-D array, with explicit leading ones (no rank promotion)."""
  mask = (jnp.arange(cap) < keep).astype(dtype)
  return mask.reshape((1,) * (ndim - 1) + (cap,))


def _add_bias(y: Array, bias: Array | None) -> Array:
  if bias is None:
    return y
  return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def _first(params: Params) -> Array:
  """The array the input meets first: factor ``A`` or a merged ``kernel``."""
  return params["kernel"] if is_merged(params) else params["a"]


def _cast_layer(dtype, x: Array, params: Params) -> tuple[Array, Params]:
  """Casts input and layer arrays to ``dtype`` (default: their promoted dtype)."""
  keys = [k for k in ("a", "b", "kernel", "bias") if k in params]
  if dtype is None:
    dtype = jnp.result_type(x, *[params[k] for k in keys])
  return jnp.asarray(x, dtype), {k: jnp.asarray(params[k], dtype) for k in keys}


def truncate_layer(params: Params, keep: int) -> Params:
  """Returns the layer with only its first ``keep`` components (a static slice)."""
  out = dict(params)
  out["a"] = params["a"][..., :keep]
  out["b"] = params["b"][:keep]
  return out


def _positions(first_factor, x: Array, a: Array) -> int:
  """Rows the layer maps: every output position of ``first_factor(x, a)`` (found abstractly, no compute)."""
  out = jax.eval_shape(first_factor, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(a.shape, a.dtype))
  return math.prod(out.shape[:-1])


def _inner(params, x, keep, name, first_factor, precision, compute_path="auto", lanes=1, shifted=False):
  """Shared apply of a factorized layer on the cheaper of two paths, chosen from static shapes.

  ``'factors'``: ``z = first_factor(x, A)``, mask (or slice) the rank axis,
  ``y = z @ B + bias``. ``'kernel'``: ``W = A diag(mask) B`` formed once, then
  ``y = first_factor(x, W) + bias``; gradients reach ``A`` and ``B`` through the
  product. Both compute the same function; ``'auto'`` picks by
  :func:`maestro_jax._src.rules.choose_compute_path`, which reads shapes only,
  so a traced keep count never changes the program.

  ``shifted``: ``first_factor`` is a shifted convolution (see
  :data:`~maestro_jax._src.rules.SHIFTED_SUM_COPIES`): the kernel path's cost counts that many times, and
  where ``'auto'`` then picks the factors, they run only under differentiation; a forward pass alone
  forms the kernel.

  A merged layer computes ``first_factor(x, kernel) + bias`` and ignores traced keep counts.
  """
  if is_merged(params):
    full = full_rank(params["kernel"].shape)
    if isinstance(keep, (int, np.integer)) and keep != full:
      raise ValueError(f"{_layer(name)}: a merged (dense) layer cannot keep {keep} of its {full} components")
    return _add_bias(first_factor(x, params["kernel"]), params.get("bias"))
  cap = capacity(params)
  keep = check_keep(keep, cap, name)
  if isinstance(keep, int):
    if keep < cap:
      params = truncate_layer(params, keep)
    mask = None
  else:
    mask = keep
  a, b, bias = params["a"], params["b"], params.get("bias")
  if compute_path == "auto":
    compute_path = getattr(_SCOPE, "path", "auto")
  rank, d_in, d_out = a.shape[-1], math.prod(a.shape[:-1]), b.shape[-1]
  path = choose_compute_path(_positions(first_factor, x, a), d_in, d_out, rank, compute_path=compute_path,
                             lanes=lanes, kernel_copies=SHIFTED_SUM_COPIES if shifted else 1.0)

  # Both paths take the mask as an argument: _forward_by_kernel's functions must not close over tracers.
  def kernel_path(x, a, b, mask):
    if mask is not None:
      # Masking B's rows costs r * d_out, less than masking A's columns (d_in * r) for a convolution.
      b = b * _rank_mask(mask, cap, 1, b.dtype).reshape(cap, 1)
    kernel = jnp.matmul(a.reshape(d_in, rank), b, precision=precision).reshape(a.shape[:-1] + (d_out,))
    return first_factor(x, kernel)

  def factor_path(x, a, b, mask):
    z = first_factor(x, a)
    if mask is not None:
      z = z * _rank_mask(mask, cap, z.ndim, z.dtype)
    return jnp.matmul(z, b, precision=precision)

  if path == "kernel":
    return _add_bias(kernel_path(x, a, b, mask), bias)
  if shifted and compute_path == "auto":
    # Differentiated, the factors (one materialized sum, see SHIFTED_SUM_COPIES); otherwise the kernel: a
    # forward pass evaluates the sum once, and the factors' matmul by B, r and c_out both tiny, is slow.
    return _add_bias(_forward_by_kernel(kernel_path, factor_path, x, a, b, mask), bias)
  return _add_bias(factor_path(x, a, b, mask), bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _forward_by_kernel(kernel_path, factor_path, x, a, b, mask):
  """``kernel_path(x, a, b, mask)`` when not differentiated; under differentiation ``factor_path``'s value
  and gradients (the two compute the same function). ``mask`` (a keep count or None) gets no gradient."""
  return kernel_path(x, a, b, mask)


def _forward_by_kernel_fwd(kernel_path, factor_path, x, a, b, mask):
  del kernel_path
  value, factor_vjp = jax.vjp(lambda x, a, b: factor_path(x, a, b, mask), x, a, b)
  return value, (factor_vjp, mask)


def _forward_by_kernel_bwd(kernel_path, factor_path, residuals, cotangent):
  del kernel_path, factor_path
  factor_vjp, mask = residuals
  zero = None if mask is None else np.zeros(np.shape(mask), jax.dtypes.float0)
  return (*factor_vjp(cotangent), zero)


_forward_by_kernel.defvjp(_forward_by_kernel_fwd, _forward_by_kernel_bwd)


def dense(params: Params, x: Array, keep: KeepCount = None, *, dtype=None, precision=None,
          name: str | None = None, compute_path: str = "auto") -> Array:
  """Applies a factorized dense layer, ``y = ((x @ A) * mask) @ B + bias``.

  Args:
    params: ``{'a': (d_in, r), 'b': (r, d_out), 'bias'?: (d_out,)}``.
    x: input of shape ``(..., d_in)``, any number of leading batch dimensions.
    keep: components to keep, ``0 <= keep <= r``; ``None`` keeps all. A Python
      int slices the factors, a traced int32 scalar masks them.
    dtype: compute dtype (inputs and parameters are cast to it); by default the
      promoted dtype of inputs and parameters.
    precision: passed to the matmuls.
    name: layer name used in error messages.
    compute_path: ``'factors'`` (two matmuls, mask between), ``'kernel'``
      (form ``A diag(mask) B``, one matmul) or ``'auto'``, the cheaper for
      these shapes (:func:`maestro_jax._src.rules.choose_compute_path`). The
      function and its gradients are the same on both paths.

  Returns:
    ``(..., d_out)``. With ``keep = 0`` every row equals the bias.
  """
  _check_factors(params, name)
  first = _first(params)
  if first.ndim != 2:
    raise ValueError(f"{_layer(name)}: dense factor A must be 2-D (d_in, r), got shape {first.shape}")
  d_in = first.shape[0]
  if x.ndim < 1 or x.shape[-1] != d_in:
    raise ValueError(f"{_layer(name)}: input has {x.shape[-1] if x.ndim else 'no'} features, expected {d_in}")
  _check_path(compute_path, name)
  x, params = _cast_layer(dtype, x, params)
  return _inner(params, x, keep, name, lambda x, a: jnp.matmul(x, a, precision=precision), precision, compute_path)


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  """Contracted axes as non-negative ints, in order."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def dense_general(params: Params, x: Array, keep: KeepCount = None, *, axis: int | Sequence[int] = -1,
                  features: int | Sequence[int], dtype=None, precision=None, name: str | None = None,
                  compute_path: str = "auto") -> Array:
  """A factorized DenseGeneral: contracts ``x`` over ``axis`` and produces ``features`` axes.

  The layer is stored as a dense layer over the flattened axes (``A`` is
  ``(prod(contracted dims), r)``, ``B`` is ``(r, prod(features))``), so every
  tool that handles dense layers handles it. Non-contracted axes keep their
  order and the feature axes come last, as in ``flax.linen.DenseGeneral``.

  Args:
    params: ``{'a', 'b', 'bias'?}`` as for :func:`dense` (``bias`` flat, ``(prod(features),)``).
    x: input; the axes in ``axis`` are contracted.
    keep: components to keep (see :func:`dense`).
    axis: contracted axis or axes.
    features: output feature size or shape.
    dtype, precision, name, compute_path: as in :func:`dense`.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  axes = normalize_axes(axis, x.ndim)
  rest = [d for d in range(x.ndim) if d not in axes]
  moved = jnp.transpose(x, rest + list(axes))
  batch_shape = moved.shape[:len(rest)]
  flat = moved.reshape(batch_shape + (math.prod(moved.shape[len(rest):]),))
  y = dense(params, flat, keep, dtype=dtype, precision=precision, name=name, compute_path=compute_path)
  return y.reshape(batch_shape + features)


def int_pairs(value, n: int, what: str, name: str | None) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f"{_layer(name)}: {what} must be an int or {n} ints, got {value}")
  return value


def _padding(padding: Padding, name: str | None):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"{_layer(name)}: padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  pads = []
  for p in padding:
    pads.append((p, p) if isinstance(p, int) else tuple(p))
  if len(pads) != 2:
    raise ValueError(f"{_layer(name)}: explicit padding needs 2 spatial entries, got {padding!r}")
  return tuple(pads)


def _direct_conv(x: Array, kernel: Array, pads) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_conv(x: Array, kernel: Array, pads) -> Array:
  """A stride-1 NHWC convolution as ``kh * kw * c_in`` shifted, broadcast multiply-adds (see
  :func:`~maestro_jax._src.rules.use_shifted_conv`); its gradients are XLA's convolution gradients."""
  kh, kw, c_in, _ = kernel.shape
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = jnp.zeros(x.shape[:1] + (h, w, kernel.shape[3]), x.dtype)
  for i in range(kh):
    for j in range(kw):
      for c in range(c_in):
        out = out + x[:, i:i + h, j:j + w, c:c + 1] * kernel[i, j, c].reshape(1, 1, 1, -1)
  return out


def _shifted_conv_fwd(x, kernel, pads):
  return _shifted_conv(x, kernel, pads), (x, kernel)


def _shifted_conv_bwd(pads, residuals, cotangent):
  # XLA's own gradients (a kernel-gradient convolution, and the input gradient, dropped when unused).
  return jax.vjp(lambda x, kernel: _direct_conv(x, kernel, pads), *residuals)[1](cotangent)


_shifted_conv.defvjp(_shifted_conv_fwd, _shifted_conv_bwd)


def _input_grad_by_matmul(x_shape, kernel: Array, cotangent: Array, pads) -> Array:
  """The input gradient of a stride-1 :func:`_direct_conv`: ``cotangent @ kernel^T`` per output pixel, each of
  the ``kh * kw`` taps added back at its offset (col2im), the padding cut off."""
  kh, kw, c_in, c_out = kernel.shape
  n, h, w, _ = cotangent.shape
  (top, bottom), (left, right) = pads
  padded_h, padded_w = x_shape[1] + top + bottom, x_shape[2] + left + right
  taps = jnp.matmul(cotangent.reshape(-1, c_out), kernel.reshape(kh * kw * c_in, c_out).T)
  taps = taps.reshape(n, h, w, kh, kw, c_in)
  grad = sum(jnp.pad(taps[:, :, :, i, j], ((0, 0), (i, padded_h - h - i), (j, padded_w - w - j), (0, 0)))
             for i in range(kh) for j in range(kw))
  return grad[:, top:top + x_shape[1], left:left + x_shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_matmul_input_grad(x: Array, kernel: Array, pads) -> Array:
  """XLA's stride-1 convolution whose input gradient is :func:`_input_grad_by_matmul` (see
  :func:`~maestro_jax._src.rules.use_matmul_input_grad`); the kernel gradient stays XLA's."""
  return _direct_conv(x, kernel, pads)


def _conv_matmul_input_grad_fwd(x, kernel, pads):
  return _direct_conv(x, kernel, pads), (x, kernel)


def _conv_matmul_input_grad_bwd(pads, residuals, cotangent):
  x, kernel = residuals
  kernel_grad = jax.vjp(lambda kernel: _direct_conv(x, kernel, pads), kernel)[1](cotangent)[0]
  return _input_grad_by_matmul(x.shape, kernel, cotangent, pads), kernel_grad


_conv_matmul_input_grad.defvjp(_conv_matmul_input_grad_fwd, _conv_matmul_input_grad_bwd)


def _patches_conv(x: Array, kernel: Array, pads, strides, dilation, precision) -> Array:
  """An NHWC convolution as one matmul: the ``kh * kw`` strided slices of the padded input concatenated on
  channels (HWIO order), times the kernel as a ``(kh * kw * c_in, c_out)`` matrix (see
  :func:`~maestro_jax._src.rules.use_patches_conv`)."""
  kh, kw, c_in, c_out = kernel.shape
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  (sh, sw), (dh, dw) = strides, dilation
  h = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
  w = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
  slices = [jax.lax.slice(x, (0, i * dh, j * dw, 0), (x.shape[0], i * dh + (h - 1) * sh + 1,
                                                      j * dw + (w - 1) * sw + 1, c_in), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
  return jnp.matmul(jnp.concatenate(slices, axis=-1), kernel.reshape(kh * kw * c_in, c_out), precision=precision)


def conv(params: Params, x: Array, keep: KeepCount = None, *, strides: int | Sequence[int] = 1,
         padding: Padding = "SAME", dilation: int | Sequence[int] = 1, dtype=None, precision=None,
         name: str | None = None, compute_path: str = "auto") -> Array:
  """Applies a factorized 2-D convolution (NHWC).

  ``A`` is a ``kh x kw`` convolution ``c_in -> r`` that carries strides, padding
  and dilation; ``B`` is a 1x1 convolution ``r -> c_out`` that carries the bias.

  Args:
    params: ``{'a': (kh, kw, c_in, r), 'b': (r, c_out), 'bias'?: (c_out,)}``.
    x: ``(..., H, W, c_in)``; leading dimensions are flattened into one batch.
    keep: components to keep (see :func:`dense`).
    strides: int or pair.
    padding: ``'SAME'``, ``'VALID'``, an int, or pairs ``((lo, hi), (lo, hi))``.
    dilation: kernel dilation, int or pair.
    dtype: compute dtype.
    precision: passed to the convolution and matmul.
    name: layer name used in error messages.
    compute_path: ``'factors'`` (spatial conv to ``r`` channels, mask, 1x1),
      ``'kernel'`` (form the ``(kh, kw, c_in, c_out)`` kernel ``A diag(mask) B``,
      one convolution) or ``'auto'`` (the cheaper for these shapes, see :func:`dense`).

  Returns:
    ``(..., H', W', c_out)``.
  """
  _check_factors(params, name)
  first = _first(params)
  if first.ndim != 4:
    raise ValueError(f"{_layer(name)}: conv factor A must be 4-D (kh, kw, c_in, r), got shape {first.shape}")
  c_in = first.shape[2]
  if x.ndim < 3 or x.shape[-1] != c_in:
    raise ValueError(f"{_layer(name)}: input of shape {x.shape} does not have {c_in} channels last "
                     "(need (..., H, W, c_in))")
  strides = int_pairs(strides, 2, "strides", name)
  dilation = int_pairs(dilation, 2, "dilation", name)
  pad = _padding(padding, name)
  _check_path(compute_path, name)
  x, params = _cast_layer(dtype, x, params)
  batch_shape = x.shape[:-3]

  dilated_window = tuple((k - 1) * d + 1 for k, d in zip(first.shape[:2], dilation))
  pads = pad if not isinstance(pad, str) else jax.lax.padtype_to_pads(x.shape[-3:-1], dilated_window, strides, pad)
  pads = tuple(tuple(int(v) for v in p) for p in pads)
  out_hw = [(size + lo + hi - window) // stride + 1
            for size, (lo, hi), window, stride in zip(x.shape[-3:-1], pads, dilated_window, strides)]
  backend = jax.default_backend()
  patches = use_patches_conv(*out_hw, backend=backend)

  def spatial(x, a):
    x4 = x.reshape((-1,) + x.shape[-3:])
    if patches:
      z = _patches_conv(x4, a, pads, strides, dilation, precision)
    elif use_shifted_conv(a.shape[2], a.shape[3], strides=strides, dilation=dilation, dtype=x4.dtype,
                          backend=backend):
      z = _shifted_conv(x4, a, pads)
    elif use_matmul_input_grad(a.shape[2], a.shape[:2], strides=strides, dilation=dilation, dtype=x4.dtype,
                               backend=backend):
      z = _conv_matmul_input_grad(x4, a, pads)
    else:
      z = jax.lax.conv_general_dilated(x4, a, strides, pad, rhs_dilation=dilation,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return z.reshape(batch_shape + z.shape[1:])

  # XLA CPU's direct convolutions run narrow outputs at the cost of CPU_CONV_LANES channels (see
  # choose_compute_path); shifted and patches convolutions are plain multiply-adds and matmuls, whose
  # FLOPs rank the paths.
  shifted = use_shifted_conv(c_in, first.shape[-1] if is_merged(params) else params["b"].shape[-1],
                             strides=strides, dilation=dilation, dtype=x.dtype, backend=backend)
  lanes = CPU_CONV_LANES if backend == "cpu" and not (shifted or patches) else 1
  return _inner(params, x, keep, name, spatial, precision, compute_path, lanes, shifted=shifted)


def dot_product_attention(query: Array, key: Array, value: Array, mask: Array | None = None, *,
                          precision=None) -> Array:
  """Softmax attention over heads: ``(..., q_len, H, D)``, ``(..., kv_len, H, D)`` -> ``(..., q_len, H, D)``.

  ``mask`` is boolean, broadcastable to ``(..., H, q_len, kv_len)``; False entries are not attended to.
  """
  depth = query.shape[-1]
  query = query / jnp.asarray(math.sqrt(depth), query.dtype)
  logits = jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)
  if mask is not None:
    mask = jnp.broadcast_to(mask, logits.shape)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)


def split_heads(x: Array, num_heads: int, name: str | None = None) -> Array:
  """``(..., L, H * D)`` -> ``(..., L, H, D)``."""
  if x.shape[-1] % num_heads:
    raise ValueError(f"{_layer(name)}: projection width {x.shape[-1]} is not divisible by num_heads={num_heads}")
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def multi_head_attention(params: Params, inputs_q: Array, inputs_k: Array | None = None,
                         inputs_v: Array | None = None, *, num_heads: int,
                         keep: dict[str, KeepCount] | None = None, mask: Array | None = None, dtype=None,
                         precision=None, name: str | None = None, compute_path: str = "auto") -> Array:
  """Multi-head dot-product attention with factorized Q, K, V and output projections.

  Args:
    params: ``{'query', 'key', 'value', 'out'}``, each a factorized dense layer;
      ``query``/``key``/``value`` map features to ``num_heads * head_dim``,
      ``out`` maps ``num_heads * head_dim`` to the output features.
    inputs_q: ``(..., q_len, d)``.
    inputs_k: ``(..., kv_len, d_k)``; defaults to ``inputs_q`` (self-attention).
    inputs_v: ``(..., kv_len, d_v)``; defaults to ``inputs_k``.
    num_heads: number of heads; must divide the projection width.
    keep: optional keep count per projection name.
    mask: boolean, broadcastable to ``(..., num_heads, q_len, kv_len)``.
    dtype: compute dtype.
    precision: passed to all matmuls.
    name: layer name used in error messages.
    compute_path: compute path of every projection (see :func:`dense`).

  Returns:
    ``(..., q_len, d_out)``.
  """
  keep = keep or {}
  missing = {"query", "key", "value", "out"} - set(params)
  if missing:
    raise ValueError(f"{_layer(name)}: attention params lack {sorted(missing)}")

  def proj(which, x):
    sub = f"{name}.{which}" if name else which
    return dense(params[which], x, keep.get(which), dtype=dtype, precision=precision, name=sub,
                 compute_path=compute_path)

  return attention_forward(proj, inputs_q, inputs_k, inputs_v, num_heads=num_heads, mask=mask,
                           precision=precision, name=name)


def attention_forward(project, inputs_q: Array, inputs_k: Array | None = None, inputs_v: Array | None = None, *,
                      num_heads: int, mask: Array | None = None, precision=None, name: str | None = None) -> Array:
  """The multi-head attention forward given its projections: the one both skins and :func:`multi_head_attention` run.

  Args:
    project: ``project(which, x)`` applies projection ``which`` (``'query'``,
      ``'key'``, ``'value'`` or ``'out'``) to ``x``.
    inputs_q, inputs_k, inputs_v, num_heads, mask, precision, name: as in
      :func:`multi_head_attention`.
  """
  inputs_k = inputs_q if inputs_k is None else inputs_k
  inputs_v = inputs_k if inputs_v is None else inputs_v
  q = split_heads(project("query", inputs_q), num_heads, name)
  k = split_heads(project("key", inputs_k), num_heads, name)
  v = split_heads(project("value", inputs_v), num_heads, name)
  out = dot_product_attention(q, k, v, mask, precision=precision)
  return project("out", out.reshape(out.shape[:-2] + (-1,)))


# --------------------------------------------------------------------------- initialization


def factorize_matrix(kernel: Array, rank: int | None = None, *, name: str | None = None) -> tuple[Array, Array]:
  """Splits a matrix by thin SVD into ``A = P sqrt(S)``, ``B = sqrt(S) Q^T``.

  With ``rank = min(d_in, d_out)`` (the default) ``A @ B`` equals the kernel up
  to float rounding; a smaller rank gives the best rank-``rank`` approximation.
  Components come out ordered by singular value.
  """
  if kernel.ndim != 2:
    raise ValueError(f"{_layer(name)}: expected a 2-D kernel (d_in, d_out), got shape {kernel.shape}")
  full = min(kernel.shape)
  rank = full if rank is None else rank
  if not 1 <= rank <= full:
    raise ValueError(f"{_layer(name)}: rank {rank} is out of range; need 1 <= rank <= {full}")
  dtype = kernel.dtype
  try:
    # A concrete kernel is split in float64 so the float32 factors reproduce it to rounding.
    matrix = np.asarray(kernel, np.float64)
    if not np.all(np.isfinite(matrix)):
      raise ValueError(f"{_layer(name)}: the kernel has {int(np.sum(~np.isfinite(matrix)))} non-finite entries "
                       "(NaN or inf); it cannot be factorized")
    p, s, qt = np.linalg.svd(matrix, full_matrices=False)
    xp = np
  except jax.errors.TracerArrayConversionError:
    p, s, qt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    xp = jnp
  root = xp.sqrt(s[:rank])
  a = p[:, :rank] * root.reshape(1, -1)
  b = qt[:rank] * root.reshape(-1, 1)
  return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def factorize_kernel(kernel: Array, bias: Array | None = None, rank: int | None = None, *,
                     name: str | None = None) -> Params:
  """Factorized-layer params from a dense ``(d_in, d_out)`` or conv ``(kh, kw, c_in, c_out)`` kernel.

  The function computed is unchanged at full rank (see :func:`factorize_matrix`).
  """
  if kernel.ndim == 2:
    a, b = factorize_matrix(kernel, rank, name=name)
  elif kernel.ndim == 4:
    kh, kw, c_in, c_out = kernel.shape
    a, b = factorize_matrix(kernel.reshape(kh * kw * c_in, c_out), rank, name=name)
    a = a.reshape(kh, kw, c_in, a.shape[-1])
  else:
    raise ValueError(f"{_layer(name)}: kernel must be 2-D (dense) or 4-D (conv HWIO), got shape {kernel.shape}")
  params = {"a": a, "b": b}
  if bias is not None:
    params["bias"] = bias
  return params


# Default weight scales: 'lecun' is Flax's (LeCun-normal kernel, zero bias); 'pytorch' is
# torch.nn.Linear/Conv2d's (kernel and bias uniform in +-1/sqrt(fan_in)), the scale the
# Maestro paper's lambda and shrink threshold were tuned at.
INIT_SCALES = ("lecun", "pytorch")


def pytorch_kernel_init():
  """PyTorch's default kernel init: uniform in ``+-1/sqrt(fan_in)``, i.e. ``variance_scaling(1/3, 'fan_in', 'uniform')``.

  ``fan_in`` is ``d_in`` for a ``(d_in, d_out)`` kernel and ``kh * kw * c_in``
  for an HWIO convolution kernel.
  """
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def pytorch_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with ``fan_in`` inputs: uniform in ``+-1/sqrt(fan_in)``."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def default_initializers(init_scale: str, kernel_shape: Sequence[int], *, name: str | None = None):
  """``(kernel_init, bias_init)`` of a weight scale for a kernel of ``kernel_shape`` (see :data:`INIT_SCALES`)."""
  if init_scale == "lecun":
    return jax.nn.initializers.lecun_normal(), jax.nn.initializers.zeros
  if init_scale == "pytorch":
    return pytorch_kernel_init(), pytorch_bias_init(math.prod(kernel_shape[:-1]))
  raise ValueError(f"{_layer(name)}: unknown init_scale {init_scale!r}; choose one of {list(INIT_SCALES)}")


def init_layer(key: Array, kernel_shape: Sequence[int], rank: int | None = None, *, use_bias: bool = True,
         init_method: str = "svd", kernel_init=None, bias_init=None, param_dtype=jnp.float32,
         name: str | None = None, init_scale: str = "lecun") -> Params:
  """Initializes a factorized layer for a dense ``(d_in, d_out)`` or conv ``(kh, kw, c_in, c_out)`` kernel.

  Args:
    key: PRNG key.
    kernel_shape: shape of the equivalent dense kernel.
    rank: capacity; defaults to :func:`full_rank`.
    use_bias: whether to add a zero-initialized bias.
    init_method: ``'svd'`` draws a dense kernel with ``kernel_init`` and splits it
      by SVD (components ordered by singular value); ``'random'`` draws both
      factors at fan-in scale so ``A @ B`` has the dense kernel's variance
      under ``init_scale``.
    kernel_init: initializer for the dense kernel (``'svd'``); by default the
      one of ``init_scale``.
    bias_init: initializer for the bias; by default the one of ``init_scale``.
    param_dtype: parameter dtype.
    name: layer name used in error messages.
    init_scale: the default weight scale: ``'lecun'`` (Flax: LeCun-normal
      kernel, zero bias) or ``'pytorch'`` (PyTorch: kernel and bias uniform in
      ``+-1/sqrt(fan_in)``, the scale the paper's lambda and shrink threshold
      assume; its singular values are ``1/sqrt(3)`` of LeCun's).
  """
  kernel_shape = tuple(int(d) for d in kernel_shape)
  if len(kernel_shape) not in (2, 4):
    raise ValueError(f"{_layer(name)}: kernel shape must be 2-D or 4-D, got {kernel_shape}")
  full = full_rank(kernel_shape)
  rank = full if rank is None else int(rank)
  if not 1 <= rank <= full:
    raise ValueError(f"{_layer(name)}: rank {rank} is out of range; need 1 <= rank <= {full}")
  if init_method not in ("svd", "random"):
    raise ValueError(f"{_layer(name)}: unknown init_method {init_method!r}; choose 'svd' or 'random'")
  default_initializers(init_scale, kernel_shape, name=name)  # Checks init_scale.
  return _draw_layer(key, kernel_shape=kernel_shape, rank=rank, use_bias=use_bias, init_method=init_method,
                     kernel_init=kernel_init, bias_init=bias_init, param_dtype=jnp.dtype(param_dtype),
                     init_scale=init_scale)


# One compiled program per layer shape: drawn op by op, LeNet-5's five layers compiled about 40 small
# programs (3-4 s of a run's start), and each under the persistent cache's threshold, so every run paid them.
@functools.partial(jax.jit, static_argnames=("kernel_shape", "rank", "use_bias", "init_method", "kernel_init",
                                             "bias_init", "param_dtype", "init_scale"))
def _draw_layer(key: Array, *, kernel_shape: tuple[int, ...], rank: int, use_bias: bool, init_method: str,
                kernel_init, bias_init, param_dtype, init_scale: str) -> Params:
  default_kernel_init, default_bias_init = default_initializers(init_scale, kernel_shape)
  kernel_init = kernel_init or default_kernel_init
  bias_init = bias_init or default_bias_init
  k_kernel, k_a, k_b, k_bias = jax.random.split(key, 4)
  if init_method == "svd":
    kernel = kernel_init(k_kernel, kernel_shape, jnp.float32)
    params = factorize_kernel(kernel, rank=rank)
    params = {k: v.astype(param_dtype) for k, v in params.items()}
  else:
    # Var(A @ B) = r * Var(A) * Var(B) = Var(A) with Var(B) = 1 / r: A carries the scale's fan-in variance.
    in_axes = tuple(range(len(kernel_shape) - 1))
    if init_scale == "pytorch":
      first = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axes, out_axis=-1)
    else:
      first = jax.nn.initializers.lecun_normal(in_axis=in_axes, out_axis=-1)
    params = {"a": first(k_a, kernel_shape[:-1] + (rank,), param_dtype),
              "b": jax.nn.initializers.lecun_normal()(k_b, (rank, kernel_shape[-1]), param_dtype)}
  if use_bias:
    params["bias"] = bias_init(k_bias, (kernel_shape[-1],), param_dtype)
  return params


def merge_layer(params: Params, keep: int | None = None) -> Params:
  """The layer as one dense kernel ``{'kernel': A[..., :keep] @ B[:keep], 'bias'?}``.

  :func:`dense` and :func:`conv` apply the merged form directly; deploy a layer
  merged when its factorized form is not smaller, ``(d_in + d_out) r >= d_in d_out``.
  """
  if is_merged(params):
    return dict(params)
  out = {"kernel": dense_kernel(params, keep)}
  if "bias" in params:
    out["bias"] = params["bias"]
  return out


def dense_kernel(params: Params, keep: int | None = None) -> Array:
  """The dense kernel ``A[..., :keep] @ B[:keep]`` in the layer's kernel shape."""
  cap = capacity(params)
  keep = check_keep(keep, cap, None)
  if not isinstance(keep, int):
    raise ValueError("dense_kernel needs a static keep count")
  a, b = params["a"][..., :keep], params["b"][:keep]
  w = a.reshape(math.prod(a.shape[:-1]), keep) @ b
  return w.reshape(params["a"].shape[:-1] + (b.shape[-1],))
