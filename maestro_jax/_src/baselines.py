"""Pufferfish and post-hoc truncated SVD: a dense parameter tree turned into factorized layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from maestro_jax._src import convert

Array = jax.Array
PyTree = Any

# --------------------------------------------------------------------------- Pufferfish / truncated SVD


def factorize_dense_params(dense_params: PyTree, rank_fraction: float = 1.0, *,
                           ranks: Mapping[str, int] | None = None, skip_first: int = 0,
                           layer_order: Sequence[str] | None = None, skip: Sequence[str] = ()) -> PyTree:
  """Factorizes a dense parameter tree by truncated SVD (Pufferfish; post-hoc truncation).

  Every node ``{'kernel': (d_in, d_out) or (kh, kw, c_in, c_out), 'bias'?, ...}``
  and every Flax attention node becomes factorized layers ``{'a', 'b', 'bias'?, ...}``
  made by :func:`maestro_jax.factorize_kernel` at rank
  ``fraction_to_rank(rank_fraction, full_rank)`` (or ``ranks[name]``): the best
  approximation of that rank, exact at full rank. All other leaves pass through.
  The same converter as ``maestro_jax.linen.factorize_params``.

  Args:
    dense_params: nested dicts of a dense model (e.g. an NNX/Linen pure dict).
    rank_fraction: share of each kernel's full rank ``min(prod(shape[:-1]), shape[-1])`` to keep.
    ranks: explicit rank per layer name, overriding ``rank_fraction``.
    skip_first: leave the first ``skip_first`` layers dense (Pufferfish keeps
      the first layers full rank).
    layer_order: layer names giving the order ``skip_first`` counts in; the
      tree order (``maestro_jax.dense_layer_names``) by default.
    skip: further layer names to leave dense (e.g. the classifier).

  Returns:
    The parameter tree with the chosen layers factorized.
  """
  return convert.factorize_tree(dense_params, rank_fraction=rank_fraction, ranks=ranks, skip=skip,
                                skip_first=skip_first, layer_order=layer_order)


def truncate_dense_params(dense_params: PyTree, ranks: Mapping[str, int] | float) -> PyTree:
  """Post-hoc truncated SVD of a trained dense model: every dense/conv layer factorized and truncated.

  Args:
    dense_params: nested dicts of a dense model.
    ranks: a rank per layer name (layers not named keep full rank), or one
      fraction in ``(0, 1]`` of every layer's full rank.

  Returns:
    The factorized parameter tree (see :func:`factorize_dense_params`).
  """
  if isinstance(ranks, Mapping):
    return factorize_dense_params(dense_params, 1.0, ranks=ranks)
  return factorize_dense_params(dense_params, float(ranks))
