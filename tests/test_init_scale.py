"""PyTorch-scale init: SVD-split kernels and biases drawn as torch.nn.Linear / Conv2d draw them."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax as mj
import maestro_jax.linen as mlinen
import maestro_jax.nnx as mnnx
from maestro_jax import models

# The std of a sample of n >= 10,000 uniform draws is within 2% of the true std far beyond 5 sigma.
STD_TOL = 0.04


def _check_pytorch_kernel(kernel, fan_in):
  """Uniform in +-1/sqrt(fan_in): std 1/sqrt(3 fan_in), nothing beyond the bound (up to SVD rounding)."""
  kernel = np.asarray(kernel, np.float64)
  bound = 1.0 / math.sqrt(fan_in)
  assert abs(kernel.std() / (bound / math.sqrt(3.0)) - 1.0) < STD_TOL, kernel.std()
  assert abs(kernel.mean()) < 0.05 * bound
  assert np.abs(kernel).max() <= bound * (1 + 1e-4)
  # Uniform, not normal: a uniform's excess kurtosis is -1.2 (a normal's is 0).
  kurtosis = ((kernel - kernel.mean()) ** 4).mean() / kernel.var() ** 2 - 3.0
  assert abs(kurtosis + 1.2) < 0.15, kurtosis


def _check_pytorch_bias(bias, fan_in):
  bias = np.asarray(bias)
  bound = 1.0 / math.sqrt(fan_in)
  assert np.all(np.abs(bias) <= bound) and np.abs(bias).max() > 0.5 * bound
  assert bias.std() > 0.3 * bound  # spread over the interval, not zeros


@pytest.mark.parametrize("kernel_shape", [(400, 120), (120, 84), (5, 5, 6, 16), (3, 3, 64, 64)])
def test_svd_split_kernel_has_pytorch_distribution(kernel_shape):
  params = mj.init_layer(jax.random.key(0), kernel_shape, init_scale="pytorch")
  fan_in = math.prod(kernel_shape[:-1])
  _check_pytorch_kernel(mj.dense_kernel(params), fan_in)
  _check_pytorch_bias(params["bias"], fan_in)
  # The factors split it exactly: components ordered, A @ B the drawn kernel.
  assert params["a"].shape[-1] == mj.full_rank(kernel_shape)


def test_pytorch_scale_is_one_over_sqrt3_of_lecun():
  lecun = mj.init_layer(jax.random.key(0), (400, 120))
  torch = mj.init_layer(jax.random.key(0), (400, 120), init_scale="pytorch")
  ratio = float(jnp.std(mj.dense_kernel(torch)) / jnp.std(mj.dense_kernel(lecun)))
  assert abs(ratio - 1 / math.sqrt(3)) < 0.03, ratio
  assert float(jnp.max(jnp.abs(lecun["bias"]))) == 0.0  # Flax's zero bias by default


def test_random_factors_have_the_pytorch_kernel_variance():
  params = mj.init_layer(jax.random.key(1), (400, 120), init_method="random", init_scale="pytorch")
  std = float(jnp.std(mj.dense_kernel(params)))
  assert abs(std / (1 / math.sqrt(3 * 400)) - 1) < 0.05, std


def test_explicit_initializers_win_and_unknown_scale_is_an_error():
  params = mj.init_layer(jax.random.key(0), (8, 4), init_scale="pytorch", bias_init=jax.nn.initializers.ones)
  assert np.all(np.asarray(params["bias"]) == 1.0)
  with pytest.raises(ValueError, match="init_scale"):
    mj.init_layer(jax.random.key(0), (8, 4), init_scale="torch")


def test_nnx_and_linen_layers_take_init_scale():
  rngs = nnx.Rngs(0)
  linear = mnnx.Linear(300, 100, init_scale="pytorch", rngs=rngs)
  _check_pytorch_kernel(mj.dense_kernel(linear.factor_params()), 300)
  conv = mnnx.Conv(16, 64, 3, init_scale="pytorch", rngs=rngs)
  _check_pytorch_kernel(mj.dense_kernel(conv.factor_params()), 9 * 16)
  _check_pytorch_bias(conv.factor_params()["bias"], 9 * 16)
  attention = mnnx.MultiHeadAttention(4, 128, init_scale="pytorch", rngs=rngs)
  _check_pytorch_kernel(mj.dense_kernel(attention.query.factor_params()), 128)
  variables = mlinen.Dense(100, init_scale="pytorch").init(jax.random.key(0), jnp.ones((1, 300)))
  _check_pytorch_kernel(mj.dense_kernel(variables["params"]), 300)
  _check_pytorch_bias(variables["params"]["bias"], 300)
  variables = mlinen.Conv(64, 3, init_scale="pytorch").init(jax.random.key(0), jnp.ones((1, 5, 5, 16)))
  _check_pytorch_kernel(mj.dense_kernel(variables["params"]), 9 * 16)
  assert isinstance(mlinen.Dense(1), nn.Module)


@pytest.mark.parametrize("factorized", [True, False])
def test_zoo_models_take_init_scale_and_their_dense_twins_match(factorized):
  model = models.LeNet5(rngs=nnx.Rngs(0), init_scale="pytorch", factorized=factorized)
  for name, fan_in in (("conv2", 5 * 5 * 6), ("fc1", 256), ("fc2", 120)):
    layer = getattr(model, name)
    if factorized:
      kernel, bias = mj.dense_kernel(layer.factor_params()), layer.factor_params()["bias"]
    else:
      kernel, bias = layer.kernel[...], layer.bias[...]
    if kernel.size >= 10_000:
      _check_pytorch_kernel(kernel, fan_in)
    else:  # Too few draws for the std check: only the bound.
      assert float(jnp.max(jnp.abs(kernel))) <= (1 + 1e-4) / math.sqrt(fan_in)
    _check_pytorch_bias(bias, fan_in)
  with pytest.raises(ValueError, match="init_scale"):
    models.MLP(4, (4,), 2, rngs=nnx.Rngs(0), init_scale="torch")


@pytest.mark.parametrize("name, kwargs", [("mlp", {}), ("vgg19", {"width": 8}), ("resnet18", {"width": 8}),
                                          ("transformer", {})])
def test_every_zoo_model_builds_at_pytorch_scale(name, kwargs):
  model = models.make_model(name, num_classes=10, image_shape=(28, 28, 1), rngs=nnx.Rngs(0), init_scale="pytorch",
                            **kwargs)
  layers = mnnx.factorized_layers(model)
  assert layers
  for layer_name, layer in layers.items():
    params = layer.factor_params()
    kernel = mj.dense_kernel(params)
    fan_in = math.prod(kernel.shape[:-1])
    assert float(jnp.max(jnp.abs(kernel))) <= (1 + 1e-4) / math.sqrt(fan_in), layer_name
