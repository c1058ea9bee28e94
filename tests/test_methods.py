"""Tests for the related methods and baselines (maestro_jax/_src/methods.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import maestro_jax as mj


def _randn(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _product(layer):
  a, b = np.asarray(layer["a"], np.float64), np.asarray(layer["b"], np.float64)
  return a.reshape(-1, a.shape[-1]) @ b


def _params():
  """Unbalanced, unordered random factors: component scales are not the singular values."""
  return {
      "fc": {"a": _randn(0, (7, 4)), "b": _randn(1, (4, 5), 0.3), "bias": _randn(2, (5,))},
      "block": {"conv": {"a": _randn(3, (3, 3, 2, 5), 2.0), "b": _randn(4, (5, 6))},
                "norm": {"scale": jnp.ones((6,))}},
      "head": {"a": _randn(5, (6, 3), 0.5), "b": _randn(6, (3, 4))},
  }


def _with_spectrum(seed, d_in, d_out, s):
  """A balanced factorized layer whose product has the given singular values."""
  rng = np.random.default_rng(seed)
  p, _ = np.linalg.qr(rng.standard_normal((d_in, len(s))))
  q, _ = np.linalg.qr(rng.standard_normal((d_out, len(s))))
  return mj.factorize_kernel(jnp.asarray(p @ np.diag(s) @ q.T, jnp.float32), rank=len(s))


# --------------------------------------------------------------------------- factor_svd


@pytest.mark.parametrize("a_shape,b_shape", [((7, 4), (4, 5)), ((3, 5), (5, 4)), ((3, 3, 2, 5), (5, 6)),
                                             ((9, 6), (6, 2))])
def test_factor_svd_matches_svd_of_product(a_shape, b_shape):
  a, b = _randn(10, a_shape), _randn(11, b_shape)
  u, s, vt = jax.jit(mj.factor_svd)(a, b)
  w = np.asarray(a).reshape(-1, a_shape[-1]).astype(np.float64) @ np.asarray(b, np.float64)
  k = min(w.shape[0], a_shape[-1], w.shape[1])
  assert u.shape == (w.shape[0], k) and s.shape == (k,) and vt.shape == (k, w.shape[1])
  ref = np.asarray(jnp.linalg.svd(jnp.asarray(w, jnp.float32), compute_uv=False))[:k]
  np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-5, atol=1e-5 * ref[0])
  assert np.all(np.diff(np.asarray(s)) <= 0)
  recon = np.asarray(u, np.float64) @ np.diag(np.asarray(s, np.float64)) @ np.asarray(vt, np.float64)
  np.testing.assert_allclose(recon, w, atol=1e-5 * ref[0])
  np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(k), atol=1e-5)
  np.testing.assert_allclose(np.asarray(vt) @ np.asarray(vt).T, np.eye(k), atol=1e-5)


def test_factor_svd_rejects_mismatched_factors():
  with pytest.raises(ValueError, match="rank axis"):
    mj.factor_svd(jnp.ones((3, 4)), jnp.ones((5, 2)))


def test_layer_singular_values_respect_rank_and_spectrum():
  layer = _params()["fc"]
  s = np.asarray(mj.layer_singular_values(layer, 3))
  a, b = np.asarray(layer["a"], np.float64), np.asarray(layer["b"], np.float64)
  ref = np.linalg.svd(a[:, :3] @ b[:3], compute_uv=False)[:3]
  np.testing.assert_allclose(s[:3], ref, rtol=1e-5)
  assert s.shape == (4,) and s[3] == 0.0
  # 'scales' are the sorted component scales: not the singular values for unbalanced factors ...
  scales = np.asarray(mj.layer_singular_values(layer, spectrum="scales"))
  np.testing.assert_allclose(scales, np.sort(np.asarray(mj.component_scales(layer)))[::-1], rtol=1e-6)
  assert not np.allclose(scales, np.asarray(mj.layer_singular_values(layer)), rtol=1e-2)
  # ... but they are for balanced SVD factors.
  balanced = mj.svd_reorthogonalize({"fc": layer})["fc"]
  np.testing.assert_allclose(np.asarray(mj.layer_singular_values(balanced, spectrum="scales")),
                             np.asarray(mj.layer_singular_values(layer)), rtol=1e-5)
  with pytest.raises(ValueError, match="spectrum"):
    mj.layer_singular_values(layer, spectrum="bogus")


# --------------------------------------------------------------------------- Decomposable-Net


def _check_global_choice(params, keeps, ranks, fraction, normalized, spectrum="svd"):
  """Counts sum to K, stay within rank, and every kept value beats every dropped live one."""
  total = sum(ranks.values())
  k = math.ceil(round(fraction * total, 6))
  assert sum(int(v) for v in keeps.values()) == k
  sv = {n: np.asarray(v) for n, v in mj.singular_values(params, ranks, spectrum=spectrum).items()}
  kept, dropped = [], []
  for name, s in sv.items():
    if normalized:
      s = s / s[0]
    keep, rank = int(keeps[name]), ranks[name]
    assert keeps[name].dtype == jnp.int32 and 0 <= keep <= rank
    kept += list(s[:keep])
    dropped += list(s[keep:rank])
  if kept and dropped:
    assert min(kept) >= max(dropped) - 1e-6


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("spectrum", ["svd", "scales"])
def test_global_budget_keeps_top_components(normalized, spectrum):
  params = _params()
  ranks = {"fc": 4, "block.conv": 5, "head": 3}
  for fraction in (0.05, 0.3, 0.5, 0.77, 1.0):
    keeps = mj.global_budget_keeps(params, fraction, normalized=normalized, spectrum=spectrum)
    assert set(keeps) == set(ranks)
    _check_global_choice(params, keeps, ranks, fraction, normalized, spectrum)
  full = mj.global_budget_keeps(params, 1.0, normalized=normalized, spectrum=spectrum)
  assert {n: int(v) for n, v in full.items()} == ranks


def test_global_budget_keeps_exact_total_with_ties():
  layer = _with_spectrum(0, 6, 5, [3.0, 2.0, 1.0, 0.5])
  params = {"x": layer, "y": jax.tree.map(lambda v: v, layer)}
  for fraction, expected in [(0.25, {"x": 1, "y": 1}), (0.375, {"x": 2, "y": 1}), (0.5, {"x": 2, "y": 2})]:
    keeps = mj.global_budget_keeps(params, fraction)
    assert {n: int(v) for n, v in keeps.items()} == expected


def test_normalized_and_raw_choices_differ():
  params = {"big": _with_spectrum(1, 6, 5, [10.0, 9.0, 8.0]),
            "small": _with_spectrum(2, 5, 4, [1.0, 0.95, 0.9])}
  raw = mj.global_budget_keeps(params, 0.5)  # K = 3 of 6
  norm = mj.global_budget_keeps(params, 0.5, normalized=True)
  assert {n: int(v) for n, v in raw.items()} == {"big": 3, "small": 0}
  # Normalized: big 1, .9, .8; small 1, .95, .9 -> the top three are big[0], small[0], small[1].
  assert {n: int(v) for n, v in norm.items()} == {"big": 1, "small": 2}
  floor = mj.global_budget_keeps(params, 0.5, min_keep=1)
  assert {n: int(v) for n, v in floor.items()} == {"big": 3, "small": 1}


def test_global_budget_keeps_jit_traced_ranks_ignores_dead_components():
  params = _params()
  traces = [0]

  @jax.jit
  def keeps_fn(params, fraction, ranks):
    traces[0] += 1
    return mj.global_budget_keeps(params, fraction, ranks)

  for ranks in ({"fc": 4, "block.conv": 5, "head": 3}, {"fc": 2, "block.conv": 3, "head": 1},
                {"fc": 1, "block.conv": 1, "head": 1}):
    traced = {n: jnp.asarray(r, jnp.int32) for n, r in ranks.items()}
    for fraction in (0.2, 0.6):
      keeps = keeps_fn(params, jnp.float32(fraction), traced)
      _check_global_choice(params, keeps, ranks, fraction, False)
      eager = mj.global_budget_keeps(params, fraction, ranks)
      assert {n: int(v) for n, v in keeps.items()} == {n: int(v) for n, v in eager.items()}
  assert traces[0] == 1


def test_decomposable_sampler_distribution():
  params = _params()
  ranks = {"fc": jnp.int32(4), "block.conv": jnp.int32(5), "head": jnp.int32(3)}
  sampler = mj.decomposable_sampler(0.2, 0.9)
  assert isinstance(sampler, mj.samplers.ParamSampler)
  keys = jax.random.split(jax.random.key(0), 4000)
  out = jax.jit(jax.vmap(lambda k: sampler(k, ranks, params)))(keys)
  totals = sum(np.asarray(v) for v in out.values())
  for name, rank in ranks.items():
    assert out[name].dtype == jnp.int32
    assert np.asarray(out[name]).min() >= 0 and np.asarray(out[name]).max() <= int(rank)
  # K = ceil(Z * 12) with Z ~ U(0.2, 0.9): K uniform-ish over 3..11, each value with its interval's share.
  assert totals.min() == 3 and totals.max() == 11
  counts = np.bincount(totals, minlength=12)
  for k in range(4, 11):  # full-width intervals ((k-1)/12, k/12]: probability (1/12) / 0.7
    np.testing.assert_allclose(counts[k] / len(totals), 1 / 12 / 0.7, atol=0.025)
  # Each draw is a global top-K choice.
  for i in range(0, 4000, 500):
    keeps = {n: v[i] for n, v in out.items()}
    _check_global_choice(params, keeps, {n: int(r) for n, r in ranks.items()}, int(totals[i]) / 12, False)


def test_decomposable_sampler_validates():
  with pytest.raises(ValueError, match="low"):
    mj.decomposable_sampler(0.0, 1.0)
  with pytest.raises(ValueError, match="low"):
    mj.decomposable_sampler(0.6, 0.5)
  with pytest.raises(ValueError, match="spectrum"):
    mj.decomposable_sampler(spectrum="eig")
  with pytest.raises(ValueError, match="unknown layers"):
    mj.global_budget_keeps(_params(), 0.5, {"nope": 1})


# --------------------------------------------------------------------------- SVD re-orthogonalization


def test_svd_reorthogonalize_keeps_function_and_orders_components():
  params = _params()
  new = jax.jit(mj.svd_reorthogonalize)(params)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  np.testing.assert_array_equal(np.asarray(new["fc"]["bias"]), np.asarray(params["fc"]["bias"]))
  for name, layer in mj.factorized_layers(params).items():
    new_layer = mj.factorized_layers(new)[name]
    assert new_layer["a"].shape == layer["a"].shape and new_layer["b"].shape == layer["b"].shape
    w = _product(layer)
    np.testing.assert_allclose(_product(new_layer), w, atol=1e-5 * np.abs(w).max())
    s = np.linalg.svd(w, compute_uv=False)
    scales = np.asarray(mj.component_scales(new_layer))
    np.testing.assert_allclose(scales[:len(s)], s[:len(scales)], rtol=1e-5, atol=1e-6 * s[0])
    col = np.linalg.norm(np.asarray(new_layer["a"]).reshape(-1, scales.shape[0]), axis=0)
    np.testing.assert_allclose(col, np.linalg.norm(np.asarray(new_layer["b"]), axis=1), rtol=1e-5)
  x = _randn(20, (2, 7))
  np.testing.assert_allclose(mj.dense(new["fc"], x), mj.dense(params["fc"], x), rtol=1e-5, atol=1e-5)
  img = _randn(21, (2, 5, 5, 2))
  np.testing.assert_allclose(mj.conv(new["block"]["conv"], img), mj.conv(params["block"]["conv"], img),
                             rtol=1e-4, atol=1e-4)
  spectral = mj.spectral_init(params)
  for got, want in zip(jax.tree.leaves(spectral), jax.tree.leaves(new)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_svd_reorthogonalize_with_ranks_zeroes_dead_components():
  params = _params()
  new = mj.svd_reorthogonalize(params, {"block.conv": 2})
  conv = new["block"]["conv"]
  assert np.all(np.asarray(conv["a"])[..., 2:] == 0) and np.all(np.asarray(conv["b"])[2:] == 0)
  old = params["block"]["conv"]
  w = _product(mj.truncate_layer(old, 2))
  np.testing.assert_allclose(_product(conv), w, atol=1e-5 * np.abs(w).max())


# --------------------------------------------------------------------------- Frobenius decay


@pytest.mark.parametrize("which", ["fc", "conv"])
def test_frobenius_decay_gradient_matches_formed_product(which):
  params = _params()
  layer = params["fc"] if which == "fc" else params["block"]["conv"]
  factors = {"a": layer["a"], "b": layer["b"]}

  def formed(f):
    a = f["a"].reshape(-1, f["a"].shape[-1])
    return jnp.sum(jnp.square(jnp.matmul(a, f["b"], precision="highest")))

  np.testing.assert_allclose(mj.frobenius_decay({"l": factors}), formed(factors), rtol=1e-5)
  got = jax.grad(lambda f: mj.frobenius_decay({"l": f}))(factors)
  want = jax.grad(formed)(factors)
  for key in ("a", "b"):
    assert got[key].shape == factors[key].shape
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5 * float(jnp.abs(want[key]).max()))


# --------------------------------------------------------------------------- factor freezing


def test_freeze_mask_values():
  params = _params()
  mask = mj.freeze_mask(params, {"fc": "a", "block.conv": "b"})
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert mask["fc"] == {"a": False, "b": True, "bias": True}
  assert mask["block"]["conv"] == {"a": True, "b": False}
  assert mask["block"]["norm"] == {"scale": True} and mask["head"] == {"a": True, "b": True}
  with pytest.raises(ValueError, match="'a' or 'b'"):
    mj.freeze_mask(params, {"fc": "bias"})
  with pytest.raises(ValueError, match="unknown layers"):
    mj.freeze_mask(params, {"fc2": "a"})


def _grads(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [_randn(seed + i, x.shape) for i, x in enumerate(leaves)])


@pytest.mark.parametrize("inner", ["adamw", "sgd_momentum_wd"])
def test_frozen_optimizer_frozen_factors_do_not_move(inner):
  params = _params()
  if inner == "adamw":
    base = optax.adamw(1e-2, weight_decay=0.1)
  else:
    base = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))
  mask = mj.freeze_mask(params, {"fc": "a", "block.conv": "b"})
  opt = mj.frozen_optimizer(base, mask)
  state = opt.init(params)
  step = jax.jit(lambda p, s, g: opt.update(g, s, p))
  p = params
  for i in range(3):
    updates, state = step(p, state, _grads(p, 100 * i))
    for u, trainable in zip(jax.tree.leaves(updates), jax.tree.leaves(mask)):
      assert trainable or np.all(np.asarray(u) == 0)
    p = optax.apply_updates(p, updates)
  for old, new, trainable in zip(jax.tree.leaves(params), jax.tree.leaves(p), jax.tree.leaves(mask)):
    old, new = np.asarray(old), np.asarray(new)
    if trainable:
      assert not np.array_equal(old, new)
    else:
      assert old.tobytes() == new.tobytes()


def test_refreeze_state_carries_state_over():
  params = _params()
  base = optax.sgd(0.1, momentum=0.9)
  opt1 = mj.frozen_optimizer(base, mj.freeze_mask(params, {"fc": "a"}))
  state1 = opt1.init(params)
  _, state1 = opt1.update(_grads(params, 7), state1, params)
  opt2 = mj.frozen_optimizer(base, mj.freeze_mask(params, {"fc": "a", "head": "b"}))
  state2 = mj.refreeze_state(opt2, params, state1)
  assert jax.tree.structure(state2) == jax.tree.structure(opt2.init(params))
  trace1 = state1.inner_states["trainable"].inner_state[0].trace
  trace2 = state2.inner_states["trainable"].inner_state[0].trace
  np.testing.assert_array_equal(trace2["head"]["a"], trace1["head"]["a"])
  assert np.any(np.asarray(trace2["head"]["a"]) != 0)
  assert isinstance(trace2["head"]["b"], optax.MaskedNode)
  updates, _ = opt2.update(_grads(params, 8), state2, params)
  assert np.all(np.asarray(updates["head"]["b"]) == 0) and np.any(np.asarray(updates["head"]["a"]) != 0)


def test_stop_frozen_gradients():
  params = _params()
  mask = mj.freeze_mask(params, {"fc": "b"})
  x = _randn(30, (3, 7))

  def loss(p):
    return jnp.sum(jnp.square(mj.dense(mj.stop_frozen_gradients(p, mask)["fc"], x)))

  grads = jax.grad(loss)(params)
  assert np.all(np.asarray(grads["fc"]["b"]) == 0)
  assert np.any(np.asarray(grads["fc"]["a"]) != 0) and np.any(np.asarray(grads["fc"]["bias"]) != 0)


def test_sequential_freeze_schedule_rule_and_monotone():
  names = ["l0", "l1", "l2"]
  schedule = mj.sequential_freeze_schedule(names, epochs=7, factor="b", start_epoch=1)  # interval 2
  assert schedule(0) == {}
  assert schedule(1) == {"l0": "b"} and schedule(2) == {"l0": "b"}
  assert schedule(3) == {"l0": "b", "l1": "b"}
  assert schedule(5) == schedule(100) == {"l0": "b", "l1": "b", "l2": "b"}
  previous = {}
  for epoch in range(12):
    now = schedule(epoch)
    assert set(previous) <= set(now)
    previous = now
  fast = mj.sequential_freeze_schedule(names, epochs=2, start_epoch=0)  # interval max(1, 0) = 1
  assert [len(fast(e)) for e in range(4)] == [1, 2, 3, 3]
  with pytest.raises(ValueError, match="'a' or 'b'"):
    mj.sequential_freeze_schedule(names, 3, factor="c")


# --------------------------------------------------------------------------- Pufferfish / truncated SVD


def _dense_model():
  return {
      "conv1": {"kernel": _randn(40, (3, 3, 2, 4)), "bias": _randn(41, (4,))},
      "bn": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
      "fc1": {"kernel": _randn(42, (36, 10)), "bias": _randn(43, (10,))},
      "fc2": {"kernel": _randn(44, (10, 3))},
  }


def _conv_ref(kernel, bias, x):
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision="highest")
  return y + bias.reshape(1, 1, 1, -1)


def test_factorize_dense_params_full_rank_preserves_function():
  dense = _dense_model()
  assert mj.dense_layer_names(dense) == ["conv1", "fc1", "fc2"]
  fact = mj.factorize_dense_params(dense, 1.0)
  assert mj.capacities(fact) == {"conv1": 4, "fc1": 10, "fc2": 3}
  assert fact["bn"] == dense["bn"]
  x = _randn(45, (5, 36))
  want = jnp.matmul(x, dense["fc1"]["kernel"], precision="highest") + dense["fc1"]["bias"].reshape(1, -1)
  np.testing.assert_allclose(mj.dense(fact["fc1"], x), want, atol=1e-5, rtol=1e-5)
  h = _randn(46, (5, 10))
  np.testing.assert_allclose(mj.dense(fact["fc2"], h), jnp.matmul(h, dense["fc2"]["kernel"], precision="highest"),
                             atol=1e-5, rtol=1e-5)
  img = _randn(47, (2, 6, 6, 2))
  np.testing.assert_allclose(mj.conv(fact["conv1"], img, precision="highest"),
                             _conv_ref(dense["conv1"]["kernel"], dense["conv1"]["bias"], img), atol=1e-5, rtol=1e-5)


def test_factorize_dense_params_pufferfish_ranks_and_skip():
  dense = _dense_model()
  fact = mj.factorize_dense_params(dense, 0.5, skip_first=1)
  assert fact["conv1"] is dense["conv1"]  # left dense
  assert mj.capacities(fact) == {"fc1": 5, "fc2": 2}  # ceil(0.5 * 10), ceil(0.5 * 3)
  # The factorization is the best rank-5 approximation: error = the tail singular values.
  s = np.linalg.svd(np.asarray(dense["fc1"]["kernel"], np.float64), compute_uv=False)
  err = np.linalg.norm(_product(fact["fc1"]) - np.asarray(dense["fc1"]["kernel"], np.float64))
  np.testing.assert_allclose(err, np.linalg.norm(s[5:]), rtol=1e-4)
  reverse = mj.factorize_dense_params(dense, 0.3, skip_first=1, layer_order=["fc2", "fc1", "conv1"])
  assert "kernel" in reverse["fc2"] and mj.capacities(reverse) == {"conv1": 2, "fc1": 3}
  skipped = mj.factorize_dense_params(dense, 1.0, skip=["fc2"], ranks={"fc1": 4})
  assert mj.capacities(skipped) == {"conv1": 4, "fc1": 4}
  with pytest.raises(ValueError, match="fraction"):
    mj.factorize_dense_params(dense, 0.0)
  with pytest.raises(ValueError, match="unknown layers"):
    mj.factorize_dense_params(dense, 0.5, skip=["fc3"])


def test_truncate_dense_params():
  dense = _dense_model()
  by_rank = mj.truncate_dense_params(dense, {"fc1": 3})
  assert mj.capacities(by_rank) == {"conv1": 4, "fc1": 3, "fc2": 3}
  by_fraction = mj.truncate_dense_params(dense, 0.25)
  assert mj.capacities(by_fraction) == {"conv1": 1, "fc1": 3, "fc2": 1}
  np.testing.assert_allclose(by_fraction["fc1"]["a"], by_rank["fc1"]["a"])
  np.testing.assert_array_equal(by_fraction["fc1"]["bias"], dense["fc1"]["bias"])
