"""The converters check everything before they change anything; unsupported layers are refused by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import maestro_jax as mj
from maestro_jax import linen as mln
from maestro_jax import nnx as mnx


class _Mixed(nnx.Module):
  def __init__(self, conv, rngs):
    self.fc = nnx.Linear(4, 4, rngs=rngs)
    self.conv = conv


@pytest.mark.parametrize("make, reason", [
    (lambda r: nnx.Conv(2, 4, (3, 3), padding="CIRCULAR", rngs=r), r"padding='CIRCULAR'"),
    (lambda r: nnx.Conv(2, 4, (3, 3), mask=jnp.ones((3, 3, 2, 4)), rngs=r), r"kernel mask"),
    (lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=r), r"feature_group_count=2"),
    (lambda r: nnx.ConvTranspose(2, 4, (3, 3), rngs=r), r"transposed convolution"),
])
def test_nnx_factorize_refuses_unsupported_layers_before_changing_anything(make, reason):
  model = _Mixed(make(nnx.Rngs(0)), nnx.Rngs(1))
  x = jnp.ones((1, 5, 5, model.conv.in_features))
  before = model.conv(x)
  with pytest.raises(ValueError, match=rf"layer 'conv': .*{reason}.*not supported.*skip=\['conv'\]"):
    mnx.factorize(model)
  assert isinstance(model.fc, nnx.Linear) and type(model.conv).__module__.startswith("flax")  # nothing replaced
  assert jnp.array_equal(model.conv(x), before)
  mnx.factorize(model, skip=["conv"])  # the advised way out works
  assert isinstance(model.fc, mnx.Linear) and jnp.array_equal(model.conv(x), before)


def test_unknown_skip_names_are_errors():
  model = _Mixed(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"unknown layers in skip \['typo'\]"):
    mnx.factorize(model, skip=["typo"])
  assert isinstance(model.fc, nnx.Linear)
  params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"unknown layers in skip \['typo'\]"):
    mln.factorize_params({"Dense_0": params}, skip=["typo"])
  with pytest.raises(ValueError, match=r"unknown layers in skip \['typo'\]"):
    mj.factorize_dense_params({"Dense_0": params}, skip=["typo"])


def test_nnx_attention_and_general_layers_convert_exactly():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
      self.proj = nnx.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
      return self.proj(self.attn(x).reshape(x.shape[:-1] + (2, 4)))

  model = Block(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  before = model(x)
  mnx.factorize(model, ranks={"attn.key": 3})
  assert isinstance(model.proj, mnx.LinearGeneral) and isinstance(model.attn, mnx.MultiHeadAttention)
  assert mnx.capacities(model)["attn.key"] == 3
  mnx.set_keep_counts(model, {"attn.key": 3})
  model_full = Block(nnx.Rngs(0))
  mnx.factorize(model_full)
  assert float(jnp.max(jnp.abs(model_full(x) - before))) <= 1e-5


def test_linen_dense_general_converts_exactly_and_sweeps():
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 6))
  dense = nn.DenseGeneral((3, 7), axis=(-2, -1))
  variables = dense.init(jax.random.key(1), x)
  params = mln.factorize_params(variables["params"], general={"": 2})
  layer = mln.DenseGeneral((3, 7), axis=(-2, -1))
  assert float(jnp.max(jnp.abs(layer.apply({"params": params}, x) - dense.apply(variables, x)))) <= 1e-5
  truncated = mln.set_keep_counts({"params": params}, {"": 2})
  expected = mj.dense(mj.truncate_layer(params, 2), x.reshape(2, 5, 24)).reshape(2, 5, 3, 7)
  assert float(jnp.max(jnp.abs(layer.apply(truncated, x) - expected))) <= 1e-5
  with pytest.raises(ValueError, match=r"unknown DenseGeneral layers \['nope'\]"):
    mln.factorize_params(variables["params"], general={"nope": 1})


def test_non_finite_kernel_is_one_clear_error():
  with pytest.raises(ValueError, match=r"layer 'fc': the kernel has 2 non-finite entries"):
    mj.factorize_kernel(jnp.asarray([[1.0, jnp.nan], [jnp.inf, 0.0]]), name="fc")
