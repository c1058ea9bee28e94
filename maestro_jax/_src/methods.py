"""Related low-rank methods and baselines on plain parameter trees.

* :func:`factor_svd`: the exact thin SVD of ``A @ B`` without forming it.
* Decomposable-Net (Yaguchi et al.): :func:`decomposable_sampler` keeps a random
  global share ``Z ~ U(low, high)`` of all components, chosen network-wide by
  singular value; :func:`global_budget_keeps` is its deterministic version.
* :func:`svd_reorthogonalize` / :func:`spectral_init` (Khodak et al.): balanced
  SVD factors with the same function, components exactly ordered.
* Factor freezing (Hajimolahoseini et al.): :func:`freeze_mask`,
  :func:`frozen_optimizer`, :func:`refreeze_state`,
  :func:`stop_frozen_gradients`, :func:`sequential_freeze_schedule`.
* Pufferfish and post-hoc truncated SVD: :func:`factorize_dense_params` and
  :func:`truncate_dense_params` turn a dense parameter tree into factorized layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maestro_jax._src import factorized
from maestro_jax._src import regularizers
from maestro_jax._src import sampling
from maestro_jax._src import tree

Array = jax.Array
PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
SPECTRA = ("svd", "scales")
FACTORS = ("a", "b")

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


# --------------------------------------------------------------------------- Decomposable-Net


def _global_keeps(params: PyTree, fraction, ranks: Mapping[str, Any] | None, normalized: bool, spectrum: str,
                  min_keep: int) -> dict[str, Array]:
  """Keeps ``ceil(fraction * sum(ranks))`` components network-wide with the largest scores.

  Each layer's scores are its singular values (descending), optionally divided
  by its largest one. All layers' scores are concatenated (static length: the
  sum of capacities), components past a layer's rank score ``-inf``, and a
  stable descending argsort picks exactly ``K`` components (ties go to the
  earlier layer, then the earlier component). Since scores are descending
  within a layer, a layer's picked components are a prefix and its keep count
  is just how many of them were picked.
  """
  if spectrum not in SPECTRA:
    raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {list(SPECTRA)}")
  if min_keep < 0:
    raise ValueError(f"min_keep must be >= 0, got {min_keep}")
  layers = tree.factorized_layers(params)
  if not layers:
    raise ValueError("the model has no factorized layers to choose components from")
  ranks = dict(ranks or {})
  tree.check_names(ranks, layers, "layers in ranks")
  params = jax.lax.stop_gradient(params)
  names, scores, live_ranks, caps = [], [], [], []
  for name, layer in layers.items():
    cap = factorized.capacity(layer)
    rank = jnp.clip(jnp.asarray(ranks.get(name, cap), jnp.int32), 0, cap)
    s = layer_singular_values(layer, rank, spectrum=spectrum)
    if normalized:
      top = s[0]
      s = jnp.where(top > 0, s / jnp.where(top > 0, top, 1.0), 0.0)
    scores.append(jnp.where(jnp.arange(cap) < rank, s, -jnp.inf))
    names.append(name)
    live_ranks.append(rank)
    caps.append(cap)
  r = jnp.stack(live_ranks)
  total = jnp.sum(r)
  k = sampling._fraction_of(jnp.asarray(fraction, jnp.float32), total)  # ceil(fraction * total), in [1, total]
  v = jnp.concatenate(scores)
  order = jnp.argsort(-v, stable=True)
  position = jnp.zeros(v.shape, jnp.int32).at[order].set(jnp.arange(v.shape[0], dtype=jnp.int32))
  picked = (position < k).astype(jnp.int32)
  keeps, start = {}, 0
  for name, rank, cap in zip(names, live_ranks, caps):
    count = jnp.sum(picked[start:start + cap])
    keeps[name] = jnp.maximum(count, jnp.minimum(min_keep, rank)).astype(jnp.int32)
    start += cap
  return keeps


def global_budget_keeps(params: PyTree, fraction: float | Array, ranks: Mapping[str, Any] | None = None, *,
                        normalized: bool = False, spectrum: str = "svd", min_keep: int = 0) -> dict[str, Array]:
  """Decomposable-Net's deterministic global budget: keep counts for a share of all components.

  ``K = ceil(fraction * sum(ranks))`` components are kept network-wide — those
  with the largest singular values across all layers (raw ``sigma_k``, or with
  ``normalized`` ``sigma_k / sigma_0`` of their layer, i.e. ``sigma_k / ||W||_2``).
  Within a layer singular values are descending, so each layer keeps a prefix;
  its keep count is the number of its singular values among the global top ``K``.
  Ties are broken by layer order, so the counts sum to exactly ``K``
  (``min_keep > 0`` can only add to that). Jittable; ``fraction`` and ``ranks``
  may be traced (vmap over ``fraction`` for a sweep).

  Args:
    params: parameter tree holding factorized layers.
    fraction: share of components to keep, in ``(0, 1]``.
    ranks: current rank per layer name (defaults to capacity); components past
      the rank are neither counted in the total nor kept.
    normalized: rank components by ``sigma_k / sigma_0`` of their layer.
    spectrum: ``'svd'`` (exact singular values of the factors' product, via
      :func:`factor_svd`) or ``'scales'`` (``||A_k|| ||B_k||``, sorted; cheaper,
      exact only for balanced SVD factors). See :func:`layer_singular_values`.
    min_keep: every layer keeps at least ``min(min_keep, rank)`` components
      (0, the paper's rule, lets a layer drop to its bias).

  Returns:
    ``{layer name: int32 scalar}`` for every factorized layer, ``0 <= keep <= rank``.
  """
  return _global_keeps(params, fraction, ranks, normalized, spectrum, min_keep)


def decomposable_sampler(low: float = 0.01, high: float = 1.0, normalized: bool = False, *,
                         spectrum: str = "svd", min_keep: int = 0) -> sampling.Sampler:
  """Decomposable-Net's sampler: a global share ``Z ~ U(low, high)`` of all components per step.

  The returned sampler has ``needs_params = True`` and is called as
  ``sampler(key, ranks, params)`` (as :func:`maestro_jax.training.make_train_step`
  does); it draws ``Z`` and returns :func:`global_budget_keeps` at ``Z``
  (``K = ceil(Z * sum(ranks))`` components with the largest singular values
  network-wide). Jittable with traced ranks; the singular values are
  recomputed from the (gradient-stopped) factors every call.

  Args:
    low: smallest share, ``0 < low <= high``.
    high: largest share, ``<= 1``.
    normalized: rank components by ``sigma_k / sigma_0`` of their layer.
    spectrum: ``'svd'`` (exact, default) or ``'scales'`` (cheap; see
      :func:`layer_singular_values`).
    min_keep: minimum keep count per layer (see :func:`global_budget_keeps`).

  Returns:
    ``sampler(key, ranks, params) -> {layer name: int32 scalar}``.
  """
  if not 0.0 < low <= high <= 1.0:
    raise ValueError(f"need 0 < low <= high <= 1, got low={low}, high={high}")
  if spectrum not in SPECTRA:
    raise ValueError(f"unknown spectrum {spectrum!r}; choose one of {list(SPECTRA)}")

  def sample(key: Array, ranks: Mapping[str, Any] | None, params: PyTree) -> dict[str, Array]:
    z = jax.random.uniform(key, (), jnp.float32, low, high)
    return _global_keeps(params, z, ranks, normalized, spectrum, min_keep)

  sample.needs_params = True
  return sample


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


# --------------------------------------------------------------------------- factor freezing


def freeze_mask(params: PyTree, frozen: Mapping[str, str]) -> PyTree:
  """A boolean tree like ``params``: True where a leaf trains, False for frozen factors.

  Args:
    params: parameter tree holding factorized layers.
    frozen: ``{layer name: 'a' | 'b'}``, the factor to freeze in each named layer.
      Biases and all other leaves stay trainable.
  """
  layers = tree.factorized_layers(params)
  tree.check_names(frozen, layers, "layers in frozen")
  for name, which in frozen.items():
    if which not in FACTORS:
      raise ValueError(f"layer {name!r}: frozen factor must be 'a' or 'b', got {which!r}")

  def one(name: str, layer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: jax.tree.map(lambda _, k=k: k != frozen.get(name), v) for k, v in layer.items()}

  with_layers = tree.map_layers(one, params)
  return jax.tree.map(lambda x: x if isinstance(x, bool) else True, with_layers)


def frozen_optimizer(optimizer: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
  """``optimizer`` on the trainable leaves; frozen leaves (``mask`` False) get exactly zero updates.

  Built with ``optax.multi_transform``: frozen leaves never reach ``optimizer``
  (no momentum, weight decay or optimizer state for them) and receive
  ``optax.set_to_zero()``, so ``optax.apply_updates`` leaves them bitwise
  unchanged. The state's structure depends on the mask; when the frozen set
  changes, carry the state over with :func:`refreeze_state`.
  """
  labels = jax.tree.map(lambda trainable: "trainable" if trainable else "frozen", mask)
  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def refreeze_state(optimizer: optax.GradientTransformation, params: PyTree, opt_state: PyTree) -> PyTree:
  """State for a new :func:`frozen_optimizer` after the frozen set changed, reusing ``opt_state``.

  Entries of newly frozen leaves are dropped, entries of still-trainable leaves
  (momentum, Adam moments, step counts) are carried over from ``opt_state``, and
  newly unfrozen leaves start from a fresh ``optimizer.init``.

  Args:
    optimizer: the new frozen optimizer (same inner optimizer, new mask).
    params: current parameters.
    opt_state: state of the previous frozen optimizer.
  """
  fresh = optimizer.init(params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return jax.tree.map(lambda new, old: new if masked(new) or masked(old) else old, fresh, opt_state,
                      is_leaf=masked)


def stop_frozen_gradients(params: PyTree, mask: PyTree) -> PyTree:
  """``params`` with ``jax.lax.stop_gradient`` on frozen leaves (``mask`` False).

  Apply inside the loss so XLA drops the frozen factors' weight-gradient
  matmuls — the training speed-up of freezing. Values are unchanged.
  """
  return jax.tree.map(lambda p, trainable: p if trainable else jax.lax.stop_gradient(p), params, mask)


def sequential_freeze_schedule(layer_names: Sequence[str], epochs: int, factor: str = "a",
                               start_epoch: int = 1) -> Callable[[int], dict[str, str]]:
  """Freezes one factor of each layer, one layer after another.

  Rule: with ``interval = max(1, epochs // len(layer_names))``, layer ``i``
  (in the given order) is frozen from epoch ``start_epoch + i * interval`` on
  (epochs count from 0). A layer once frozen stays frozen.

  Args:
    layer_names: layers in freezing order (e.g. ``maestro_jax.factorized_layers(params)``).
    epochs: number of epochs to spread the freezing over.
    factor: the factor to freeze, ``'a'`` or ``'b'``.
    start_epoch: epoch at which the first layer freezes.

  Returns:
    ``schedule(epoch) -> {layer name: factor}`` for the layers frozen at that epoch.
  """
  if factor not in FACTORS:
    raise ValueError(f"factor must be 'a' or 'b', got {factor!r}")
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  names = list(layer_names)
  interval = max(1, epochs // max(len(names), 1))

  def schedule(epoch: int) -> dict[str, str]:
    return {name: factor for i, name in enumerate(names) if epoch >= start_epoch + i * interval}

  return schedule


# --------------------------------------------------------------------------- Pufferfish / truncated SVD


def _is_dense(node: Any) -> bool:
  return (isinstance(node, Mapping) and "kernel" in node and hasattr(node["kernel"], "ndim")
          and node["kernel"].ndim in (2, 4))


def dense_layers(dense_params: PyTree) -> list[str]:
  """Dotted names of the dense/conv nodes (``{'kernel': 2-D or 4-D, ...}``) in tree order."""
  found = []

  def walk(node, path):
    if _is_dense(node):
      found.append(tree.path_name(path))
    elif isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, path + (key,))

  walk(dense_params, ())
  return found


def _rank_for(fraction: float, full: int) -> int:
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"rank fraction must be in (0, 1], got {fraction}")
  return max(1, math.ceil(round(fraction * full, 6)))


def factorize_dense_params(dense_params: PyTree, rank_fraction: float = 1.0, *,
                           ranks: Mapping[str, int] | None = None, skip_first: int = 0,
                           layer_order: Sequence[str] | None = None, skip: Sequence[str] = ()) -> PyTree:
  """Factorizes a dense parameter tree by truncated SVD (Pufferfish; post-hoc truncation).

  Every node ``{'kernel': (d_in, d_out) or (kh, kw, c_in, c_out), 'bias'?, ...}``
  becomes a factorized layer ``{'a', 'b', 'bias'?, ...}`` made by
  :func:`maestro_jax.factorize_kernel` at rank ``ceil(rank_fraction * full_rank)``
  (or ``ranks[name]``): the best approximation of that rank, exact at full rank.
  Nodes with kernels of other ranks and all other leaves pass through.

  Args:
    dense_params: nested dicts of a dense model (e.g. an NNX/Linen pure dict).
    rank_fraction: share of each kernel's full rank ``min(prod(shape[:-1]), shape[-1])`` to keep.
    ranks: explicit rank per layer name, overriding ``rank_fraction``.
    skip_first: leave the first ``skip_first`` layers dense (Pufferfish keeps
      the first layers full rank).
    layer_order: layer names giving the order ``skip_first`` counts in; the
      tree order (:func:`dense_layers`) by default.
    skip: further layer names to leave dense (e.g. the classifier).

  Returns:
    The parameter tree with the chosen layers factorized.
  """
  names = dense_layers(dense_params)
  order = names if layer_order is None else list(layer_order)
  tree.check_names(order, dict.fromkeys(names), "layers in layer_order")
  ranks = dict(ranks or {})
  tree.check_names(ranks, dict.fromkeys(names), "layers in ranks")
  tree.check_names(skip, dict.fromkeys(names), "layers in skip")
  if skip_first < 0:
    raise ValueError(f"skip_first must be >= 0, got {skip_first}")
  keep_dense = set(order[:skip_first]) | set(skip)

  def rebuild(node, path):
    name = tree.path_name(path)
    if _is_dense(node):
      if name in keep_dense:
        return node
      kernel = node["kernel"]
      full = factorized.full_rank(kernel.shape)
      rank = int(ranks[name]) if name in ranks else _rank_for(rank_fraction, full)
      out = {k: v for k, v in node.items() if k not in ("kernel", "bias")}
      out.update(factorized.factorize_kernel(kernel, node.get("bias"), rank, name=name))
      return out
    if isinstance(node, Mapping):
      return {k: rebuild(v, path + (k,)) for k, v in node.items()}
    return node

  return rebuild(dense_params, ())


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
