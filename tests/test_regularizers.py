"""Tests for the hierarchical group lasso, importance and Frobenius decay (maestro_jax/_src/regularizers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maestro_jax as mj


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params():
  return {
      "fc": {"a": _randn(0, (7, 4)), "b": _randn(1, (4, 5)), "bias": _randn(2, (5,))},
      "block": {"conv": {"a": _randn(3, (3, 3, 2, 5)), "b": _randn(4, (5, 6))},
                "norm": {"scale": jnp.ones((6,))}},
  }


def _naive_lasso(layer, rank=None):
  a, b = np.asarray(layer["a"], np.float64), np.asarray(layer["b"], np.float64)
  r = a.shape[-1] if rank is None else rank
  a, b = a[..., :r], b[:r]
  return sum(np.linalg.norm(a[..., k:]) + np.linalg.norm(b[k:]) for k in range(r))


def _naive_importance(layer):
  a, b = np.asarray(layer["a"], np.float64), np.asarray(layer["b"], np.float64)
  return np.array([np.linalg.norm(a[..., k:]) * np.linalg.norm(b[k:]) for k in range(a.shape[-1])])


@pytest.mark.parametrize("which", ["fc", "conv"])
def test_layer_group_lasso_matches_naive(which):
  params = _params()
  layer = params["fc"] if which == "fc" else params["block"]["conv"]
  got = float(mj.layer_group_lasso(layer))
  np.testing.assert_allclose(got, _naive_lasso(layer), rtol=1e-5)


def test_group_lasso_sums_layers():
  params = _params()
  want = _naive_lasso(params["fc"]) + _naive_lasso(params["block"]["conv"])
  np.testing.assert_allclose(float(mj.group_lasso(params)), want, rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(mj.group_lasso)(params)), want, rtol=1e-5)


def test_later_components_penalized_more():
  # One unit component at position k costs k + 1 groups (of A and of B).
  for k in range(4):
    a = jnp.zeros((4, 4)).at[k, k].set(1.0)
    b = jnp.zeros((4, 3)).at[k, 0].set(1.0)
    np.testing.assert_allclose(float(mj.layer_group_lasso({"a": a, "b": b})), 2 * (k + 1), rtol=1e-6)


def test_gradient_finite_with_zero_tail():
  params = _params()
  for layer in (params["fc"], params["block"]["conv"]):
    layer["a"] = layer["a"].at[..., -2:].set(0.0)
    layer["b"] = layer["b"].at[-2:].set(0.0)
  value, grads = jax.jit(jax.value_and_grad(mj.group_lasso))(params)
  want = _naive_lasso(params["fc"]) + _naive_lasso(params["block"]["conv"])
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  for g in (grads["fc"], grads["block"]["conv"]):
    assert np.all(np.asarray(g["a"][..., -2:]) == 0.0)
    assert np.all(np.asarray(g["b"][-2:]) == 0.0)
    # The live components do get (finite, non-zero) gradient.
    live = g["a"].shape[-1] - 2
    assert float(jnp.min(jnp.sum(jnp.abs(g["a"][..., :-2]).reshape(-1, live), axis=0))) > 0
    assert float(jnp.min(jnp.sum(jnp.abs(g["b"][:-2]), axis=1))) > 0
  # Non-factor parameters get zero gradient.
  assert float(jnp.abs(grads["fc"]["bias"]).sum()) == 0.0
  # An all-zero layer: value 0, gradient 0, no NaN.
  zero = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 3))}
  v, g = jax.value_and_grad(mj.layer_group_lasso)(zero)
  assert float(v) == 0.0
  assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(g))


def test_gradient_matches_finite_differences():
  layer = _params()["fc"]
  g = jax.grad(lambda a: mj.layer_group_lasso({"a": a, "b": layer["b"]}))(layer["a"])
  a64 = np.asarray(layer["a"], np.float64)
  eps = 1e-4
  for idx in [(0, 0), (3, 2), (6, 3)]:
    plus, minus = a64.copy(), a64.copy()
    plus[idx] += eps
    minus[idx] -= eps
    fd = (_naive_lasso({"a": plus, "b": layer["b"]}) - _naive_lasso({"a": minus, "b": layer["b"]})) / (2 * eps)
    np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-3, atol=1e-4)


def test_ranks_mask_components():
  params = _params()
  ranks = {"fc": 2, "block.conv": 3}
  want = _naive_lasso(params["fc"], 2) + _naive_lasso(params["block"]["conv"], 3)
  np.testing.assert_allclose(float(mj.group_lasso(params, ranks)), want, rtol=1e-5)
  # Same under jit with traced ranks.
  traced = {k: jnp.int32(v) for k, v in ranks.items()}
  np.testing.assert_allclose(float(jax.jit(mj.group_lasso)(params, traced)), want, rtol=1e-5)
  # A layer not named keeps all its components.
  want_fc_only = _naive_lasso(params["fc"], 2) + _naive_lasso(params["block"]["conv"])
  np.testing.assert_allclose(float(mj.group_lasso(params, {"fc": 2})), want_fc_only, rtol=1e-5)
  # Masked components get no gradient.
  g = jax.grad(mj.group_lasso)(params, ranks)
  assert np.all(np.asarray(g["fc"]["a"][:, 2:]) == 0.0) and np.all(np.asarray(g["fc"]["b"][2:]) == 0.0)
  assert np.all(np.asarray(g["block"]["conv"]["a"][..., 3:]) == 0.0)
  # Importance with ranks: masked components count as zero.
  s = mj.importance(params, ranks)
  assert np.all(np.asarray(s["fc"][2:]) == 0.0) and float(s["fc"][1]) > 0


def test_importance_non_increasing_and_naive():
  params = _params()
  imp = mj.importance(params)
  assert list(imp) == ["fc", "block.conv"]
  for name, layer in [("fc", params["fc"]), ("block.conv", params["block"]["conv"])]:
    s = np.asarray(imp[name])
    assert s.shape == (layer["a"].shape[-1],)
    np.testing.assert_allclose(s, _naive_importance(layer), rtol=1e-5)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(np.asarray(mj.layer_importance(layer)), s, rtol=1e-6)


def test_component_scales_are_singular_values_after_svd():
  kernel = _randn(5, (6, 4))
  layer = mj.factorize_kernel(kernel)
  np.testing.assert_allclose(np.asarray(mj.component_scales(layer)),
                             np.linalg.svd(np.asarray(kernel), compute_uv=False), rtol=1e-5)


def test_frobenius_decay_value_and_gradient():
  params = _params()

  def formed(params):
    total = 0.0
    for layer in (params["fc"], params["block"]["conv"]):
      a = layer["a"].reshape(-1, layer["a"].shape[-1])
      total = total + jnp.sum(jnp.square(a @ layer["b"]))
    return total

  want = sum(np.sum(np.square(np.asarray(mj.dense_kernel(l), np.float64)))
             for l in (params["fc"], params["block"]["conv"]))
  np.testing.assert_allclose(float(mj.frobenius_decay(params)), want, rtol=1e-5)
  np.testing.assert_allclose(float(formed(params)), want, rtol=1e-5)
  g = jax.jit(jax.grad(mj.frobenius_decay))(params)
  g_ref = jax.jit(jax.grad(formed))(params)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
  assert float(jnp.abs(g["fc"]["bias"]).sum()) == 0.0
