"""Tests for the Linen layers and their variable helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maestro_jax
import maestro_jax.linen as ml


class _Net(nn.Module):
  """Conv -> attention -> dense, from Flax's layers or from ours (same module names)."""
  factorized: bool

  @nn.compact
  def __call__(self, x):
    dense, conv, attention = ((ml.Dense, ml.Conv, ml.MultiHeadDotProductAttention) if self.factorized
                              else (nn.Dense, nn.Conv, nn.MultiHeadDotProductAttention))
    x = conv(8, (3, 3), strides=2, padding="VALID")(x)
    x = x.reshape(x.shape[0], -1, 8)
    x = attention(num_heads=2)(x)
    return dense(5)(x)


def _inputs():
  return jax.random.normal(jax.random.key(1), (2, 9, 9, 3))


def test_factorize_params_reproduces_pretrained_model():
  x = _inputs()
  dense_vars = _Net(False).init(jax.random.key(0), x)
  params = ml.factorize_params(dense_vars["params"])
  assert ml.capacities(params) == {
      "Conv_0": 8, "MultiHeadDotProductAttention_0.key": 8, "MultiHeadDotProductAttention_0.out": 8,
      "MultiHeadDotProductAttention_0.query": 8, "MultiHeadDotProductAttention_0.value": 8, "Dense_0": 5}
  out = _Net(True).apply({"params": params}, x)
  np.testing.assert_allclose(out, _Net(False).apply(dense_vars, x), atol=1e-5)


def test_factorize_params_rank_fraction_and_skip():
  dense_vars = _Net(False).init(jax.random.key(0), _inputs())
  params = ml.factorize_params(dense_vars["params"], rank_fraction=0.5, skip=("Dense_0",))
  caps = ml.capacities(params)
  assert caps["Conv_0"] == 4 and caps["MultiHeadDotProductAttention_0.query"] == 4
  assert "Dense_0" not in caps and "kernel" in params["Dense_0"]


def test_init_creates_keep_collection_at_full_rank():
  variables = _Net(True).init(jax.random.key(0), _inputs())
  assert set(variables) == {"params", ml.KEEP_COLLECTION}
  keeps = ml.keep_counts(variables)
  assert keeps == pytest.approx(ml.capacities(variables["params"]))
  assert all(v.dtype == jnp.int32 for v in keeps.values())


def test_keep_counts_equal_sliced_params():
  x = _inputs()
  variables = _Net(True).init(jax.random.key(0), x)
  keeps = {"Conv_0": 3, "MultiHeadDotProductAttention_0.value": 2, "Dense_0": 1}
  masked = _Net(True).apply(ml.set_keep_counts(variables, keeps), x)
  sliced_params = maestro_jax.map_layers(
      lambda name, layer: maestro_jax.truncate_layer(layer, keeps[name]) if name in keeps else layer,
      variables["params"])
  sliced = _Net(True).apply({"params": sliced_params}, x)
  np.testing.assert_allclose(masked, sliced, atol=1e-5)


def test_traced_keep_counts_vmap_without_recompiling():
  x = _inputs()
  variables = _Net(True).init(jax.random.key(0), x)
  traces = []

  @jax.jit
  def sweep(stacked_keeps):
    traces.append(1)
    return jax.vmap(lambda k: _Net(True).apply(ml.set_keep_counts(variables, {"Dense_0": k}), x))(stacked_keeps)

  outs = sweep(jnp.arange(1, 6, dtype=jnp.int32))
  sweep(jnp.arange(0, 5, dtype=jnp.int32))
  assert len(traces) == 1
  for i, k in enumerate(range(1, 6)):
    np.testing.assert_allclose(outs[i], _Net(True).apply(ml.set_keep_counts(variables, {"Dense_0": k}), x),
                               atol=1e-5)


def test_shrunk_params_apply_without_shape_errors():
  x = _inputs()
  variables = _Net(True).init(jax.random.key(0), x)
  params, _, caps = maestro_jax.shrink(variables["params"], {"Dense_0": 2, "Conv_0": 5})
  assert caps["Dense_0"] == 2 and caps["Conv_0"] == 5
  out = _Net(True).apply({"params": params}, x)
  assert out.shape == (2, 16, 5)


def test_errors_name_the_layer():
  variables = _Net(True).init(jax.random.key(0), _inputs())
  with pytest.raises(ValueError, match=r"Dense_0.*out of range.*capacity 5"):
    ml.set_keep_counts(variables, {"Dense_0": 6})
  with pytest.raises(ValueError, match=r"unknown layers in keep counts \['nope'\]"):
    ml.set_keep_counts(variables, {"nope": 1})
  with pytest.raises(ValueError, match=r"feature_group_count=2 is not supported"):
    ml.Conv(4, feature_group_count=2).init(jax.random.key(0), jnp.ones((1, 5, 5, 4)))
  with pytest.raises(ValueError, match=r"Dense_0.*input has 7 features, expected 8"):
    ml.Dense(5, name="Dense_0").apply({"params": variables["params"]["Dense_0"]}, jnp.ones((1, 7)))
