"""Tests for vmapped rank sweeps and the greedy budget search (maestro_jax/sweep.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax as mj
import maestro_jax.nnx as mnnx
from maestro_jax import accounting
from maestro_jax import models
from maestro_jax import sweep
from maestro_jax import training


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


TRACES = [0]


@dataclasses.dataclass(frozen=True, eq=False)
class CountingModel(training.FunctionalModel):
  """Counts how often ``apply`` is traced (a Python side effect runs only while tracing under jit)."""

  def apply(self, *args, **kwargs):
    TRACES[0] += 1
    return super().apply(*args, **kwargs)


def _mlp(hidden=(24, 16), seed=0):
  model = models.MLP(64, hidden, 10, init_method="random", rngs=nnx.Rngs(seed))
  positions = accounting.layer_positions(model, (8, 8, 1))
  fm, params, state = CountingModel.from_module(model)
  return fm, params, state, positions


def _data(n=40, seed=1):
  return _randn(seed, (n, 8, 8, 1)), jnp.asarray(np.random.default_rng(seed).integers(0, 10, n), jnp.int32)


def _mlp_forward(params, x):
  """The MLP in float64 NumPy (fast: no per-shape compilation as with eager JAX at 32 different ranks)."""
  h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  layers = params["layers"]
  for i in range(len(layers)):
    layer = {k: np.asarray(v, np.float64) for k, v in layers[i].items()}
    h = (h @ layer["a"]) @ layer["b"] + layer["bias"].reshape(1, -1)
    if i < len(layers) - 1:
      h = np.maximum(h, 0.0)
  return h


def _sliced_metrics(fm, params, state, x, y, keeps, mask=None):
  """Loss and accuracy of one configuration with the factors *sliced* (not masked) to the keep counts."""
  sliced = mj.map_layers(lambda name, layer: mj.truncate_layer(layer, int(keeps[name])), params)
  if "layers" in params:
    logits = _mlp_forward(sliced, x)
  else:
    logits = np.asarray(fm.apply(sliced, state, x)[0], np.float64)
  y = np.asarray(y)
  w = np.ones(y.shape) if mask is None else np.asarray(mask, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  losses = -log_probs[np.arange(len(y)), y]
  correct = (np.argmax(logits, -1) == y).astype(np.float64)
  return float(np.sum(losses * w) / np.sum(w)), float(np.sum(correct * w) / np.sum(w))


def _random_keeps(params, k, seed):
  rng = np.random.default_rng(seed)
  return {name: rng.integers(0, cap + 1, k).astype(np.int32) for name, cap in mj.capacities(params).items()}


def _device(stacked):
  return {k: jnp.asarray(v) for k, v in stacked.items()}


def test_sweep_compiles_once_and_matches_sliced_models():
  fm, params, state, _ = _mlp()
  x, y = _data()
  fn = sweep.make_sweep(fm)
  TRACES[0] = 0
  first = _random_keeps(params, 16, 0)
  out = fn(params, state, x, y, None, _device(first))
  assert out["loss"].shape == (16,) and out["accuracy"].shape == (16,)
  second = _random_keeps(params, 16, 1)
  out2 = fn(params, state, x, y, None, _device(second))
  assert TRACES[0] == 1  # traced (and compiled) once for both calls
  for stacked, result in ((first, out), (second, out2)):
    for i, keeps in enumerate(sweep.unstack(stacked)):
      loss, acc = _sliced_metrics(fm, params, state, x, y, keeps)
      assert abs(float(result["loss"][i]) - loss) <= 1e-5
      assert abs(float(result["accuracy"][i]) - acc) <= 1e-5


def test_chunked_equals_unchunked():
  fm, params, state, _ = _mlp()
  x, y = _data()
  stacked = _device(_random_keeps(params, 16, 2))
  full = sweep.make_sweep(fm)(params, state, x, y, None, stacked)
  for chunk in (4, 5):  # 5 leaves a remainder
    chunked = sweep.make_sweep(fm, chunk_size=chunk)(params, state, x, y, None, stacked)
    for key in ("loss", "accuracy", "loss_sum", "correct"):
      np.testing.assert_allclose(np.asarray(chunked[key]), np.asarray(full[key]), atol=1e-5, rtol=1e-6)
  with pytest.raises(ValueError, match="chunk_size"):
    sweep.make_sweep(fm, chunk_size=0)


def test_host_sweep_accumulates_masked_batches():
  fm, params, state, _ = _mlp()
  x, y = _data(36)
  mask = np.ones(36, bool)
  mask[-6:] = False  # padding rows of a last partial batch
  batches = [{"image": x[i:i + 12], "label": y[i:i + 12], "mask": mask[i:i + 12]} for i in range(0, 36, 12)]
  stacked = _random_keeps(params, 5, 3)
  result = sweep.sweep(fm, params, state, batches, stacked, chunk_size=2)
  assert result["count"] == 30
  for i, keeps in enumerate(sweep.unstack(stacked)):
    loss, acc = _sliced_metrics(fm, params, state, x, y, keeps, mask)
    assert abs(result["loss"][i] - loss) <= 1e-5 and abs(result["accuracy"][i] - acc) <= 1e-5
  with pytest.raises(ValueError, match="out of range"):
    sweep.sweep(fm, params, state, batches, {"layers.0": np.asarray([25], np.int32)})
  with pytest.raises(ValueError, match="unknown"):
    sweep.sweep(fm, params, state, batches, {"nope": np.asarray([1], np.int32)})
  with pytest.raises(ValueError, match="no batches"):
    sweep.sweep(fm, params, state, [], stacked)


class BNNet(nnx.Module):
  """conv -> BatchNorm -> relu -> mean pool -> linear; small enough to recalibrate per configuration."""

  def __init__(self, rngs):
    self.conv = mnnx.Conv(1, 6, 3, padding="SAME", init_method="random", rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.fc = mnnx.Linear(6, 10, init_method="random", rngs=rngs)

  def __call__(self, x, *, train=False):
    h = jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))
    return self.fc(h.mean(axis=(1, 2)))


def test_sweep_recalibrates_batch_norm_per_configuration():
  fm, params, state = training.FunctionalModel.from_module(BNNet(nnx.Rngs(0)))
  x, y = _data(16)
  calib = _randn(5, (2, 8, 8, 8, 1))
  stacked = {"conv": np.asarray([1, 3, 6], np.int32), "fc": np.asarray([6, 2, 4], np.int32)}
  result = sweep.sweep(fm, params, state, [{"image": x, "label": y}], stacked, calibration_images=calib)
  plain = sweep.sweep(fm, params, state, [{"image": x, "label": y}], stacked)
  for i, keeps in enumerate(sweep.unstack(stacked)):
    own = fm.recalibrate(params, state, calib, {k: jnp.asarray(v, jnp.int32) for k, v in keeps.items()})
    loss, acc = _sliced_metrics(fm, params, own, x, y, keeps)
    assert abs(result["loss"][i] - loss) <= 1e-5 and abs(result["accuracy"][i] - acc) <= 1e-5
  assert not np.allclose(result["loss"], plain["loss"])  # the statistics did change


def test_generators():
  ranks = {"a": 10, "b": 3, "c": 0}
  grid = sweep.fraction_grid(ranks, [0.05, 0.5, 1.0])
  assert grid["a"].tolist() == [1, 5, 10] and grid["b"].tolist() == [1, 2, 3] and grid["c"].tolist() == [0, 0, 0]
  assert grid["a"].dtype == np.int32
  one = sweep.per_layer(ranks, "b", [0, 1, 2])
  assert one["b"].tolist() == [0, 1, 2] and one["a"].tolist() == [10, 10, 10]
  stacked = sweep.stack([{"a": 1, "b": 2}, {"a": 3, "b": 0}])
  assert stacked["a"].tolist() == [1, 3] and sweep.num_configs(stacked) == 2
  assert sweep.unstack(stacked) == [{"a": 1, "b": 2}, {"a": 3, "b": 0}]
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    sweep.fraction_grid(ranks, [0.0])
  with pytest.raises(ValueError, match="unknown"):
    sweep.per_layer(ranks, "zz", [1])
  with pytest.raises(ValueError, match="out of range"):
    sweep.per_layer(ranks, "b", [4])
  with pytest.raises(ValueError, match="name"):
    sweep.stack([{"a": 1}, {"b": 1}])

  _, params, _, _ = _mlp()
  caps = mj.capacities(params)
  ranks = dict(caps, **{"layers.0": 20})
  fractions = [0.1, 0.5, 1.0]
  stacked = sweep.global_budget(params, ranks, fractions)
  for i, p in enumerate(fractions):
    expected = mj.global_budget_keeps(params, p, ranks)
    assert {k: int(v[i]) for k, v in stacked.items()} == {k: int(v) for k, v in expected.items()}
  assert sum(int(v[-1]) for v in stacked.values()) == sum(ranks.values())


def test_costs_match_accounting():
  _, params, _, positions = _mlp()
  stacked = sweep.fraction_grid(mj.capacities(params), [0.25, 1.0])
  cost = sweep.costs(params, stacked, positions)
  for i, keeps in enumerate(sweep.unstack(stacked)):
    report = accounting.count(params, keeps, positions)
    assert cost["params"][i] == report.params_merged and cost["macs"][i] == report.macs_merged


# --------------------------------------------------------------------------------------------- greedy


def _brute_force_step(fm, params, state, x, y, current, positions, metric, step=1, min_rank=1):
  """Every single-layer cut, each evaluated on its own (sliced factors, accounting.count costs)."""
  index = {"macs": "macs_merged", "params": "params_merged"}[metric]
  base = getattr(accounting.count(params, current, positions), index)
  base_loss, _ = _sliced_metrics(fm, params, state, x, y, current)
  options = {}
  for name, rank in current.items():
    new = rank
    while new > min_rank:  # lower by whole steps until the cost actually drops
      new = max(new - step, min_rank)
      cost = getattr(accounting.count(params, dict(current, **{name: new}), positions), index)
      if cost < base:
        loss, _ = _sliced_metrics(fm, params, state, x, y, dict(current, **{name: new}))
        options[name] = (new, (loss - base_loss) / (base - cost))
        break
  return options


@pytest.mark.parametrize("metric,step", [("macs", 1), ("params", 3)])
def test_greedy_meets_budget_and_takes_the_argmin(metric, step):
  fm, params, state, positions = _mlp(hidden=(24, 16))
  x, y = _data(32)
  caps = mj.capacities(params)
  full = accounting.count(params, caps, positions)
  budget = int(0.6 * (full.macs_merged if metric == "macs" else full.params_merged))
  kw = {"budget_macs": budget} if metric == "macs" else {"budget_params": budget}
  result = sweep.greedy_search(fm, params, state, {"image": x, "label": y}, caps, positions, step=step, **kw)
  final = accounting.count(params, result.ranks, positions)
  assert (final.macs_merged if metric == "macs" else final.params_merged) <= budget
  values = [p[metric] for p in result.path]
  assert all(b < a for a, b in zip(values, values[1:])) and values[-1] <= budget < values[-2]
  assert result.path[0]["layer"] is None and result.path[0]["ranks"] == caps
  for before, after in zip(result.path, result.path[1:]):
    options = _brute_force_step(fm, params, state, x, y, before["ranks"], positions, metric, step=step)
    best = min(r for _, r in options.values())
    new, ratio = options[after["layer"]]
    assert after["rank"] == new
    assert ratio <= best + 1e-6  # the chosen cut is the argmin (up to float noise between equal ratios)
    assert abs(after["ratio"] - ratio) <= 1e-6


def test_greedy_stops_at_once_when_within_budget_and_errors():
  fm, params, state, positions = _mlp(hidden=(12,))
  x, y = _data(16)
  batch = {"image": x, "label": y}
  caps = mj.capacities(params)
  full = accounting.count(params, caps, positions)
  result = sweep.greedy_search(fm, params, state, batch, None, positions, budget_params=full.params_merged)
  assert len(result.path) == 1 and result.ranks == caps
  smallest = accounting.count(params, {k: 1 for k in caps}, positions).macs_merged
  with pytest.raises(ValueError, match=f"smallest model: {smallest:,} macs"):
    sweep.greedy_search(fm, params, state, batch, caps, positions, budget_macs=smallest - 1)
  exact = sweep.greedy_search(fm, params, state, batch, caps, positions, budget_macs=smallest)
  assert exact.ranks == {k: 1 for k in caps}
  with pytest.raises(ValueError, match="unknown"):
    sweep.greedy_search(fm, params, state, batch, {"nope": 1}, positions, budget_macs=smallest)
  with pytest.raises(ValueError, match="capacity"):
    sweep.greedy_search(fm, params, state, batch, {"layers.0": 99}, positions, budget_macs=smallest)
  with pytest.raises(ValueError, match="exactly one"):
    sweep.greedy_search(fm, params, state, batch, caps, positions)
  with pytest.raises(ValueError, match="exactly one"):
    sweep.greedy_search(fm, params, state, batch, caps, positions, budget_macs=1, budget_params=1)
  with pytest.raises(ValueError, match="positions"):
    sweep.greedy_search(fm, params, state, batch, caps, None, budget_macs=smallest)
  with pytest.raises(ValueError, match="step"):
    sweep.greedy_search(fm, params, state, batch, caps, positions, budget_macs=smallest, step=0)
