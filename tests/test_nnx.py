"""Tests for the Flax NNX layers and model helpers (maestro_jax/nnx.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import maestro_jax as mj
import maestro_jax.nnx as mnnx


def _randn(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _max_diff(x, y):
  return float(jnp.max(jnp.abs(x - y)))


class Net(nnx.Module):
  """conv (2 -> 4, 3x3, stride 2) -> flatten -> fc (16 -> 6) -> layers.0 (6 -> 5) -> layers.1 (5 -> 3)."""

  def __init__(self, rngs):
    self.conv = mnnx.Conv(2, 4, 3, 2, padding="SAME", rngs=rngs)
    self.fc = mnnx.Linear(16, 6, rngs=rngs)
    self.layers = nnx.List([mnnx.Linear(6, 5, rngs=rngs), mnnx.Linear(5, 3, rank=2, init_method="random", rngs=rngs)])

  def __call__(self, x):
    h = self.conv(x)
    h = self.fc(h.reshape(h.shape[0], -1))
    for layer in self.layers:
      h = layer(jnp.tanh(h))
    return h


X = _randn(0, (3, 4, 4, 2))
CAPS = {"conv": 4, "fc": 6, "layers.0": 5, "layers.1": 2}


def test_helpers_names_and_capacities():
  model = Net(nnx.Rngs(0))
  assert mnnx.capacities(model) == CAPS
  assert list(mnnx.factorized_layers(model)) == list(CAPS)
  assert {k: int(v) for k, v in mnnx.keep_counts(model).items()} == CAPS
  assert mnnx.factorized_layers(model)["layers.0"] is model.layers[0]
  # Names agree with the functional core's names on the pure param dict.
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert mj.capacities(pure) == CAPS
  mnnx.set_keep_counts(model, {"fc": 2, "layers.1": 0})
  assert {k: int(v) for k, v in mnnx.keep_counts(model).items()} == {**CAPS, "fc": 2, "layers.1": 0}
  # keep = 0 on the last layer: the output is its bias (zero-initialized).
  assert float(jnp.abs(model(X)).max()) == 0.0


def test_set_keep_counts_changes_output_like_explicit_keep():
  model = Net(nnx.Rngs(0))
  full = model(X)
  mnnx.set_keep_counts(model, {"fc": 3})
  reduced = model(X)
  assert _max_diff(full, reduced) > 1e-3
  # Same as passing the keep count to the layer call.
  h = model.conv(X)
  h = model.fc(h.reshape(3, -1), 3)
  h = model.layers[1](jnp.tanh(model.layers[0](jnp.tanh(h))))
  assert _max_diff(h, reduced) <= 1e-6


def test_set_keep_counts_errors():
  model = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"layer 'layers.0'.*keep count 6.*capacity 5"):
    mnnx.set_keep_counts(model, {"layers.0": 6})
  with pytest.raises(ValueError, match=r"layer 'conv'.*keep count -1"):
    mnnx.set_keep_counts(model, {"conv": -1})
  with pytest.raises(ValueError, match=r"unknown layers in keep counts \['fc2'\].*'layers.0'"):
    mnnx.set_keep_counts(model, {"fc2": 1})


def _keep_dicts():
  return [{k: jnp.int32(v) for k, v in d.items()} for d in
          [CAPS, {"conv": 4, "fc": 1, "layers.0": 5, "layers.1": 2}, {"conv": 2, "fc": 6, "layers.0": 3,
                                                                    "layers.1": 1}]]


def _eager_outputs(keeps_list):
  outs = []
  for keeps in keeps_list:
    model = Net(nnx.Rngs(0))
    mnnx.set_keep_counts(model, {k: int(v) for k, v in keeps.items()})
    outs.append(model(X))
  return outs


def test_traced_keep_counts_in_nnx_jit_do_not_retrace():
  model = Net(nnx.Rngs(0))
  traces = [0]

  @nnx.jit
  def forward(model, keeps, x):
    traces[0] += 1
    mnnx.set_keep_counts(model, keeps)
    return model(x)

  keeps_list = _keep_dicts()
  outs = [forward(model, keeps, X) for keeps in keeps_list]
  assert traces[0] == 1
  assert _max_diff(outs[0], outs[1]) > 1e-3 and _max_diff(outs[1], outs[2]) > 1e-3
  for out, ref in zip(outs, _eager_outputs(keeps_list)):
    assert _max_diff(out, ref) <= 1e-5
  # The keep counts set inside the jitted call are visible outside.
  assert {k: int(v) for k, v in mnnx.keep_counts(model).items()} == {k: int(v) for k, v in keeps_list[-1].items()}


def test_traced_keep_counts_with_split_merge_in_jax_jit():
  model = Net(nnx.Rngs(0))
  graphdef, params, keep_state = nnx.split(model, nnx.Param, mnnx.KeepCount)
  traces = [0]

  @jax.jit
  def forward(params, keep_state, keeps, x):
    traces[0] += 1
    m = nnx.merge(graphdef, params, keep_state)
    mnnx.set_keep_counts(m, keeps)
    return m(x)

  keeps_list = _keep_dicts()
  outs = [forward(params, keep_state, keeps, X) for keeps in keeps_list]
  assert traces[0] == 1
  assert _max_diff(outs[0], outs[2]) > 1e-3
  for out, ref in zip(outs, _eager_outputs(keeps_list)):
    assert _max_diff(out, ref) <= 1e-5

  # vmap over a stacked keep-count dict: a sweep of rank settings in one call.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *keeps_list)
  swept = jax.jit(jax.vmap(lambda k: forward(params, keep_state, k, X)))(stacked)
  for i, ref in enumerate(outs):
    assert _max_diff(swept[i], ref) <= 1e-5


class DenseNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 5, (3, 3), strides=2, padding=((1, 0), (2, 1)), rngs=rngs)
    self.conv2 = nnx.Conv(5, 4, (2, 2), padding="VALID", kernel_dilation=(1, 2), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=8, decode=False,
                                       deterministic=True, rngs=rngs)
    self.fc = nnx.Linear(4, 6, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(6, 6, rngs=rngs)])

  def __call__(self, x):
    h = jax.nn.relu(self.conv(x))
    h = self.conv2(h)
    h = h.reshape(h.shape[0], -1, h.shape[-1])  # spatial positions as a sequence
    h = h + self.attn(h)
    h = self.fc(h)
    return self.blocks[0](jnp.tanh(h))


def _dense_net():
  model = DenseNet(nnx.Rngs(1))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == "bias":
      var[...] = _randn(len(path), var.shape, 0.1)
  return model


X_IMG = _randn(2, (2, 7, 8, 3))


def test_factorize_reproduces_flax_model():
  model = _dense_net()
  ref = model(X_IMG)
  mnnx.factorize(model)
  assert isinstance(model.conv, mnnx.Conv) and isinstance(model.conv2, mnnx.Conv)
  assert isinstance(model.attn, mnnx.MultiHeadAttention) and isinstance(model.fc, mnnx.Linear)
  assert isinstance(model.blocks[0], mnnx.Linear)
  caps = mnnx.capacities(model)
  assert caps == {"conv": 5, "conv2": 4, "attn.query": 4, "attn.key": 4, "attn.value": 4, "attn.out": 4,
                  "fc": 4, "blocks.0": 6}
  out = model(X_IMG)
  assert out.shape == ref.shape
  assert _max_diff(out, ref) <= 1e-5
  # Jitted, with the keep counts at capacity, the same.
  assert _max_diff(nnx.jit(lambda m, x: m(x))(model, X_IMG), ref) <= 1e-5


def test_factorize_rank_fraction_and_skip():
  model = _dense_net()
  ref = model(X_IMG)
  mnnx.factorize(model, rank_fraction=0.5, skip=("fc",))
  assert isinstance(model.fc, nnx.Linear) and not isinstance(model.fc, mnnx.Linear)
  caps = mnnx.capacities(model)
  full = {"conv": 5, "conv2": 4, "attn.query": 4, "attn.key": 4, "attn.value": 4, "attn.out": 4, "blocks.0": 6}
  assert caps == {k: math.ceil(0.5 * v) for k, v in full.items()}
  out = model(X_IMG)
  assert out.shape == ref.shape and _max_diff(out, ref) > 1e-3
  # The truncated conv is the best rank-3 approximation of the dense kernel (by SVD).
  dense = _dense_net()
  kernel = dense.conv.kernel[...].reshape(-1, 5)
  s = np.linalg.svd(np.asarray(kernel), compute_uv=False)
  approx = mj.dense_kernel(model.conv.factor_params()).reshape(-1, 5)
  np.testing.assert_allclose(float(jnp.linalg.norm(approx - kernel)), np.sqrt(np.sum(s[3:] ** 2)), rtol=1e-4)
  with pytest.raises(ValueError, match="rank_fraction"):
    mnnx.factorize(_dense_net(), rank_fraction=1.5)


def test_layer_constructors_and_from_kernel():
  kernel, bias = _randn(3, (5, 4)), _randn(4, (4,))
  layer = mnnx.Linear.from_kernel(kernel, bias)
  x = _randn(5, (2, 3, 5))
  assert _max_diff(layer(x), x @ kernel + bias.reshape(1, 1, -1)) <= 1e-5
  assert layer(x, 0).shape == (2, 3, 4)
  assert mnnx.Linear(5, 4, rank=2, rngs=nnx.Rngs(0)).capacity == 2
  assert mnnx.Linear(5, 4, use_bias=False, rngs=nnx.Rngs(0)).bias is None
  conv = mnnx.Conv(3, 6, (3, 2), rngs=nnx.Rngs(0))
  assert conv.a.shape == (3, 2, 3, 6) and conv.capacity == 6
  attn = mnnx.MultiHeadAttention(2, 6, 8, rank=3, rngs=nnx.Rngs(0))
  assert mnnx.capacities(attn) == {"query": 3, "key": 3, "value": 3, "out": 3}
  assert attn(_randn(6, (2, 5, 6))).shape == (2, 5, 6)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    mnnx.MultiHeadAttention(3, 6, 8, rngs=nnx.Rngs(0))


def test_optimizer_trains_factors_not_keep_count():
  model = Net(nnx.Rngs(0))
  mnnx.set_keep_counts(model, {"fc": 3})
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
  target = _randn(7, (3, 3))
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def loss_fn(model):
    return jnp.mean(jnp.square(model(X) - target))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
    optimizer.update(model, grads)
    return loss, grads

  loss0, grads = step(model, optimizer)
  # Gradients only for parameters; the keep count is not differentiated.
  assert not jax.tree.leaves(nnx.state(grads, mnnx.KeepCount))
  for _ in range(5):
    loss, _ = step(model, optimizer)
  assert float(loss) < float(loss0)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert _max_diff(after["fc"]["a"], before["fc"]["a"]) > 0
  assert _max_diff(after["layers"][0]["b"], before["layers"][0]["b"]) > 0
  # Components past the keep count of 'fc' get no gradient: unchanged.
  assert _max_diff(after["fc"]["a"][:, 3:], before["fc"]["a"][:, 3:]) == 0.0
  assert _max_diff(after["fc"]["b"][3:], before["fc"]["b"][3:]) == 0.0
  # The keep counts are untouched by the optimizer.
  assert {k: int(v) for k, v in mnnx.keep_counts(model).items()} == {**CAPS, "fc": 3}
  # The optimizer state (momentum) holds one entry per parameter and none for keep counts.
  n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_params == 12 and len(jax.tree.leaves(optimizer.opt_state)) == n_params
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(optimizer.opt_state)]
  assert not [p for p in paths if "keep" in p]
