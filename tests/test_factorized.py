"""Tests for the factorized dense / conv / attention layers (maestro_jax/_src/factorized.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax as mj
import maestro_jax.nnx as mnnx

TOL = 1e-5


def _randn(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _max_diff(x, y):
  return float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))


def _plus(y, bias):
  """``y + bias`` on the last axis without implicit rank promotion."""
  return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def _lax_conv(x, kernel, strides, padding, dilation):
  """Reference dense convolution on an NHWC batch with any leading dims."""
  pad = padding
  if isinstance(padding, int):
    pad = ((padding, padding),) * 2
  elif not isinstance(padding, str):
    pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  dilation = (dilation,) * 2 if isinstance(dilation, int) else tuple(dilation)
  batch = x.shape[:-3]
  y = jax.lax.conv_general_dilated(x.reshape((-1,) + x.shape[-3:]), kernel, strides, pad, rhs_dilation=dilation,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(batch + y.shape[1:])


# ------------------------------------------------------------------------ SVD init reproduces dense


@pytest.mark.parametrize("batch", [(), (5,), (2, 3, 4)])
def test_dense_svd_reproduces_dense(batch):
  kernel, bias = _randn(0, (7, 5)), _randn(1, (5,))
  params = mj.factorize_kernel(kernel, bias)
  assert params["a"].shape == (7, 5) and params["b"].shape == (5, 5)
  x = _randn(2, batch + (7,))
  y = mj.dense(params, x)
  assert y.shape == batch + (5,)
  assert _max_diff(y, _plus(x @ kernel, bias)) <= TOL
  # The dense kernel formed from the factors is the original one.
  assert _max_diff(mj.dense_kernel(params), kernel) <= TOL


def test_dense_svd_wide_kernel_and_init():
  # d_out > d_in: capacity is d_in; init(method='svd') is the SVD of a LeCun kernel.
  params = mj.init_layer(jax.random.key(0), (3, 8))
  assert mj.capacity(params) == 3 == mj.full_rank((3, 8))
  assert params["bias"].shape == (8,) and float(jnp.abs(params["bias"]).max()) == 0.0
  kernel = mj.dense_kernel(params)
  x = _randn(1, (4, 3))
  assert _max_diff(mj.dense(params, x), x @ kernel) <= TOL
  # Components come out ordered by singular value.
  scales = np.asarray(mj.component_scales(params))
  np.testing.assert_allclose(scales, np.linalg.svd(np.asarray(kernel), compute_uv=False), rtol=1e-5)
  assert np.all(np.diff(scales) <= 0)


CONV_CASES = [
    dict(strides=1, padding="SAME", dilation=1),
    dict(strides=2, padding="SAME", dilation=1),
    dict(strides=1, padding="VALID", dilation=1),
    dict(strides=(2, 1), padding="VALID", dilation=1),
    dict(strides=1, padding=((1, 2), (0, 1)), dilation=1),
    dict(strides=2, padding=1, dilation=1),
    dict(strides=1, padding="SAME", dilation=2),
    dict(strides=(1, 2), padding=((2, 0), (1, 1)), dilation=(2, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"s{c['strides']}-p{c['padding']}-d{c['dilation']}")
def test_conv_svd_reproduces_dense(case):
  kernel, bias = _randn(0, (3, 3, 2, 5)), _randn(1, (5,))
  params = mj.factorize_kernel(kernel, bias)
  assert params["a"].shape == (3, 3, 2, 5) and params["b"].shape == (5, 5)
  x = _randn(2, (2, 7, 6, 2))
  y = mj.conv(params, x, **case)
  ref = _plus(_lax_conv(x, kernel, case["strides"], case["padding"], case["dilation"]), bias)
  assert y.shape == ref.shape
  assert _max_diff(y, ref) <= TOL

  # Same as flax's nnx.Conv with this kernel.
  layer = nnx.Conv(2, 5, (3, 3), case["strides"], padding=case["padding"], kernel_dilation=case["dilation"],
                   rngs=nnx.Rngs(0))
  layer.kernel[...] = kernel
  layer.bias[...] = bias
  assert _max_diff(y, layer(x)) <= TOL


def test_conv_leading_batch_dims_and_narrow_rank():
  # c_out < kh*kw*c_in: capacity is c_out; several leading batch dims are flattened and restored.
  kernel = _randn(3, (2, 2, 3, 4))
  params = mj.factorize_kernel(kernel)
  assert mj.capacity(params) == 4 == mj.full_rank(kernel.shape)
  x = _randn(4, (2, 3, 5, 5, 3))
  y = mj.conv(params, x, strides=2, padding="VALID")
  ref = _lax_conv(x, kernel, 2, "VALID", 1)
  assert y.shape == (2, 3, 2, 2, 4)
  assert _max_diff(y, ref) <= TOL
  assert _max_diff(mj.dense_kernel(params), kernel) <= TOL


class _AttnModel(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=3, in_features=8, qkv_features=12, out_features=6,
                                       in_kv_features=5, decode=False, deterministic=True, rngs=rngs)

  def __call__(self, q, kv, mask=None):
    return self.attn(q, kv, kv, mask=mask)


def test_attention_matches_flax_and_core():
  model = _AttnModel(nnx.Rngs(0))
  # Non-zero biases so their conversion is exercised too.
  for which, rng in zip(("query", "key", "value", "out"), range(10, 14)):
    proj = getattr(model.attn, which)
    proj.bias[...] = _randn(rng, proj.bias.shape, 0.1)
  q, kv = _randn(1, (2, 4, 8)), _randn(2, (2, 6, 5))
  mask = jnp.asarray(np.random.default_rng(3).random((2, 1, 4, 6)) > 0.3)
  mask = mask.at[..., 0].set(True)  # Every query attends to at least one key.
  ref = model(q, kv)
  ref_masked = model(q, kv, mask)

  mnnx.factorize(model)
  assert isinstance(model.attn, mnnx.MultiHeadAttention)
  assert _max_diff(model(q, kv), ref) <= TOL
  assert _max_diff(model(q, kv, mask), ref_masked) <= TOL

  params = {w: getattr(model.attn, w).factor_params() for w in ("query", "key", "value", "out")}
  assert params["query"]["a"].shape == (8, 8) and params["key"]["a"].shape == (5, 5)
  core = mj.multi_head_attention(params, q, kv, num_heads=3)
  assert core.shape == (2, 4, 6)
  assert _max_diff(core, ref) <= TOL
  core_masked = mj.multi_head_attention(params, q, kv, kv, num_heads=3, mask=mask)
  assert _max_diff(core_masked, ref_masked) <= TOL
  # Keep counts per projection: keeping everything explicitly changes nothing; keep 0 on 'out' gives its bias.
  full = {w: mj.capacity(p) for w, p in params.items()}
  assert _max_diff(mj.multi_head_attention(params, q, kv, num_heads=3, keep=full), ref) <= TOL
  zero_out = mj.multi_head_attention(params, q, kv, num_heads=3, keep={"out": 0})
  assert _max_diff(zero_out, jnp.broadcast_to(params["out"]["bias"], zero_out.shape)) == 0.0


# ---------------------------------------------------------------------------- masked vs sliced


def test_dense_masked_equals_sliced_every_keep():
  params = mj.factorize_kernel(_randn(0, (6, 4)), _randn(1, (4,)))
  x = _randn(2, (3, 2, 6))
  traces = []

  @jax.jit
  def masked(params, x, keep):
    traces.append(1)
    return mj.dense(params, x, keep)

  for keep in range(mj.capacity(params) + 1):
    y_mask = masked(params, x, jnp.int32(keep))
    y_slice = mj.dense(params, x, keep)
    assert _max_diff(y_mask, y_slice) <= TOL, keep  # masked and sliced calls may take different compute paths
    ref = _plus(x @ mj.dense_kernel(params, keep), params["bias"])
    assert _max_diff(y_slice, ref) <= TOL, keep
  assert len(traces) == 1
  # keep = 0: every output row is the bias, exactly.
  for y in (masked(params, x, jnp.int32(0)), mj.dense(params, x, 0)):
    assert _max_diff(y, jnp.broadcast_to(params["bias"], y.shape)) == 0.0


def test_conv_masked_equals_sliced_every_keep():
  params = mj.factorize_kernel(_randn(0, (3, 3, 2, 4)), _randn(1, (4,)))
  x = _randn(2, (2, 6, 6, 2))
  traces = []

  @jax.jit
  def masked(params, x, keep):
    traces.append(1)
    return mj.conv(params, x, keep, strides=2, padding="SAME")

  for keep in range(mj.capacity(params) + 1):
    y_mask = masked(params, x, jnp.int32(keep))
    y_slice = mj.conv(params, x, keep, strides=2, padding="SAME")
    assert y_mask.shape == y_slice.shape == (2, 3, 3, 4)
    assert _max_diff(y_mask, y_slice) <= TOL, keep  # masked and sliced calls may take different compute paths
    ref = _plus(_lax_conv(x, mj.dense_kernel(params, keep), 2, "SAME", 1), params["bias"])
    assert _max_diff(y_slice, ref) <= TOL, keep
  assert len(traces) == 1
  for y in (masked(params, x, jnp.int32(0)), mj.conv(params, x, 0, strides=2)):
    assert _max_diff(y, jnp.broadcast_to(params["bias"], y.shape)) == 0.0


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_masked_components_get_zero_gradient(kind):
  if kind == "dense":
    params = mj.factorize_kernel(_randn(0, (6, 5)), _randn(1, (5,)))
    x = _randn(2, (4, 6))
    apply = mj.dense
  else:
    params = mj.factorize_kernel(_randn(0, (2, 2, 2, 5)), _randn(1, (5,)))
    x = _randn(2, (2, 4, 4, 2))
    apply = mj.conv
  keep = 2

  @jax.jit
  def grads(params, keep):
    return jax.grad(lambda p: jnp.sum(jnp.sin(apply(p, x, keep))))(params)

  g = grads(params, jnp.int32(keep))
  assert np.all(np.asarray(g["a"][..., keep:]) == 0.0)
  assert np.all(np.asarray(g["b"][keep:]) == 0.0)
  # The kept components and the bias do get gradient.
  assert float(jnp.min(jnp.sum(jnp.abs(g["a"][..., :keep]).reshape(-1, keep), axis=0))) > 0
  assert float(jnp.min(jnp.sum(jnp.abs(g["b"][:keep]), axis=1))) > 0
  assert float(jnp.sum(jnp.abs(g["bias"]))) > 0
  # Same gradient as the sliced (static keep) layer on the kept components.
  g_slice = jax.grad(lambda p: jnp.sum(jnp.sin(apply(p, x, keep))))(params)
  assert _max_diff(g["a"], g_slice["a"]) <= 1e-5
  assert _max_diff(g["b"], g_slice["b"]) <= 1e-5


def test_jitted_step_traces_once_for_all_keep_counts():
  params = mj.init_layer(jax.random.key(0), (5, 4))
  x, y = _randn(1, (8, 5)), _randn(2, (8, 4))
  count = [0]

  @jax.jit
  def step(params, keep):
    count[0] += 1
    loss, g = jax.value_and_grad(lambda p: jnp.mean((mj.dense(p, x, keep) - y) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g), loss

  for keep in [4, 1, 3, 0, 2, 4, 1]:
    params, loss = step(params, jnp.int32(keep))
    assert np.isfinite(float(loss))
  assert count[0] == 1


# ---------------------------------------------------------------------------------- dtypes and init


def test_bf16_compute_close_to_f32():
  params = mj.init_layer(jax.random.key(0), (16, 8))
  params["bias"] = _randn(5, (8,), 0.1)
  x = _randn(1, (4, 16))
  y32 = mj.dense(params, x)
  y16 = mj.dense(params, x, dtype=jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(y32)))
  assert _max_diff(y16, y32) <= 3e-2 * scale

  cparams = mj.init_layer(jax.random.key(1), (3, 3, 2, 4))
  xc = _randn(2, (1, 5, 5, 2))
  c32 = mj.conv(cparams, xc, 2)
  c16 = jax.jit(lambda p, x, k: mj.conv(p, x, k, dtype=jnp.bfloat16))(cparams, xc, jnp.int32(2))
  assert c16.dtype == jnp.bfloat16
  assert _max_diff(c16, c32) <= 3e-2 * float(jnp.max(jnp.abs(c32)))

  # bf16 parameters work as well.
  p16 = mj.init_layer(jax.random.key(2), (16, 8), param_dtype=jnp.bfloat16)
  assert p16["a"].dtype == jnp.bfloat16
  assert mj.dense(p16, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_random_init_product_has_lecun_variance():
  d_in, d_out = 64, 48
  params = mj.init_layer(jax.random.key(0), (d_in, d_out), init_method="random")
  assert params["a"].shape == (d_in, 48) and params["b"].shape == (48, d_out)
  var = float(jnp.var(mj.dense_kernel(params)))
  assert abs(var * d_in - 1.0) < 0.15, var * d_in
  # Conv: fan in is kh * kw * c_in.
  cparams = mj.init_layer(jax.random.key(1), (3, 3, 4, 32), init_method="random")
  cvar = float(jnp.var(mj.dense_kernel(cparams)))
  assert abs(cvar * 36 - 1.0) < 0.15, cvar * 36
  # A low capacity keeps the product's variance.
  lparams = mj.init_layer(jax.random.key(2), (64, 48), rank=8, init_method="random")
  assert abs(float(jnp.var(mj.dense_kernel(lparams))) * d_in - 1.0) < 0.2


# ------------------------------------------------------------------------------------------ errors


def test_static_keep_out_of_range():
  params = mj.init_layer(jax.random.key(0), (4, 3))
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match=r"layer 'fc1'.*keep count 4.*capacity 3"):
    mj.dense(params, x, 4, name="fc1")
  with pytest.raises(ValueError, match=r"layer 'fc1'.*keep count -1.*capacity 3"):
    mj.dense(params, x, -1, name="fc1")
  cparams = mj.init_layer(jax.random.key(0), (3, 3, 2, 4))
  with pytest.raises(ValueError, match=r"layer 'conv'.*keep count 5.*capacity 4"):
    mj.conv(cparams, jnp.ones((1, 4, 4, 2)), 5, name="conv")
  with pytest.raises(ValueError, match=r"layer 'fc1'.*integer scalar"):
    mj.dense(params, x, jnp.float32(2.0), name="fc1")


def test_kernel_of_wrong_rank():
  with pytest.raises(ValueError, match=r"layer 'proj'.*2-D.*4-D.*\(2, 3, 4\)"):
    mj.factorize_kernel(jnp.ones((2, 3, 4)), name="proj")
  with pytest.raises(ValueError, match=r"layer 'proj'.*rank 5 is out of range.*<= 3"):
    mj.factorize_kernel(jnp.ones((3, 4)), rank=5, name="proj")
  with pytest.raises(ValueError, match=r"layer 'x'.*kernel shape must be 2-D or 4-D"):
    mj.init_layer(jax.random.key(0), (2, 3, 4), name="x")


def test_input_features_mismatch():
  params = mj.init_layer(jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match=r"layer 'fc1'.*input has 5 features, expected 4"):
    mj.dense(params, jnp.ones((2, 5)), name="fc1")
  cparams = mj.init_layer(jax.random.key(0), (3, 3, 2, 4))
  with pytest.raises(ValueError, match=r"layer 'conv'.*does not have 2 channels"):
    mj.conv(cparams, jnp.ones((1, 4, 4, 3)), name="conv")
  layer = mnnx.Linear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Linear\(4->3\).*input has 6 features, expected 4"):
    layer(jnp.ones((2, 6)))


def test_grouped_conv_not_supported():
  with pytest.raises(ValueError, match=r"Conv\(4->4\).*feature_group_count=2 is not supported"):
    mnnx.Conv(4, 4, 3, feature_group_count=2, rngs=nnx.Rngs(0))

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)

  with pytest.raises(ValueError, match=r"layer 'conv'.*nnx\.Conv with feature_group_count=2.*not supported"):
    mnnx.factorize(Model(nnx.Rngs(0)))
