"""The compute path of a factorized layer: the two paths agree, 'auto' chooses from shapes and never recompiles."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import maestro_jax as mj
import maestro_jax.linen as mlinen
import maestro_jax.nnx as mnnx
from maestro_jax import models
from maestro_jax import training
from maestro_jax._src import factorized
from maestro_jax._src import rules

TOL = 1e-5


def _randn(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _max_diff(x, y):
  """Largest difference over the leaves, relative to each leaf's largest magnitude when that is above 1."""
  return max(float(jnp.max(jnp.abs(a - b)) / max(1.0, float(jnp.max(jnp.abs(b)))))
             for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


# ------------------------------------------------------------------------------------ the choice rule


def test_costs_are_the_multiply_adds_of_each_path():
  assert rules.factor_path_cost(positions=10, d_in=4, d_out=6, rank=3) == 10 * (4 + 6) * 3
  assert rules.kernel_path_cost(positions=10, d_in=4, d_out=6, rank=3) == 4 * 6 * (3 + 10)


@pytest.mark.parametrize("positions, d_in, d_out, rank, expected", [
    # MLP 784 -> 256 at full rank, batch 128: too few rows to pay for forming the kernel.
    (128, 784, 256, 256, "factors"),
    # LeNet conv2 (5x5x6 -> 16) at full rank on 128 MNIST images: 8x8 output pixels each.
    (128 * 8 * 8, 150, 16, 16, "kernel"),
    # The same convolution at rank 2: the factors are cheaper.
    (128 * 8 * 8, 150, 16, 2, "factors"),
    # A d=128 Transformer projection on 64 sequences of 128 tokens, full rank.
    (64 * 128, 128, 128, 128, "kernel"),
    # A 512 x 512 layer at rank 8 on 1000 rows.
    (1000, 512, 512, 8, "factors"),
    # Batch 1 through a full-rank dense layer: forming the kernel costs d_in d_out r.
    (1, 64, 64, 64, "factors"),
    # Equal costs (2 * (2 + 2) * 2 == 2 * 2 * (2 + 2)): the one-op kernel path.
    (2, 2, 2, 2, "kernel"),
    # A static keep count of 0 computes nothing on the factor path.
    (100, 8, 8, 0, "factors"),
])
def test_auto_choice_on_shapes(positions, d_in, d_out, rank, expected):
  assert rules.choose_compute_path(positions, d_in, d_out, rank) == expected


def test_lanes_price_narrow_outputs_as_wide():
  # LeNet conv2 at rank 4 on 128 images: 0.28x the dense FLOPs on the factors, but XLA CPU runs the
  # 4-channel spatial conv at the cost of 16 channels.
  assert rules.choose_compute_path(128 * 8 * 8, 150, 16, 4) == "factors"
  assert rules.choose_compute_path(128 * 8 * 8, 150, 16, 4, lanes=16) == "kernel"
  assert rules.factor_path_cost(10, 150, 16, 4, lanes=16) == 10 * (150 * 16 + 4 * 16)
  assert rules.kernel_path_cost(10, 25, 6, 6, lanes=16) == 25 * 6 * 6 + 10 * 25 * 16
  # Wide layers are unaffected: a 3x3 conv 128 -> 128 at rank 32.
  assert rules.choose_compute_path(512, 1152, 128, 32, lanes=16) == "factors"


def test_forced_paths_and_unknown_path():
  assert rules.choose_compute_path(128, 784, 256, 256, compute_path="kernel") == "kernel"
  assert rules.choose_compute_path(10**6, 150, 16, 16, compute_path="factors") == "factors"
  with pytest.raises(ValueError, match="compute_path must be one of"):
    rules.choose_compute_path(1, 1, 1, 1, compute_path="fast")
  with pytest.raises(ValueError, match="layer 'fc'.*compute_path"):
    mj.dense(mj.init_layer(jax.random.key(0), (3, 2)), jnp.ones((1, 3)), name="fc", compute_path="fast")


# ------------------------------------------------------------------- both paths: same function and gradients


def _check_paths_agree(apply, params, x, keeps):
  """``apply(params, x, keep, path)``: values and gradients (params and input) agree for every traced keep."""

  def loss(params, x, keep, path):
    y = apply(params, x, keep, path)
    return jnp.sum(jnp.sin(y) * y), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
  for keep in keeps:
    (l_f, y_f), g_f = grad(params, x, jnp.int32(keep), "factors")
    (l_k, y_k), g_k = grad(params, x, jnp.int32(keep), "kernel")
    assert _max_diff(y_f, y_k) <= TOL, keep
    assert abs(float(l_f - l_k)) <= TOL * max(1.0, abs(float(l_f))), keep
    assert _max_diff(g_f, g_k) <= TOL, keep


def test_dense_paths_agree():
  params = mj.factorize_kernel(_randn(0, (6, 5), 0.3), _randn(1, (5,), 0.1))
  x = _randn(2, (3, 4, 6))
  _check_paths_agree(lambda p, x, k, path: mj.dense(p, x, k, compute_path=path), params, x, [0, 1, 3, 5])


@pytest.mark.parametrize("strides, padding, dilation", [
    (1, "SAME", 1), (2, "VALID", 1), ((2, 1), ((1, 2), (0, 1)), 1), (1, "SAME", 2), (2, 1, (1, 2)),
])
def test_conv_paths_agree(strides, padding, dilation):
  params = mj.factorize_kernel(_randn(0, (3, 3, 2, 4), 0.3), _randn(1, (4,), 0.1))
  x = _randn(2, (2, 7, 6, 2))

  def apply(p, x, k, path):
    return mj.conv(p, x, k, strides=strides, padding=padding, dilation=dilation, compute_path=path)

  _check_paths_agree(apply, params, x, [0, 2, 4])


def test_attention_paths_agree():
  d, heads = 8, 2
  params = {w: mj.factorize_kernel(_randn(i, (d, d), 0.3), _randn(10 + i, (d,), 0.1))
            for i, w in enumerate(("query", "key", "value", "out"))}
  x = _randn(9, (2, 5, d))

  def apply(p, x, k, path):
    keeps = {"query": k, "key": jnp.maximum(k - 1, 0), "value": k, "out": k}
    return mj.multi_head_attention(p, x, num_heads=heads, keep=keeps, compute_path=path)

  _check_paths_agree(apply, params, x, [1, 4, 8])


def test_kernel_path_after_a_normalization_at_transformer_size():
  """A LayerNorm feeding the kernel path, as in a Transformer's MLP, at a size where jaxlib 0.10.2's CPU
  fusion of ``norm(x) @ (A @ B)`` returned values off by about 7 (the reason pyproject excludes it)."""
  x, a, b = _randn(0, (4096, 128)), _randn(1, (128, 72), 128 ** -0.5), _randn(2, (72, 512), 72 ** -0.5)

  def layer(x, a, b, path):
    normed = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
    return mj.dense({"a": a, "b": b}, normed, jnp.int32(72), compute_path=path)

  x64 = np.asarray(x, np.float64)
  normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
  reference = normed @ (np.asarray(a, np.float64) @ np.asarray(b, np.float64))
  for path in ("kernel", "factors"):
    out = jax.jit(layer, static_argnums=3)(x, a, b, path)
    assert float(np.max(np.abs(np.asarray(out) - reference))) <= 1e-4, path


def test_static_keep_agrees_with_masked_on_both_paths():
  params = mj.factorize_kernel(_randn(0, (3, 3, 3, 5), 0.3), _randn(1, (5,), 0.1))
  x = _randn(2, (2, 6, 6, 3))
  for path in ("factors", "kernel"):
    for keep in (0, 2, 5):
      sliced = mj.conv(params, x, keep, compute_path=path)
      masked = mj.conv(params, x, jnp.int32(keep), compute_path=path)
      assert _max_diff(sliced, masked) <= TOL, (path, keep)


# ------------------------------------------------------------------------------ 'auto' wiring and traces


def _jaxpr(fn, *args):
  return str(jax.make_jaxpr(fn)(*args))


def test_auto_runs_the_path_the_rule_chooses():
  # A full-rank convolution over many pixels: the kernel path.
  conv_params = mj.factorize_kernel(_randn(0, (3, 3, 4, 4)))
  images = _randn(1, (8, 16, 16, 4))
  conv = lambda path: (lambda p, x, k: mj.conv(p, x, k, compute_path=path))
  assert rules.choose_compute_path(8 * 16 * 16, 36, 4, 4, lanes=rules.CPU_CONV_LANES) == "kernel"
  assert rules.choose_compute_path(8 * 16 * 16, 36, 4, 4) == "kernel"
  args = (conv_params, images, jnp.int32(3))
  assert _jaxpr(conv("auto"), *args) == _jaxpr(conv("kernel"), *args) != _jaxpr(conv("factors"), *args)
  # On CPU a narrow rank is priced at CPU_CONV_LANES channels: LeNet conv2 at rank 4 forms its kernel.
  if jax.default_backend() == "cpu":
    narrow = mj.factorize_kernel(_randn(4, (5, 5, 6, 16)), rank=4)
    args = (narrow, _randn(5, (16, 12, 12, 6)), jnp.int32(2))
    assert _jaxpr(conv("auto"), *args) == _jaxpr(conv("kernel"), *args)
    # LeNet conv1 (1 -> 6) runs as shifted multiply-adds, priced by FLOPs: at rank 2 the factors, which
    # only differentiation runs (see test_lenet_train_step_computes_conv1_s_shifted_sum_once).
    shifted = mj.factorize_kernel(_randn(6, (5, 5, 1, 6)), rank=2)
    args = (shifted, _randn(7, (16, 28, 28, 1)), jnp.int32(1))
    assert "_forward_by_kernel" in _jaxpr(conv("auto"), *args)
  # A wide dense layer on a few rows: the factor path.
  dense_params = mj.factorize_kernel(_randn(2, (64, 48)))
  rows = _randn(3, (4, 64))
  dense = lambda path: (lambda p, x, k: mj.dense(p, x, k, compute_path=path))
  assert rules.choose_compute_path(4, 64, 48, 48) == "factors"
  args = (dense_params, rows, jnp.int32(3))
  assert _jaxpr(dense("auto"), *args) == _jaxpr(dense("factors"), *args) != _jaxpr(dense("kernel"), *args)


def test_auto_counts_every_output_position_of_a_convolution(monkeypatch):
  # A full-rank 3x3 conv 1 -> 8 (d_in 9, d_out 8, r 8): on one 3x3 image stride 1 gives 9 output
  # pixels (kernel) and stride 2 gives 4 (factors), though the input has 9 pixels both times.
  monkeypatch.setattr(factorized, "SHIFTED_SUM_COPIES", 1.0)  # FLOPs only (the other test weighs copies)
  lanes = rules.CPU_CONV_LANES if jax.default_backend() == "cpu" else 1
  assert rules.choose_compute_path(9, 9, 8, 8, lanes=lanes) == "kernel"
  assert rules.choose_compute_path(4, 9, 8, 8, lanes=lanes) == "factors"
  params = mj.factorize_kernel(_randn(0, (3, 3, 1, 8)))
  x = _randn(1, (1, 3, 3, 1))
  for strides, expected in ((1, "kernel"), (2, "factors")):
    fn = lambda path, strides=strides: (lambda p, x, k: mj.conv(p, x, k, strides=strides, compute_path=path))
    args = (params, x, jnp.int32(5))
    assert _jaxpr(fn("auto"), *args) == _jaxpr(fn(expected), *args), strides


def test_changing_keep_counts_does_not_recompile_under_auto():
  params = {"conv": mj.factorize_kernel(_randn(0, (3, 3, 2, 6))), "fc": mj.factorize_kernel(_randn(1, (6, 5)))}
  x = _randn(2, (4, 8, 8, 2))
  traces = []

  @jax.jit
  def loss(params, x, keeps):
    traces.append(1)
    h = jax.nn.relu(mj.conv(params["conv"], x, keeps["conv"]))
    return jnp.sum(mj.dense(params["fc"], h.mean(axis=(1, 2)), keeps["fc"]) ** 2)

  grad = jax.jit(jax.grad(loss))
  for conv_keep, fc_keep in ((6, 5), (1, 5), (3, 2), (0, 0), (6, 1)):
    keeps = {"conv": jnp.int32(conv_keep), "fc": jnp.int32(fc_keep)}
    jax.block_until_ready(loss(params, x, keeps))
    jax.block_until_ready(grad(params, x, keeps))
  assert loss._cache_size() == 1 and grad._cache_size() == 1  # pylint: disable=protected-access
  assert len(traces) == 1  # grad reuses the jitted loss's one trace


# ----------------------------------------------------------------------------- skins thread the option


def test_nnx_layers_and_models_pass_compute_path_to_the_core():
  rngs = nnx.Rngs(0)
  layers = [mnnx.Linear(3, 2, rngs=rngs, compute_path="fast"),
            mnnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs, compute_path="fast"),
            mnnx.Conv(2, 3, 3, rngs=rngs, compute_path="fast")]
  inputs = [jnp.ones((1, 3)), jnp.ones((1, 2, 3)), jnp.ones((1, 5, 5, 2))]
  for layer, x in zip(layers, inputs):
    with pytest.raises(ValueError, match="compute_path"):
      layer(x)
  attention = mnnx.MultiHeadAttention(2, 4, rngs=rngs, compute_path="fast")
  with pytest.raises(ValueError, match="compute_path"):
    attention(jnp.ones((1, 3, 4)))
  with pytest.raises(ValueError, match="compute_path"):
    models.LeNet5(rngs=nnx.Rngs(0), compute_path="fast")


def test_nnx_kernel_and_factor_paths_agree_in_a_model():
  x = _randn(0, (2, 28, 28, 1))
  outs = {path: models.LeNet5(rngs=nnx.Rngs(0), compute_path=path)(x) for path in ("factors", "kernel", "auto")}
  assert _max_diff(outs["factors"], outs["kernel"]) <= TOL
  assert _max_diff(outs["auto"], outs["kernel"]) <= TOL


def test_linen_layers_pass_compute_path_to_the_core():
  for module, x in ((mlinen.Dense(3, compute_path="fast"), jnp.ones((1, 2))),
                    (mlinen.Conv(3, 3, compute_path="fast"), jnp.ones((1, 5, 5, 2))),
                    (mlinen.DenseGeneral(4, axis=(-2, -1), compute_path="fast"), jnp.ones((1, 2, 3))),
                    (mlinen.MultiHeadDotProductAttention(2, compute_path="fast"), jnp.ones((1, 3, 4)))):
    with pytest.raises(ValueError, match="compute_path"):
      module.init(jax.random.key(0), x)
  x = _randn(1, (2, 6, 6, 2))
  factors, kernel = mlinen.Conv(4, 3, compute_path="factors"), mlinen.Conv(4, 3, compute_path="kernel")
  variables = factors.init(jax.random.key(0), x)
  assert _max_diff(factors.apply(variables, x), kernel.apply(variables, x)) <= TOL
  assert isinstance(factors, nn.Module)


def test_compute_path_scope_overrides_auto_layers_while_tracing():
  params = mj.factorize_kernel(_randn(0, (3, 3, 4, 4)))
  images, keep = _randn(1, (8, 16, 16, 4)), jnp.int32(3)
  conv = lambda path: (lambda p, x, k: mj.conv(p, x, k, compute_path=path))

  def scoped(p, x, k):
    with factorized.compute_path_scope("factors"):
      return mj.conv(p, x, k)

  assert _jaxpr(scoped, params, images, keep) == _jaxpr(conv("factors"), params, images, keep)
  # Outside the scope the rule applies again (here: the kernel), and a layer's own path is kept inside it.
  assert _jaxpr(conv("auto"), params, images, keep) == _jaxpr(conv("kernel"), params, images, keep)
  with factorized.compute_path_scope("factors"):
    inner = _jaxpr(conv("kernel"), params, images, keep)
  assert inner == _jaxpr(conv("kernel"), params, images, keep)
  with pytest.raises(ValueError, match="compute_path"):
    with factorized.compute_path_scope("fast"):
      pass
  # Under vmap over keep counts the scoped sweep equals the unscoped one.
  keeps = jnp.arange(1, 5, dtype=jnp.int32)
  sweep = jax.vmap(lambda k: scoped(params, images, k))(keeps)
  assert _max_diff(sweep, jax.vmap(lambda k: mj.conv(params, images, k))(keeps)) <= TOL


# ------------------------------------------------------------------- shifted convolution (CPU, few channels)


@pytest.mark.parametrize("kernel_shape, padding, x_shape", [
    ((5, 5, 1, 6), "VALID", (3, 12, 11, 1)),          # LeNet's first conv
    ((3, 3, 3, 16), "SAME", (2, 9, 8, 3)),            # a CIFAR stem at width 16
    ((3, 3, 2, 4), ((2, 0), (1, 3)), (2, 7, 6, 2)),   # explicit, uneven padding
])
@pytest.mark.parametrize("compute_path", ["kernel", "factors"])
def test_shifted_conv_is_the_direct_convolution_with_its_gradients(kernel_shape, padding, x_shape, compute_path,
                                                                  monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the shifted convolution is a CPU path")
  params = factorized.factorize_kernel(_randn(0, kernel_shape), _randn(1, kernel_shape[-1:]))
  x = _randn(2, x_shape)
  keep = kernel_shape[-1] - 1  # a masked component, so the mask's gradient path is covered too

  def loss(params, x):
    return jnp.sum(jnp.sin(mj.conv(params, x, keep, padding=padding, compute_path=compute_path)))

  def forward_ops():
    return str(jax.make_jaxpr(lambda x: mj.conv(params, x, keep, padding=padding, compute_path=compute_path))(x))

  shifted = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  assert "conv_general_dilated" not in forward_ops().split("custom_vjp_call")[0]
  monkeypatch.setattr(rules, "SHIFTED_CONV_MAX_IN", 0)  # every convolution direct
  assert "conv_general_dilated" in forward_ops()
  assert _max_diff(shifted, jax.value_and_grad(loss, argnums=(0, 1))(params, x)) <= TOL


def test_shifted_conv_rule():
  common = dict(strides=(1, 1), dilation=(1, 1), dtype=jnp.float32, backend="cpu")
  assert rules.use_shifted_conv(1, 6, **common)
  assert rules.use_shifted_conv(3, 16, **common)
  assert not rules.use_shifted_conv(3, 64, **common)  # measured slower than direct
  assert not rules.use_shifted_conv(6, 16, **common)
  assert not rules.use_shifted_conv(1, 6, **dict(common, backend="gpu"))
  assert not rules.use_shifted_conv(1, 6, **dict(common, dtype=jnp.bfloat16))  # would accumulate in bfloat16
  assert not rules.use_shifted_conv(1, 6, **dict(common, strides=(2, 2)))
  assert not rules.use_shifted_conv(1, 6, **dict(common, dilation=(1, 2)))



def test_shifted_conv_kernel_path_is_weighed_for_its_fused_copies():
  # LeNet conv1 at full rank (128 images, 24x24 outputs, 5x5x1 -> 6): kernel by FLOPs, factors once the
  # kernel path's sum counts SHIFTED_SUM_COPIES times; a 3 -> 16 stem (32x32x32 outputs) keeps its kernel.
  lenet_conv1 = (128 * 24 * 24, 25, 6, 6)
  assert rules.choose_compute_path(*lenet_conv1) == "kernel"
  assert rules.choose_compute_path(*lenet_conv1, kernel_copies=rules.SHIFTED_SUM_COPIES) == "factors"
  assert rules.choose_compute_path(32 * 32 * 32, 27, 16, 16, kernel_copies=rules.SHIFTED_SUM_COPIES) == "kernel"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="shifted convolutions run on CPU only")
def test_lenet_train_step_computes_conv1_s_shifted_sum_once():
  # Through the formed kernel, XLA fused conv1's 25-tap sum into ReLU, max-pool and both their
  # gradients: 75 multiplies of conv1's output shape. On the factor path the matmul reads one sum.
  model = models.LeNet5(rngs=nnx.Rngs(0))
  fmodel, params, model_state = training.FunctionalModel.from_module(model)
  optimizer = optax.sgd(0.01)
  step = training.make_train_step(fmodel, optimizer, sampler=mj.samplers.single_layer(), lasso=1e-4)
  state = training.init_state(params, model_state, optimizer)
  batch = {"image": jnp.zeros((8, 28, 28, 1)), "label": jnp.zeros((8,), jnp.int32)}
  hlo = step.lower(state, batch, jax.random.key(0)).compile().as_text()
  multiplies = len(re.findall(r"f32\[8,24,24,6\]\S* multiply\(", hlo))
  assert 25 <= multiplies < 50
  # A forward pass alone forms the kernel (rank 3 has a third of its FLOPs, but the factors' matmul by B
  # is slow): no matmul over conv1's output pixels, which the factor path has.
  conv1 = mj.factorize_kernel(_randn(8, (5, 5, 1, 6)))
  images = _randn(9, (8, 28, 28, 1))
  pixel_matmul = re.compile(r"f32\[(8,24,24|4608),6\]\S* (dot|fusion)\(.*(dot|kind=kOutput)")

  def forward_hlo(keep, path):
    fn = jax.jit(lambda p, x: mj.conv(p, x, keep, padding="VALID", compute_path=path))
    return fn.lower(conv1, images).compile().as_text()

  for keep in (None, 3, jnp.int32(3)):
    assert not pixel_matmul.search(forward_hlo(keep, "auto")), keep
    assert pixel_matmul.search(forward_hlo(keep, "factors")), keep


# ------------------------------------------------------------- patches convolution (CPU, tiny feature maps)


@pytest.mark.parametrize("kernel_shape, padding, x_shape, strides, dilation", [
    ((3, 3, 8, 6), "SAME", (3, 2, 2, 8), 1, 1),                # VGG's 2x2 stage
    ((3, 3, 4, 5), ((1, 2), (0, 1)), (2, 4, 3, 4), 2, 1),      # strided, uneven padding: 3x1 outputs
    ((3, 3, 4, 5), "SAME", (2, 2, 2, 4), 1, 2),                # dilated
    ((1, 1, 6, 4), "VALID", (2, 3, 1, 1, 6), 1, 1),            # a 1x1 conv with two leading axes
    ((3, 3, 3, 16), "SAME", (2, 2, 2, 3), 1, 1),               # few channels: patches before shifted
])
@pytest.mark.parametrize("compute_path", ["kernel", "factors"])
def test_patches_conv_is_the_direct_convolution_with_its_gradients(kernel_shape, padding, x_shape, strides,
                                                                  dilation, compute_path, monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the patches convolution is a CPU path")
  params = factorized.factorize_kernel(_randn(0, kernel_shape), _randn(1, kernel_shape[-1:]))
  x = _randn(2, x_shape)
  keep = jnp.asarray(max(1, factorized.capacity(params) - 1))  # a masked component

  def apply(params, x):
    return mj.conv(params, x, keep, padding=padding, strides=strides, dilation=dilation, compute_path=compute_path)

  def loss(params, x):
    return jnp.sum(jnp.sin(apply(params, x)))

  def program():
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x))

  patches, patches_program = jax.value_and_grad(loss, argnums=(0, 1))(params, x), program()
  assert "conv_general_dilated" not in patches_program
  monkeypatch.setattr(rules, "PATCHES_CONV_MAX_POSITIONS", 0)  # every convolution direct (or shifted)
  assert program() != patches_program
  # Sums of up to 72 products in another order: float32 rounding reaches 1.2e-5 of values near 4.
  assert _max_diff(patches, jax.value_and_grad(loss, argnums=(0, 1))(params, x)) <= 3 * TOL


def test_patches_conv_rule():
  assert rules.use_patches_conv(2, 2, backend="cpu")
  assert rules.use_patches_conv(1, 4, backend="cpu")
  assert rules.use_patches_conv(1, 1, backend="cpu")
  assert not rules.use_patches_conv(3, 2, backend="cpu")  # from 4x4 up XLA's direct convolution is as fast or faster
  assert not rules.use_patches_conv(2, 2, backend="gpu")


# ------------------------------------------------- input gradient by matmul (CPU, few channels, large windows)


@pytest.mark.parametrize("kernel_shape, padding, x_shape", [
    ((5, 5, 6, 16), "VALID", (3, 12, 12, 6)),         # LeNet's conv2
    ((5, 5, 5, 8), "SAME", (2, 9, 7, 5)),             # odd sizes, padded
    ((5, 5, 4, 5), ((2, 0), (1, 3)), (2, 7, 6, 4)),   # explicit, uneven padding
])
@pytest.mark.parametrize("compute_path", ["kernel", "factors"])
def test_matmul_input_grad_is_xla_s_convolution_gradient(kernel_shape, padding, x_shape, compute_path, monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the matmul input gradient is a CPU path")
  params = factorized.factorize_kernel(_randn(0, kernel_shape), _randn(1, kernel_shape[-1:]))
  x = _randn(2, x_shape)
  keep = jnp.asarray(factorized.capacity(params) - 1)  # a masked component

  def loss(params, x):
    return jnp.sum(jnp.sin(mj.conv(params, x, keep, padding=padding, compute_path=compute_path)))

  def program():
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x))

  matmul, matmul_program = jax.value_and_grad(loss, argnums=(0, 1))(params, x), program()
  monkeypatch.setattr(rules, "MATMUL_INPUT_GRAD_MAX_IN", 0)  # XLA's own input gradient
  assert program() != matmul_program
  # Sums of up to 400 products in another order: float32 rounding.
  assert _max_diff(matmul, jax.value_and_grad(loss, argnums=(0, 1))(params, x)) <= 3 * TOL


def test_matmul_input_grad_rule():
  common = dict(strides=(1, 1), dilation=(1, 1), dtype=jnp.float32, backend="cpu")
  assert rules.use_matmul_input_grad(6, (5, 5), **common)
  assert rules.use_matmul_input_grad(3, (5, 5), **common)
  assert not rules.use_matmul_input_grad(8, (5, 5), **common)
  assert not rules.use_matmul_input_grad(6, (3, 3), **common)  # measured: XLA's is as fast with 3x3 windows
  assert not rules.use_matmul_input_grad(6, (5, 5), **dict(common, backend="gpu"))
  assert not rules.use_matmul_input_grad(6, (5, 5), **dict(common, dtype=jnp.bfloat16))
  assert not rules.use_matmul_input_grad(6, (5, 5), **dict(common, strides=(2, 2)))
  assert not rules.use_matmul_input_grad(6, (5, 5), **dict(common, dilation=(2, 1)))
