"""Singular values of factorized layers without forming ``A @ B``, and balanced SVD factors.

* :func:`factor_svd`: the exact thin SVD of ``A @ B`` from the factors.
* :func:`layer_singular_values` / :func:`singular_values`: per-layer spectra.
* :func:`svd_reorthogonalize` / :func:`spectral_init` (Khodak et al.): balanced
  SVD factors with the same function, components exactly ordered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from maestro_jax._src import regularizers
from maestro_jax._src import tree

Array = jax.Array
PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST
SPECTRA = ("svd", "scales")

# --------------------------------------------------------------------------- SVD of a factorized layer


def factor_svd(a: Array, b: Array) -> tuple[Array, Array, Array]:
  """The exact thin SVD of ``W = A @ B`` without forming ``W``.

  With reduced QR factorizations ``A = Q_a R_a`` and ``B^T = Q_b R_b``,
  ``W = Q_a (R_a R_b^T) Q_b^T``; the SVD of the small core ``R_a R_b^T = U' S V'^T``
  gives ``U = Q_a U'`` and ``V^T = V'^T Q_b^T``. Cost ``O((m + n) r^2 + r^3)``
  instead of ``O(m n r)``. Jittable. Computed in at least float32.

  Args:
    a: ``(d_in, r)``, or a conv factor ``(kh, kw, c_in, r)`` (taken as the
      matrix ``(kh * kw * c_in, r)``).
    b: ``(r, d_out)``.

  Returns:
    ``(u, s, vt)`` with ``u`` of shape ``(m, k)`` (``m = prod(a.shape[:-1])``),
    ``s`` of shape ``(k,)`` in descending order and ``vt`` of shape ``(k, n)``,
    where ``k = min(m, r, n)``; ``u @ diag(s) @ vt == A @ B`` up to rounding.
  """
  if b.ndim != 2 or a.shape[-1] != b.shape[0]:
    raise ValueError(f"factor shapes {tuple(a.shape)} and {tuple(b.shape)} do not share a rank axis")
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  a = a.reshape(math.prod(a.shape[:-1]), a.shape[-1]).astype(dtype)
  b = b.astype(dtype)
  qa, ra = jnp.linalg.qr(a)  # (m, ka), (ka, r)
  qb, rb = jnp.linalg.qr(b.T)  # (n, kb), (kb, r)
  core = jnp.matmul(ra, rb.T, precision=_HIGHEST)  # (ka, kb)
  uc, s, vct = jnp.linalg.svd(core, full_matrices=False)
  u = jnp.matmul(qa, uc, precision=_HIGHEST)
  vt = jnp.matmul(vct, qb.T, precision=_HIGHEST)
  return u, s, vt


def _masked_factors(layer: Mapping[str, Array], rank) -> tuple[Array, Array]:
  """``A`` and ``B`` with components at index ``>= rank`` zeroed (no-op for ``rank=None``)."""
  a, b = layer["a"], layer["b"]
  if rank is None:
    return a, b
  cap = a.shape[-1]
  live = jnp.arange(cap) < rank
  a = jnp.where(live.reshape((1,) * (a.ndim - 1) + (cap,)), a, jnp.zeros((), a.dtype))
  b = jnp.where(live.reshape(cap, 1), b, jnp.zeros((), b.dtype))
  return a, b


def _pad(x: Array, size: int, axis: int) -> Array:
  missing = size - x.shape[axis]
  if missing <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, missing)
  return jnp.pad(x, widths)


def layer_singular_values(layer: Mapping[str, Array], rank: int | Array | None = None, *,
                          spectrum: str = "svd") -> Array:
  """Per-component singular values of one factorized layer, shape ``(capacity,)``, descending.

  Args:
    layer: ``{'a', 'b', ...}``.
    rank: current rank; components at index ``>= rank`` are left out (the
      values of the first ``rank`` factors only) and their entries are zero.
    spectrum: ``'svd'`` gives the exact singular values of
      ``A[..., :rank] @ B[:rank]`` via :func:`factor_svd`; ``'scales'`` gives the
      cheaper ``||A[..., k]|| ||B[k]||`` (:func:`maestro_jax.component_scales`),
      sorted descending — equal to the singular values when the factors are
      balanced SVD factors (e.g. after :func:`svd_reorthogonalize`), an
      approximation otherwise.
  """
  cap = layer["a"].shape[-1]
  if spectrum == "svd":
    a, b = _masked_factors(layer, rank)
    _, s, _ = factor_svd(a, b)
    s = _pad(s.astype(jnp.float32), cap, 0)
  elif spectrum == "scales":
    a, b = _masked_factors(layer, rank)
    s = jnp.sort(regularizers.component_scales({"a": a, "b": b}))[::-1]
  else:
    raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {list(SPECTRA)}")
  if rank is not None:
    s = jnp.where(jnp.arange(cap) < rank, s, 0.0)
  return s


def singular_values(params: PyTree, ranks: Mapping[str, Any] | None = None, *,
                    spectrum: str = "svd") -> dict[str, Array]:
  """:func:`layer_singular_values` of every factorized layer, keyed by layer name."""
  layers = tree.factorized_layers(params)
  ranks = dict(ranks or {})
  tree.check_names(ranks, layers, "layers in ranks")
  return {name: layer_singular_values(layer, ranks.get(name), spectrum=spectrum) for name, layer in layers.items()}


def svd_reorthogonalize(params: PyTree, ranks: Mapping[str, Any] | None = None) -> PyTree:
  """Replaces every layer's factors by the balanced SVD factors of ``A @ B``.

  ``A = U sqrt(S)``, ``B = sqrt(S) V^T`` (from :func:`factor_svd`, padded with
  zero components up to the capacity), so the function is unchanged and
  components come out exactly ordered by singular value, with
  ``||A_k|| ||B_k|| = sigma_k``. Other keys (bias) are kept; dtypes are kept.
  Jittable. Optimizer state (momentum, moments) refers to the old factor
  basis: re-initialize it, or accept the mismatch.

  Args:
    params: parameter tree holding factorized layers.
    ranks: optional current rank per layer; components past it are left out
      and come back as zeros.
  """
  layers = tree.factorized_layers(params)
  ranks = dict(ranks or {})
  tree.check_names(ranks, layers, "layers in ranks")

  def one(name: str, layer: Mapping[str, Array]) -> dict[str, Array]:
    a, b = _masked_factors(layer, ranks.get(name))
    cap = a.shape[-1]
    u, s, vt = factor_svd(a, b)
    root = jnp.sqrt(jnp.maximum(s, 0.0))
    new_a = _pad(u * root.reshape(1, -1), cap, 1).reshape(a.shape)
    new_b = _pad(vt * root.reshape(-1, 1), cap, 0)
    out = dict(layer)
    out["a"], out["b"] = new_a.astype(a.dtype), new_b.astype(b.dtype)
    return out

  return tree.map_layers(one, params)


def spectral_init(params: PyTree) -> PyTree:
  """Spectral initialization (Khodak et al.): factors from the SVD of each layer's product.

  Alias of :func:`svd_reorthogonalize`: applied to freshly initialized factors
  it gives ``A = U sqrt(S)``, ``B = sqrt(S) V^T`` of the dense kernel ``A @ B``.
  Pair it with :func:`maestro_jax.frobenius_decay` for the Khodak et al. baseline.
  """
  return svd_reorthogonalize(params)
