"""The rules every part of the library shares, each written once.

* :func:`fraction_to_rank` — how many of ``n`` components a fraction ``p`` keeps.
  Samplers, converters, sweep generators, baselines and the runner all call it.
* The merge rule, :func:`should_merge`: a layer whose factors are not smaller
  than its kernel, ``(d_in + d_out) r >= d_in d_out``, is deployed as one kernel.
"""

from __future__ import annotations

import fractions
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# A fraction is taken as the closest ratio with a denominator up to this, so that
# 0.07 of 100 is exactly 7 (not 8 through float rounding) and 2/3 of 3 is 2, and
# the ceiling can run on traced ranks in int32 arithmetic without overflow.
MAX_DENOMINATOR = 10_000


def fraction_parts(p: float) -> tuple[int, int]:
  """``p`` as the closest ratio ``num / den`` with ``den <= MAX_DENOMINATOR`` (Python ints); checks ``0 < p <= 1``."""
  p = float(p)
  if not 0.0 < p <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {p}")
  q = fractions.Fraction(p).limit_denominator(MAX_DENOMINATOR)
  return max(q.numerator, 1), q.denominator


def parts_to_rank(num, den, n):
  """``clip(ceil(num * n / den), 1, n)`` (0 when ``n`` is 0) in exact integer arithmetic; any argument may be traced."""
  if all(isinstance(v, int) for v in (num, den, n)):
    if n < 0:
      raise ValueError(f"number of components must be >= 0, got {n}")
    return min(n, max(1, -(-num * n // den))) if n else 0
  num, den, n = (jnp.asarray(v, jnp.int32) for v in (num, den, n))
  # ceil(num * n / den) split so every product stays below 2**31 (num <= den <= MAX_DENOMINATOR).
  k = (n // den) * num + ((n % den) * num + den - 1) // den
  return jnp.where(n > 0, jnp.clip(k, 1, n), 0).astype(jnp.int32)


def fraction_to_rank(p, n):
  """The number of components a fraction ``p`` of ``n`` keeps: ``ceil(p * n)``, at least 1 (0 when ``n`` is 0).

  The rule every sampler, converter, sweep generator and baseline uses. ``p`` is
  taken as the closest ratio with a denominator up to 10,000
  (:func:`fraction_parts`) and the ceiling is exact, so decimal and simple
  fractions never round the wrong way (0.07 of 100 is 7, 2/3 of 3 is 2). ``n``
  may be traced (the result is then int32). A traced ``p`` (a random draw inside
  ``jit``) cannot be approximated that way and is read to 4 decimal places.

  Args:
    p: fraction in ``(0, 1]``.
    n: number of components, an int or an int32 array.

  Returns:
    ``clip(ceil(p * n), 1, n)`` for ``n >= 1``, else 0.
  """
  if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer) and p.ndim == 0:
    p = float(p)
  if isinstance(p, (int, float)) and not isinstance(p, bool):
    num, den = fraction_parts(p)
    return parts_to_rank(num, den, n)
  num = jnp.maximum(jnp.round(jnp.asarray(p, jnp.float32) * MAX_DENOMINATOR).astype(jnp.int32), 1)
  return parts_to_rank(num, MAX_DENOMINATOR, n)


# ------------------------------------------------------------------------------------------ sizes


def full_rank(shape) -> int:
  """``min(prod(shape[:-1]), shape[-1])`` of a kernel shape: the rank that loses nothing."""
  return min(math.prod(shape[:-1]), shape[-1])


def factorized_weights(d_in: int, d_out: int, rank: int) -> int:
  """Weights of a rank-``rank`` factor pair, ``(d_in + d_out) * rank``."""
  return (d_in + d_out) * rank


def should_merge(d_in: int, d_out: int, rank: int) -> bool:
  """The merge rule: a layer is deployed as one kernel when its factors are not smaller, ``(d_in + d_out) r >= d_in d_out``."""
  return factorized_weights(d_in, d_out, rank) >= d_in * d_out


def largest_factorized_rank(d_in: int, d_out: int) -> int:
  """The largest rank whose factors are smaller than the kernel (the merge rule's boundary, minus one)."""
  return (d_in * d_out - 1) // (d_in + d_out)


# ------------------------------------------------------------------------------------- compute path

# How a factorized layer runs: 'factors' applies A, masks the rank axis, applies B;
# 'kernel' forms W = A diag(mask) B and applies it once; 'auto' picks per layer by cost.
COMPUTE_PATHS = ("auto", "factors", "kernel")


# XLA CPU's direct convolution vectorizes over output channels, 16 float32 lanes of AVX-512 at a time:
# a convolution to fewer channels costs about what 16 would (measured on 2 cores: LeNet's conv2 at
# rank 4 takes 1.21x the dense conv's time on the factor path, 1.15x on the kernel path, though the
# factors cost 0.28x its FLOPs; with 32 or more channels the FLOP count ranks the two paths right).
CPU_CONV_LANES = 16


# XLA CPU's direct convolution is slowest with very few input channels: LeNet's first conv (1 -> 6, 5x5,
# batch 128) takes 2.8 ms forward; the same sum as kh * kw * c_in shifted, broadcast multiply-adds takes
# 0.28 ms (3 -> 16 channels 3x3: 1.06 vs 0.43 ms; 6 -> 16 or 3 -> 64: slower, so those stay direct).
SHIFTED_CONV_MAX_IN = 3
SHIFTED_CONV_MAX_WORK = 48  # c_in * c_out


# A shifted convolution's sum is elementwise, so XLA fuses it into the consumers of its output, and in a
# training step it may evaluate the sum once per consumer: LeNet's conv1 (then ReLU and max-pool) 3 times,
# VGG's 3 -> 16 stem with bias (then BatchNorm) 6 times, ResNet's stem without bias once (compiled steps,
# counted in the HLO). On the factor path the matmul by B reads one materialized sum. The kernel path's
# multiply-adds count this many times: LeNet's conv1 then runs its factors (whole train step 0.95x -> 0.86x
# of the dense twin at full rank) and the 3 -> 16 stems keep their kernel (ResNet: 1.04x against 1.09x on
# the factors; VGG measured 0.86x against 0.83x). Where the factors win, they run only under
# differentiation: a forward pass alone (evaluation, inference, exports) evaluates the sum once and forms
# the kernel, since the factors' matmul by B, with r and c_out both tiny, is slow (LeNet's conv1 forward at
# batch 64: 2.2x the kernel path at rank 6, 3.9x at rank 3, 1.5x at rank 2; only rank 1 was faster, 0.6x).
SHIFTED_SUM_COPIES = 1.5


def use_shifted_conv(c_in: int, c_out: int, *, strides: Sequence[int], dilation: Sequence[int], dtype,
                     backend: str) -> bool:
  """Whether a convolution runs as shifted multiply-adds instead of XLA's direct convolution.

  Only on CPU, in float32 (the sum is accumulated in the input dtype), for
  stride 1, no dilation, and few channels (see :data:`SHIFTED_CONV_MAX_IN`).
  The backward pass stays XLA's convolution gradient either way.
  """
  return (backend == "cpu" and jnp.dtype(dtype) == jnp.float32 and tuple(strides) == (1, 1)
          and tuple(dilation) == (1, 1) and c_in <= SHIFTED_CONV_MAX_IN and c_in * c_out <= SHIFTED_CONV_MAX_WORK)


# XLA CPU's direct convolution is slowest on tiny feature maps: VGG's 2x2 stage (128 -> 128 channels, batch
# 32) takes 5.3 ms for forward and backward; the same sum as one matmul of the kh * kw shifted slices
# concatenated (patches) takes 1.0 ms (rank 32 on the factor path: 2.1 -> 0.5 ms). At 4x4 the two are
# within 10% and from 8x8 the direct convolution wins, up to 4x at 32x32.
PATCHES_CONV_MAX_POSITIONS = 4  # output pixels per image


def use_patches_conv(out_height: int, out_width: int, *, backend: str) -> bool:
  """Whether a convolution runs as one matmul of concatenated shifted slices instead of XLA's direct one.

  Only on CPU and only for feature maps of at most
  :data:`PATCHES_CONV_MAX_POSITIONS` output pixels, where the direct
  convolution is several times slower; gradients are those of the slices and
  the matmul.
  """
  return backend == "cpu" and out_height * out_width <= PATCHES_CONV_MAX_POSITIONS


# XLA CPU computes a convolution's input gradient (a transposed convolution back to c_in channels) slowly
# when c_in is narrow and the window large: LeNet's conv2 (5x5, 6 -> 16, batch 128) takes 3.1-3.9 ms; one
# matmul of the output gradient by the kernel, then kh * kw shifted adds (col2im), takes 1.5-1.8 ms (to rank
# 4: 5.7 -> 1.2 ms; 5x5 from 3 channels: 3.1 -> 1.9 ms). With 3x3 windows and 8 or more input channels
# XLA's is as fast or up to 2.5x faster.
MATMUL_INPUT_GRAD_MAX_IN = 6
MATMUL_INPUT_GRAD_MIN_WINDOW = 25  # kh * kw


def use_matmul_input_grad(c_in: int, window: Sequence[int], *, strides: Sequence[int], dilation: Sequence[int],
                          dtype, backend: str) -> bool:
  """Whether a direct convolution's input gradient runs as one matmul and shifted adds instead of XLA's.

  Only on CPU, in float32, for stride 1, no dilation, at most
  :data:`MATMUL_INPUT_GRAD_MAX_IN` input channels and windows of at least
  :data:`MATMUL_INPUT_GRAD_MIN_WINDOW` taps. The forward pass and the kernel
  gradient stay XLA's.
  """
  return (backend == "cpu" and jnp.dtype(dtype) == jnp.float32 and tuple(strides) == (1, 1)
          and tuple(dilation) == (1, 1) and c_in <= MATMUL_INPUT_GRAD_MAX_IN
          and math.prod(window) >= MATMUL_INPUT_GRAD_MIN_WINDOW)


def _wide(width: int, lanes: int) -> int:
  return max(width, lanes) if width else 0


def factor_path_cost(positions: int, d_in: int, d_out: int, rank: int, *, lanes: int = 1) -> int:
  """Multiply-adds of the two-factor apply: ``positions * (d_in + d_out) * rank``.

  ``positions`` is the number of rows the layer maps (every leading axis of a
  dense input; batch times output pixels of a convolution, whose ``d_in`` is
  ``kh * kw * c_in``). The backward pass costs twice the forward on either
  path, so the forward comparison decides training as well. With ``lanes > 1``
  every output width (``rank`` of the first factor, ``d_out`` of the second)
  counts as at least ``lanes`` (see :data:`CPU_CONV_LANES`).
  """
  return positions * (d_in * _wide(rank, lanes) + rank * _wide(d_out, lanes))


def kernel_path_cost(positions: int, d_in: int, d_out: int, rank: int, *, lanes: int = 1) -> int:
  """Multiply-adds of forming ``W = A diag(mask) B`` once and applying it: ``d_in * d_out * (rank + positions)``.

  With ``lanes > 1`` the applied kernel's ``d_out`` counts as at least ``lanes``.
  """
  return d_in * d_out * rank + positions * d_in * _wide(d_out, lanes)


def choose_compute_path(positions: int, d_in: int, d_out: int, rank: int, *, compute_path: str = "auto",
                        lanes: int = 1, kernel_copies: float = 1.0) -> str:
  """The compute path of one factorized layer for one step shape: ``'factors'`` or ``'kernel'``.

  The rule, from static shapes only (never from keep counts, so a new keep count
  never recompiles): run the two factors when their multiply-adds are strictly
  fewer, ``positions * (d_in + d_out) * r < d_in * d_out * (r + positions)``;
  otherwise form the kernel (one matmul or one convolution, the op a dense
  layer runs). ``r`` is the rank axis the step computes with: the capacity for
  a traced keep count, the keep count itself for a static one. The backward
  pass doubles both sides, so one rule serves training and inference.

  Where FLOPs mislead: the convolutions of XLA CPU run narrow outputs at the
  cost of :data:`CPU_CONV_LANES` channels, so on CPU a convolution layer
  passes ``lanes=CPU_CONV_LANES`` and every output width below it counts as
  that width, unless it runs as shifted multiply-adds
  (:func:`use_shifted_conv`) or as one matmul of patches
  (:func:`use_patches_conv`), whose FLOPs rank the paths. Patches + matmul
  costs the same FLOPs as a direct convolution and runs 3.5x slower for
  LeNet's shapes, so only tiny feature maps take it.

  Forming the kernel costs nothing per position, so with many positions (every
  convolution, sequence models) and a rank near ``min(d_in, d_out)`` the kernel
  wins; with few positions (an MLP at batch 128) or a small rank the factors win.

  Args:
    positions: rows the layer maps per call (static).
    d_in: inputs of the matrix view (``kh * kw * c_in`` for a convolution).
    d_out: outputs.
    rank: size of the rank axis computed with.
    compute_path: ``'auto'`` applies the rule; ``'factors'`` or ``'kernel'``
      is returned as given.
    lanes: the narrowest output width the backend runs at full speed (1: FLOPs as they are).
    kernel_copies: weight of the kernel path's cost (:data:`SHIFTED_SUM_COPIES` for shifted convolutions).

  Raises:
    ValueError: an unknown ``compute_path``.
  """
  if compute_path not in COMPUTE_PATHS:
    raise ValueError(f"compute_path must be one of {list(COMPUTE_PATHS)}, got {compute_path!r}")
  if compute_path != "auto":
    return compute_path
  factors = factor_path_cost(positions, d_in, d_out, rank, lanes=lanes)
  kernel = kernel_copies * kernel_path_cost(positions, d_in, d_out, rank, lanes=lanes)
  return "factors" if factors < kernel else "kernel"
