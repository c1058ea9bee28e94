"""Tests of the reference models and BatchNorm recalibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax
import maestro_jax.nnx as mnnx
from maestro_jax import models


# Tiny configurations: every model family, both norms where they apply.
CASES = {
    "mlp": ((4, 4, 1), {"hidden": (8, 6)}),
    "lenet5": ((28, 28, 1), {}),  # the default SVD init; the others use 'random' (no SVD: faster)
    "vgg19-batch": ((8, 8, 3), {"width": 4, "init_method": "random"}),
    "vgg19-group": ((8, 8, 3), {"width": 4, "norm": "group", "init_method": "random"}),
    "resnet18-batch": ((8, 8, 3), {"width": 4, "init_method": "random"}),
    "resnet18-group-imagenet": ((8, 8, 3), {"width": 4, "norm": "group", "stem": "imagenet", "init_method": "random"}),
    "transformer": ((6, 5, 1), {"d_model": 8, "num_heads": 2, "num_layers": 1, "mlp_dim": 16, "init_method": "random"}),
}


def _build(case, factorized):
  shape, kwargs = CASES[case]
  name = case.split("-")[0]
  return models.make_model(name, num_classes=3, image_shape=shape, factorized=factorized, rngs=nnx.Rngs(0),
                           **kwargs)


# One compiled program per model structure is much faster than op-by-op dispatch.
_forward = nnx.jit(lambda model, x: model(x))
_forward_train = nnx.jit(lambda model, x: model(x, train=True))


def _images(shape, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch,) + tuple(shape))


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_runs_and_dense_twin_factorizes_to_the_same_function(case):
  shape = CASES[case][0]
  x = _images(shape)
  fact = _build(case, True)
  dense = _build(case, False)
  y = _forward(fact, x)
  assert y.shape == (2, 3)
  assert bool(jnp.isfinite(y).all())
  assert mnnx.capacities(fact), "the factorized model has factorized layers"
  assert not mnnx.capacities(dense), "the dense twin has none"

  # Same attribute names: the converted dense twin has exactly the factorized model's layers and shapes.
  y_dense = _forward(dense, x)
  mnnx.factorize(dense)
  assert mnnx.capacities(dense) == mnnx.capacities(fact)
  np.testing.assert_allclose(_forward(dense, x), y_dense, atol=1e-4, rtol=1e-4)
  fact_shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(fact, nnx.Param)))
  dense_shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(dense, nnx.Param)))
  assert fact_shapes == dense_shapes

  # Keep counts reach every layer: keeping one component changes the output.
  mnnx.set_keep_counts(fact, {name: 1 for name in mnnx.capacities(fact)})
  y1 = _forward(fact, x)
  assert bool(jnp.isfinite(y1).all())
  assert not np.allclose(y1, y)


def test_lenet5_matches_the_paper_layout():
  model = models.LeNet5(rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params["conv1"]["a"].shape == (5, 5, 1, 6)
  assert params["conv2"]["a"].shape == (5, 5, 6, 16)
  assert params["fc1"]["a"].shape[0] == 256
  assert (params["fc2"]["a"].shape[0], params["fc2"]["b"].shape[1]) == (120, 84)
  assert params["fc3"]["b"].shape == (10, 10)
  assert list(maestro_jax.capacities(params)) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
  # fc1's input is computed from the image shape.
  big = models.LeNet5(image_shape=(32, 32, 3), factorized=False, rngs=nnx.Rngs(0))
  assert big.fc1.kernel[...].shape == (400, 120)
  with pytest.raises(ValueError, match="does not match"):
    models.LeNet5(in_channels=3, image_shape=(28, 28, 1), rngs=nnx.Rngs(0))


def test_vgg19_and_resnet18_layer_names():
  vgg = models.VGG19(width=4, init_method="random", rngs=nnx.Rngs(0))
  names = list(mnnx.capacities(vgg))
  assert len(names) == 17 and "features.15" in names and "classifier" in names
  assert vgg.classifier.in_features == 32  # 512 * width / 64
  resnet = models.ResNet18(width=4, init_method="random", rngs=nnx.Rngs(0))
  names = set(mnnx.capacities(resnet))
  assert len(names) == 1 + 8 * 2 + 3 + 1  # stem, two convs per block, three shortcuts, fc
  assert {"conv1", "layer2.0.shortcut", "layer3.0.shortcut", "layer4.0.shortcut", "layer4.1.conv2", "fc"} <= names
  assert "layer1.0.shortcut" not in names
  assert resnet.layer1[0].conv1.b[...].shape[-1] == 4 and resnet.layer4[1].conv2.b[...].shape[-1] == 32
  assert resnet.conv1.bias is None  # convs followed by a norm have no bias
  with pytest.raises(ValueError, match="norm must be one of"):
    models.ResNet18(norm="layer", rngs=nnx.Rngs(0))


def test_batch_norm_train_flag():
  model = models.VGG19(width=4, init_method="random", rngs=nnx.Rngs(0))
  x = _images((8, 8, 3), batch=4)
  before = model.norms[0].mean[...]
  y_eval = _forward(model, x)
  np.testing.assert_array_equal(model.norms[0].mean[...], before)
  y_train = _forward_train(model, x)
  assert not np.allclose(model.norms[0].mean[...], before)
  assert not np.allclose(y_eval, y_train)


def test_transformer_inputs():
  tokens = models.TransformerEncoder(4, vocab_size=11, d_model=8, num_heads=2, num_layers=1, mlp_dim=16, max_len=6,
                                     init_method="random", rngs=nnx.Rngs(0))
  ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5) % 11
  assert _forward(tokens, ids).shape == (2, 4)
  assert isinstance(tokens.embed, nnx.Embed)
  assert "embed" not in mnnx.capacities(tokens)
  with pytest.raises(ValueError, match="max_len"):
    tokens(jnp.zeros((1, 7), jnp.int32))
  feats = models.TransformerEncoder(4, in_features=5, d_model=8, num_heads=2, num_layers=1, mlp_dim=16, max_len=6,
                                    init_method="random", rngs=nnx.Rngs(0))
  assert "embed" in mnnx.capacities(feats)
  seq = _images((6, 5))
  # Images (B, H, W, C) are read row by row: the same as the (B, H, W * C) sequence.
  np.testing.assert_allclose(_forward(feats, seq.reshape(2, 6, 5, 1)), _forward(feats, seq), atol=1e-6)
  with pytest.raises(ValueError, match="exactly one"):
    models.TransformerEncoder(4, rngs=nnx.Rngs(0))


def test_registry_and_make_model():
  assert set(models.MODELS) == {"mlp", "lenet5", "vgg19", "resnet18", "transformer"}
  with pytest.raises(ValueError, match=r"valid names are \['lenet5', 'mlp', 'resnet18', 'transformer', 'vgg19'\]"):
    models.make_model("alexnet", num_classes=10, image_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  mlp = models.make_model("mlp", num_classes=10, image_shape=(28, 28, 1), init_method="random", rngs=nnx.Rngs(0))
  assert [layer.in_features for layer in mlp.layers] == [784, 256, 256]
  tr = models.make_model("transformer", num_classes=10, image_shape=(28, 28, 1), d_model=8, num_heads=2,
                         num_layers=1, mlp_dim=8, init_method="random", rngs=nnx.Rngs(0))
  assert (tr.in_features, tr.max_len) == (28, 28)


# ------------------------------------------------------------------------------------ recalibration


@pytest.fixture(scope="module")
def resnet_and_batches():
  model = models.ResNet18(3, width=4, init_method="random", rngs=nnx.Rngs(0))
  model(_images((8, 8, 3), batch=4, seed=5), train=True)  # move the running stats away from their init
  batches = jax.random.normal(jax.random.key(1), (3, 4, 8, 8, 3)) * 2.0 + 0.5
  return model, batches


def test_recalibration_is_the_average_of_batch_statistics(resnet_and_batches):
  model, batches = resnet_and_batches
  model = nnx.clone(model)
  params_before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  models.recalibrate_batch_norm(model, batches)
  z = jnp.stack([model.conv1(b) for b in batches])  # the stem norm's input, per batch
  np.testing.assert_allclose(model.norm1.mean[...], z.mean(axis=(1, 2, 3)).mean(0), atol=1e-5)
  np.testing.assert_allclose(model.norm1.var[...], z.var(axis=(1, 2, 3)).mean(0), atol=1e-5)
  params_after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, params_before, params_after)

  # An iterable of batches gives the same statistics as the stacked array.
  other = nnx.clone(model)
  models.recalibrate_batch_norm(other, list(batches), jit=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), nnx.to_pure_dict(nnx.state(other, nnx.BatchStat)))


def test_recalibration_on_one_batch_makes_eval_match_train(resnet_and_batches):
  model, batches = resnet_and_batches
  model = nnx.clone(model)
  mnnx.set_keep_counts(model, {"layer2.0.conv1": 2, "fc": 1})
  x = batches[0]
  assert not np.allclose(_forward(model, x), _forward_train(nnx.clone(model), x), atol=1e-4)
  models.recalibrate_batch_norm(model, [x], jit=True)
  # Every BatchNorm's running statistics are now those of x, at the current keep counts.
  np.testing.assert_allclose(_forward(model, x), _forward_train(model, x), atol=1e-4)


def test_recalibration_is_pure_and_vmaps_over_keep_counts(resnet_and_batches):
  model, batches = resnet_and_batches
  graphdef, params, keeps, rest = nnx.split(model, nnx.Param, mnnx.KeepCount, ...)
  stacked = jax.tree.map(lambda k: jnp.stack([k, jnp.ones_like(k)]), keeps)

  def calibrate(k):
    return models.recalibrate_batch_norm_state(graphdef, (params, k, rest), batches)

  out_params, out_keeps, out_rest = jax.jit(jax.vmap(calibrate))(stacked)
  statistics = jax.jit(lambda k: models.batch_norm_statistics(graphdef, (params, k, rest), batches))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b), out_params, params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out_keeps, stacked)
  for i in range(2):
    keep_i = jax.tree.map(lambda k: k[i], stacked)
    expected = statistics(keep_i)
    got = jax.tree.map(lambda s: s[i], nnx.filter_state(out_rest, nnx.BatchStat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, expected)
  full = jax.tree.map(lambda s: s[0], nnx.filter_state(out_rest, nnx.BatchStat))
  low = jax.tree.map(lambda s: s[1], nnx.filter_state(out_rest, nnx.BatchStat))
  assert not np.allclose(full["layer1"][0]["norm2"]["mean"][...], low["layer1"][0]["norm2"]["mean"][...])


def test_recalibration_forgets_nan_statistics(resnet_and_batches):
  model, batches = resnet_and_batches
  model = nnx.clone(model)
  model.layer3[1].norm2.mean[...] = jnp.full_like(model.layer3[1].norm2.mean[...], jnp.nan)
  models.recalibrate_batch_norm(model, (b for b in batches[:2]), jit=True)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))


def test_recalibration_without_batch_norm_is_a_no_op():
  model = models.LeNet5(rngs=nnx.Rngs(0))
  before = nnx.to_pure_dict(nnx.state(model))
  models.recalibrate_batch_norm(model, _images((28, 28, 1))[None], jit=True)
  jax.tree.map(np.testing.assert_array_equal, before, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize("shape, padding", [((2, 24, 24, 6), "VALID"), ((2, 9, 11, 5), "VALID"),
                                            ((2, 9, 11, 5), "SAME"), ((1, 2, 5, 7, 3), "SAME")])
def test_max_pool_is_flax_max_pool_with_its_gradient(shape, padding):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)  # no ties

  def flax_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding=padding)

  ours = models._max_pool(x, 2, padding)
  np.testing.assert_array_equal(ours, flax_pool(x))
  grads = [jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x))))(x) for f in (lambda x: models._max_pool(x, 2, padding),
                                                                       flax_pool)]
  np.testing.assert_array_equal(*grads)
