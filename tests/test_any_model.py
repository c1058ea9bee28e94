"""Every feature on three user-style models outside the zoo, NNX and Linen alike.

For each model: a jitted sampled train step traces once across keep counts; a
sweep of 12+ truncations equals per-configuration evaluation; greedy search
reaches a MAC budget; the export equals the masked model and loads back; the
parameter/MAC accounting matches a hand count.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import maestro_jax as mj
from maestro_jax import accounting
from maestro_jax import export
from maestro_jax import functional
from maestro_jax import linen as mln
from maestro_jax import nnx as mnx
from maestro_jax import sweep
from maestro_jax import training

NUM_CLASSES = 5


class XOnlyMLP(nnx.Module):
  """An NNX model whose ``__call__`` takes only ``x``."""

  def __init__(self, rngs):
    self.fc1 = mnx.Linear(12, 16, rngs=rngs)
    self.fc2 = mnx.Linear(16, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))


class LinenCNN(nn.Module):
  """A Linen CNN with BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = mln.Conv(8, 3, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    x = jax.nn.relu(x).mean(axis=(1, 2))
    return mln.Dense(NUM_CLASSES, name="head")(x)


class LinenBlock(nn.Module):
  """A Linen Transformer block whose attention projections are DenseGeneral layers."""
  heads: int = 2
  head_dim: int = 4

  @nn.compact
  def __call__(self, x):
    d = self.heads * self.head_dim
    h = mln.Dense(d, name="embed")(x)
    q, k, v = (mln.DenseGeneral((self.heads, self.head_dim), name=n)(h) for n in ("query", "key", "value"))
    att = mj.dot_product_attention(q, k, v)
    h = h + mln.DenseGeneral(d, axis=(-2, -1), name="out")(att)
    h = h + mln.Dense(d, name="mlp2")(jax.nn.gelu(mln.Dense(2 * d, name="mlp1")(h)))
    return mln.Dense(NUM_CLASSES, name="head")(h.mean(axis=1))


def _images(kind, n, seed=0):
  shape = {"mlp": (n, 3, 4), "cnn": (n, 6, 6, 2), "block": (n, 5, 3)}[kind]
  x = jax.random.normal(jax.random.key(seed), shape)
  y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, NUM_CLASSES)
  return x, y


def _build(kind):
  x, _ = _images(kind, 2)
  if kind == "mlp":
    return functional.from_module(XOnlyMLP(nnx.Rngs(0)))
  module = LinenCNN() if kind == "cnn" else LinenBlock()
  return functional.from_module(module, module.init(jax.random.key(0), x))


KINDS = ["mlp", "cnn", "block"]


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_train_step_traces_once(kind):
  view, params, state = _build(kind)
  optimizer = optax.sgd(0.05)
  step = training.make_train_step(view, optimizer, sampler=mj.samplers.independent(), lasso=1e-3, donate=False)
  train_state = training.init_state(params, state, optimizer)
  x, y = _images(kind, 8)
  kept = set()
  for i in range(4):
    train_state, metrics = step(train_state, {"image": x, "label": y}, jax.random.key(i))
    kept.add(float(metrics["kept_fraction"]))
    assert np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1  # four different keep-count draws, one compilation
  assert len(kept) > 1  # the keep counts really changed
  if kind == "cnn":  # training mode updated the BatchNorm statistics
    assert not np.allclose(train_state["model_state"]["batch_stats"]["bn"]["mean"], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_sweep_equals_per_configuration_evaluation(kind):
  view, params, state = _build(kind)
  x, y = _images(kind, 6, seed=3)
  caps = mj.capacities(params)
  rng = np.random.default_rng(0)
  configs = [{n: int(rng.integers(0, c + 1)) for n, c in caps.items()} for _ in range(12)]
  stacked = sweep.stack(configs)
  metrics = sweep.make_sweep(view)(params, state, x, y, None, stacked)
  for i, keeps in enumerate(configs):
    logits, _ = view.apply(params, state, x, keeps)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert abs(float(metrics["loss"][i]) - float(loss)) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_search_reaches_a_mac_budget(kind):
  view, params, state = _build(kind)
  x, y = _images(kind, 8, seed=5)
  positions = view.layer_positions(params, state, x.shape[1:])
  full = accounting.count(params, None, positions).macs_merged
  budget = int(full * 0.6)
  result = sweep.greedy_search(view, params, state, {"image": x, "label": y}, None, positions, budget_macs=budget)
  assert result.macs <= budget < full
  assert accounting.count(params, result.ranks, positions).macs_merged == result.macs


@pytest.mark.parametrize("kind", KINDS)
def test_export_equals_masked_model_and_loads_back(kind, tmp_path):
  view, params, state = _build(kind)
  x, _ = _images(kind, 4, seed=7)
  caps = mj.capacities(params)
  # The first layer at full rank (merged by the auto rule), the others at half rank (kept factorized).
  ranks = {n: c if i == 0 else max(1, c // 2) for i, (n, c) in enumerate(caps.items())}
  masked, _ = view.apply(params, state, x, ranks)
  exported_view, exported, exported_state = export.export_functional(view, params, state, ranks)
  out, _ = exported_view.apply(exported, exported_state, x)
  assert float(jnp.max(jnp.abs(out - masked))) <= 1e-5
  forms = ["kernel" in layer for layer in _layers(exported)]
  assert any(forms) and not all(forms)  # merged and factorized layers both present
  path = export.save_exported(tmp_path / "export", exported, exported_state)
  loaded, loaded_state, _ = export.load_exported(path)
  again, _ = exported_view.apply(loaded, loaded_state, x)
  assert float(jnp.max(jnp.abs(again - masked))) <= 1e-5


def _layers(params):
  found = []

  def walk(node):
    if isinstance(node, dict):
      if "kernel" in node or "a" in node:
        found.append(node)
      else:
        for child in node.values():
          walk(child)

  walk(params)
  return found


def test_accounting_matches_a_hand_count():
  """The Linen block at keep counts: every layer's factorized weights (d_in + d_out) * keep + bias, by hand."""
  view, params, state = _build("block")
  positions = view.layer_positions(params, state, (5, 3))
  assert positions == {"embed": 5, "query": 5, "key": 5, "value": 5, "out": 5, "mlp1": 5, "mlp2": 5, "head": 1}
  keeps = {"embed": 2, "query": 3, "key": 8, "value": 1, "out": 4, "mlp1": 5, "mlp2": 6, "head": 2}
  dims = {"embed": (3, 8), "query": (8, 8), "key": (8, 8), "value": (8, 8), "out": (8, 8), "mlp1": (8, 16),
          "mlp2": (16, 8), "head": (8, 5)}
  report = accounting.count(params, keeps, positions)
  factorized = sum((i + o) * keeps[n] + o for n, (i, o) in dims.items())
  merged = sum((min((i + o) * keeps[n], i * o)) + o for n, (i, o) in dims.items())
  macs = sum(positions[n] * min((i + o) * keeps[n], i * o) for n, (i, o) in dims.items())
  assert report.params_factorized == factorized
  assert report.params_merged == merged
  assert report.macs_merged == macs
  assert report.layer("key").merged_as == "dense" and report.layer("value").merged_as == "factorized"


def test_linen_recalibration_is_exact_batch_statistics():
  """The two-run trick recovers each batch's mean and variance whatever the BatchNorm momentum."""
  view, params, state = _build("cnn")
  images = jax.random.normal(jax.random.key(9), (3, 4, 6, 6, 2))
  new = view.recalibrate(params, state, images)
  conv_out = jax.vmap(lambda x: mln.Conv(8, 3).apply({"params": params["conv"]}, x))(images)
  means = conv_out.mean(axis=(1, 2, 3))
  variances = conv_out.var(axis=(1, 2, 3))
  np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], means.mean(0), atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], variances.mean(0), atol=1e-5)


def test_nnx_model_without_train_keyword_runs_in_every_tool():
  view, params, state = _build("mlp")
  assert not view.accepts_train
  x, _ = _images("mlp", 2)
  out, _ = view.apply(params, state, x, {"fc1": 3}, train=True)
  assert out.shape == (2, NUM_CLASSES)
  assert view.layer_positions(params, state, (3, 4)) == {"fc1": 1, "fc2": 1}


def test_from_module_errors():
  with pytest.raises(ValueError, match="Linen module needs its variables"):
    functional.from_module(LinenCNN())
  with pytest.raises(TypeError, match="expected a flax.nnx.Module or a flax.linen.Module"):
    functional.from_module(object())
  view, params, state = _build("cnn")
  with pytest.raises(ValueError, match=r"unknown layers in keep counts \['nope'\]"):
    view.apply(params, state, _images("cnn", 1)[0], {"nope": 1})


def test_checked_mode_raises_on_out_of_range_keep_counts():
  """Unchecked, a keep count above capacity acts as full rank; checked, it is an error naming the layer."""
  view, params, state = _build("mlp")
  too_many = lambda key, ranks: {name: jnp.asarray(r, jnp.int32) + 5 for name, r in ranks.items()}
  optimizer = optax.sgd(0.0)
  x, y = _images("mlp", 4)
  batch = {"image": x, "label": y}
  plain = training.make_train_step(view, optimizer, sampler=too_many, donate=False)
  full = training.make_train_step(view, optimizer, sampler=mj.samplers.none(), donate=False)
  start = training.init_state(params, state, optimizer)
  _, over = plain(start, batch, jax.random.key(0))
  _, exact = full(start, batch, jax.random.key(0))
  assert float(over["task_loss"]) == float(exact["task_loss"])
  checked = training.make_train_step(view, optimizer, sampler=too_many, donate=False, check_keeps=True)
  with pytest.raises(Exception, match=r"layer 'fc1': keep count 17 is out of range 0\.\.12"):
    checked(start, batch, jax.random.key(0))
  _, fine = training.make_train_step(view, optimizer, sampler=mj.samplers.none(), donate=False,
                                     check_keeps=True)(start, batch, jax.random.key(0))
  assert float(fine["task_loss"]) == float(exact["task_loss"])
