"""The table of factorized layer kinds: the one place a kind is told from array shapes.

Every part of the library that needs to know what a layer's arrays mean — its
matrix view ``(d_in, d_out)``, its kernel shape, how to apply it — asks this
table. Adding a kind is one entry here plus its NNX and Linen skin classes.

A layer is a dict: factors ``{'a', 'b', 'bias'?}`` or one kernel
``{'kernel', 'bias'?}`` (a merged layer, or a plain Flax layer). The rank axis
is the last axis of ``A`` and the first of ``B``; every other axis of ``A`` is
an input axis of the matrix view.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from maestro_jax._src import factorized


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """One kind of factorized layer.

  Attributes:
    name: the kind's name.
    factor_ndim: dimensions of factor ``A`` and of the dense kernel.
    apply: ``apply(params, x, keep, **options)``, the core function (e.g.
      :func:`maestro_jax.dense`); ``options`` are the layer's own settings
      (strides, padding, ...).
    options: the names of the settings ``apply`` takes from a layer.
  """
  name: str
  factor_ndim: int
  apply: Callable[..., Any]
  options: tuple[str, ...] = ()


KINDS: dict[str, LayerKind] = {
    # Dense layers; a DenseGeneral/LinearGeneral layer is stored as a dense layer
    # over its flattened axes and its skin reshapes inputs and outputs.
    "dense": LayerKind("dense", 2, factorized.dense),
    # 2-D convolutions: A is a (kh, kw, c_in, r) spatial conv, B a 1x1 conv r -> c_out.
    "conv": LayerKind("conv", 4, factorized.conv, ("strides", "padding", "dilation")),
}


def first_array(layer: Mapping[str, Any]):
  """The array the input meets first: factor ``A``, or the ``kernel`` of a merged or plain layer."""
  return layer["a"] if "a" in layer else layer["kernel"]


def find_kind(layer: Mapping[str, Any]) -> LayerKind | None:
  """The kind of a factorized, merged or plain layer, from its first array's number of dimensions; None if no kind fits."""
  ndim = len(first_array(layer).shape)
  return next((kind for kind in KINDS.values() if kind.factor_ndim == ndim), None)


def kind_of(layer: Mapping[str, Any], name: str | None = None) -> LayerKind:
  """Like :func:`find_kind`, but raises a ValueError naming the layer when no kind fits."""
  kind = find_kind(layer)
  if kind is not None:
    return kind
  ndim = len(first_array(layer).shape)
  where = f"layer {name!r}: " if name else ""
  raise ValueError(f"{where}no layer kind has {ndim}-D factors or kernels; the kinds are "
                   + ", ".join(f"{k.name} ({k.factor_ndim}-D)" for k in KINDS.values()))


def kernel_shape(layer: Mapping[str, Any]) -> tuple[int, ...]:
  """The shape of the layer's dense kernel, ``A.shape[:-1] + (d_out,)``."""
  if "a" in layer:
    return tuple(int(d) for d in layer["a"].shape[:-1]) + (int(layer["b"].shape[-1]),)
  return tuple(int(d) for d in layer["kernel"].shape)


def matrix_dims(layer: Mapping[str, Any]) -> tuple[int, int]:
  """``(d_in, d_out)`` of the layer's matrix view (``kh * kw * c_in`` inputs for a convolution)."""
  shape = kernel_shape(layer)
  return math.prod(shape[:-1]), shape[-1]
