"""Tests for exporting, merging, saving and rank quantization (maestro_jax/export.py)."""

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
from maestro_jax import accounting
from maestro_jax import export
from maestro_jax import models
from maestro_jax import training


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _max_diff(x, y):
  return float(jnp.max(jnp.abs(x - y)))


def _lenet():
  return models.LeNet5(10, image_shape=(16, 16, 1), init_method="random", rngs=nnx.Rngs(0))


def _mlp():
  return models.MLP(64, (24, 16), 10, init_method="random", rngs=nnx.Rngs(1))


# ranks mixing merged layers ((d_in + d_out) r >= d_in d_out) and factorized ones
CASES = {
    "mlp": (_mlp, (8, 8, 1), {"layers.0": 20, "layers.1": 5, "layers.2": 10}),
    "lenet5": (_lenet, (16, 16, 1), {"conv1": 6, "conv2": 5, "fc1": 10, "fc2": 40, "fc3": 7}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_model_equals_masked_model(case):
  build, image_shape, ranks = CASES[case]
  fm, params, state = training.FunctionalModel.from_module(build())
  x = _randn(2, (5,) + image_shape)
  masked, _ = fm.apply(params, state, x, {k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()})
  efm, eparams, estate = export.export_functional(fm, params, state, ranks)
  out, _ = efm.apply(eparams, estate, x)
  assert _max_diff(out, masked) <= 1e-5

  forms = export.layer_forms(eparams)
  for name, layer in mj.factorized_layers(params).items():
    d_in, d_out = math.prod(layer["a"].shape[:-1]), layer["b"].shape[-1]
    merged = (d_in + d_out) * ranks[name] >= d_in * d_out
    assert forms[name]["form"] == ("dense" if merged else "factorized")
    if not merged:
      assert forms[name]["rank"] == ranks[name]
  assert {f["form"] for f in forms.values()} == {"dense", "factorized"}  # both forms exercised

  # The exported tree is what accounting calls the merged (deployed) model.
  positions = accounting.layer_positions(build(), image_shape)
  want = accounting.count(params, ranks, positions)
  got = accounting.count(eparams, None, positions)
  assert (got.params_merged, got.macs_merged) == (want.params_merged, want.macs_merged)

  # The same NNX model object runs the exported params (export_module in place).
  module = export.export_module(build(), ranks)
  assert _max_diff(module(x), masked) <= 1e-5


def test_export_modes_and_errors():
  _, params, _ = training.FunctionalModel.from_module(_mlp())
  ranks = {"layers.0": 20, "layers.1": 5, "layers.2": 10}
  forms_all = export.layer_forms(export.export(params, ranks, merge="all"))
  assert all(f["form"] == "dense" for f in forms_all.values())
  forms_none = export.layer_forms(export.export(params, ranks, merge="none"))
  assert [f["rank"] for f in forms_none.values()] == [20, 5, 10]
  forced = export.layer_forms(export.export(params, ranks, dense=["layers.1"]))
  assert forced["layers.1"]["form"] == "dense"
  kernel = export.export(params, ranks, merge="all")["layers"][1]["kernel"]
  np.testing.assert_allclose(kernel, params["layers"][1]["a"][:, :5] @ params["layers"][1]["b"][:5], atol=1e-6)
  assert export.should_merge(10, 10, 5) and not export.should_merge(10, 10, 4)
  with pytest.raises(ValueError, match="unknown"):
    export.export(params, {"nope": 1})
  with pytest.raises(ValueError, match="capacity"):
    export.export(params, {"layers.0": 25})
  with pytest.raises(ValueError, match="merge"):
    export.export(params, ranks, merge="sometimes")
  with pytest.raises(ValueError, match="unknown"):
    export.export(params, ranks, dense=["nope"])


def test_save_and_load_roundtrip(tmp_path):
  fm, params, state = training.FunctionalModel.from_module(_mlp())
  ranks = {"layers.0": 20, "layers.1": 5, "layers.2": 10}
  efm, eparams, estate = export.export_functional(fm, params, state, ranks)
  path = export.save_exported(tmp_path / "m", eparams, estate, {"ranks": ranks, "accuracy": np.float32(0.5)})
  assert (path / "exported.json").exists()
  # Saving again over an existing export replaces it.
  export.save_exported(tmp_path / "m", eparams, estate, {"ranks": ranks, "accuracy": 0.5})
  lparams, lstate, report = export.load_exported(tmp_path / "m")
  assert report == {"ranks": ranks, "accuracy": 0.5}
  assert jax.tree.structure(lparams) == jax.tree.structure(eparams)  # int keys of nnx.List survive
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lparams, eparams)
  # A freshly built model of the same architecture takes the exported params.
  x = _randn(3, (4, 8, 8, 1))
  fresh = export.module_from_exported(models.MLP(64, (24, 16), 10, init_method="random", rngs=nnx.Rngs(9)), lparams,
                                      lstate)
  assert _max_diff(fresh(x), efm.apply(eparams, estate, x)[0]) == 0.0
  with pytest.raises(FileNotFoundError):
    export.load_exported(tmp_path / "missing")


class BNNet(nnx.Module):
  """conv -> BatchNorm -> relu -> mean pool -> linear."""

  def __init__(self, rngs):
    self.conv = mnnx.Conv(1, 6, 3, init_method="random", rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.fc = mnnx.Linear(6, 10, init_method="random", rngs=rngs)

  def __call__(self, x, *, train=False):
    h = jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))
    return self.fc(h.mean(axis=(1, 2)))


def test_save_and_load_with_batch_norm_state(tmp_path):
  fm, params, state = training.FunctionalModel.from_module(BNNet(nnx.Rngs(0)))
  state = jax.tree.map(lambda v: v + 0.25, state)
  ranks = {"conv": 2, "fc": 6}  # conv stays factorized, fc merges
  efm, eparams, estate = export.export_functional(fm, params, state, ranks)
  export.save_exported(tmp_path / "bn", eparams, estate)
  lparams, lstate, report = export.load_exported(tmp_path / "bn")
  assert report == {}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lstate, state)
  assert jax.tree.structure(lparams) == jax.tree.structure(eparams)
  x = _randn(5, (2, 6, 6, 1))
  fresh = export.module_from_exported(BNNet(nnx.Rngs(3)), lparams, lstate)
  masked, _ = fm.apply(params, state, x, {k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()})
  assert _max_diff(fresh(x), masked) <= 1e-5


def test_linen_model_runs_exported_params():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jax.nn.relu(mlinen.Dense(12, init_method="random")(x))
      return mlinen.Dense(6, init_method="random")(x)

  net = Net()
  x = _randn(4, (3, 16))
  variables = net.init(jax.random.key(0), x)
  ranks = {"Dense_0": 11, "Dense_1": 2}  # Dense_0 merges (28 * 11 >= 192), Dense_1 stays factorized
  masked = net.apply(mlinen.set_keep_counts(variables, ranks), x)
  exported = export.export(variables["params"], ranks)
  assert export.layer_forms(exported)["Dense_0"]["form"] == "dense"
  assert _max_diff(net.apply({"params": exported}, x), masked) <= 1e-5


def test_quantize_ranks():
  caps = {"a": 120, "b": 84, "c": 10, "d": 300}
  assert export.quantize_ranks({"a": 1, "b": 80, "c": 9, "d": 0}, 8, caps) == {"a": 8, "b": 80, "c": 10, "d": 0}
  assert export.quantize_ranks({"a": 8, "b": 81, "d": 129}, 8, caps) == {"a": 8, "b": 84, "d": 136}
  assert export.quantize_ranks({"a": 5, "d": 129}, 128, caps) == {"a": 120, "d": 256}
  assert export.quantize_ranks({"a": 7, "d": 299}, 1, caps) == {"a": 7, "d": 299}
  with pytest.raises(ValueError, match="quantum"):
    export.quantize_ranks({"a": 1}, 0, caps)
  with pytest.raises(ValueError, match="unknown"):
    export.quantize_ranks({"z": 1}, 8, caps)
  with pytest.raises(ValueError, match="capacity"):
    export.quantize_ranks({"c": 11}, 8, caps)


def test_measure_layer_times_structure():
  model = _lenet()
  ranks = {"conv2": 5, "fc1": 3, "fc2": 40}
  timings = export.measure_layer_times(model, (16, 16, 1), ranks, quantum=4, batch_size=2, max_candidates=2,
                                       repeats=2, warmup=1, layers=["conv2", "fc1", "fc2"])
  assert set(timings) == {"conv2", "fc1", "fc2"}
  caps = mnnx.capacities(model)
  for name, t in timings.items():
    assert t.requested == ranks[name]
    assert t.rank >= t.requested and t.rank in t.times
    assert all(r % 4 == 0 or r == caps[name] for r in t.times)
    assert all(v > 0 for v in t.times.values()) and t.dense_time > 0
    assert isinstance(t.dense, bool)
  assert timings["conv2"].input_shape == (2, 6, 6, 6) and timings["fc2"].input_shape == (2, 120)
  assert export.layer_inputs(model, (16, 16, 1))["fc1"] == (16,)
  with pytest.raises(ValueError, match="unknown"):
    export.measure_layer_times(model, (16, 16, 1), {"nope": 1})


def _timing(name, rank, factor_s, dense_s):
  return export.LayerTiming(name=name, requested=rank, rank=rank, dense=dense_s <= factor_s, times={rank: factor_s},
                            dense_time=dense_s, input_shape=(32,))


def test_dense_by_latency_merges_where_the_kernel_is_not_slower():
  model = _mlp()  # layers 64 -> 24 -> 16 -> 10
  ranks = {"layers.0": 4, "layers.1": 12, "layers.2": 3}
  # layers.0 is small as factors (size rule: keep) but timed slower; layers.1 is not smaller
  # ((24 + 16) * 12 >= 24 * 16, size rule: merge) but timed faster; layers.2 is small as factors
  # ((16 + 10) * 3 < 160) and timed 10% faster.
  table = {"layers.0": _timing("layers.0", 4, factor_s=2e-3, dense_s=1e-3),
           "layers.1": _timing("layers.1", 12, factor_s=1e-3, dense_s=2e-3),
           "layers.2": _timing("layers.2", 3, factor_s=1e-3, dense_s=1.1e-3)}
  assert not mj.should_merge(64, 24, 4) and mj.should_merge(24, 16, 12) and not mj.should_merge(16, 10, 3)
  assert export.dense_by_latency(model, None, ranks, timings=table) == ["layers.0"]
  # Times closer than the tolerance cannot be told apart: the size rule decides.
  assert export.dense_by_latency(model, None, ranks, timings=table, tolerance=0.2) == ["layers.0"]
  assert export.dense_by_latency(model, None, ranks, timings=table, tolerance=1.5) == ["layers.1"]
  table["layers.0"] = _timing("layers.0", 4, factor_s=1.02e-3, dense_s=1e-3)
  assert export.dense_by_latency(model, None, ranks, timings=table) == []
  # The list is what export() takes: those layers come out dense, the others factorized.
  forms = export.layer_forms(export.export(nnx.to_pure_dict(nnx.state(model, nnx.Param)), ranks, merge="none",
                                           dense=["layers.0"]))
  assert [forms[n]["form"] for n in ("layers.0", "layers.1", "layers.2")] == ["dense", "factorized", "factorized"]


@pytest.mark.parametrize("all_merged_faster", [True, False])
def test_dense_by_latency_merges_everything_when_the_whole_model_is_faster_so(all_merged_faster, monkeypatch):
  model = _mlp()
  ranks = {"layers.0": 4, "layers.1": 12, "layers.2": 3}
  table = {"layers.0": _timing("layers.0", 4, factor_s=1e-3, dense_s=2e-3),
           "layers.1": _timing("layers.1", 12, factor_s=1e-3, dense_s=2e-3),
           "layers.2": _timing("layers.2", 3, factor_s=1e-3, dense_s=2e-3)}
  timed = []

  def fake_time(fn, state, x, **kwargs):  # the whole model: 2% faster merged (or as factors), within tolerance
    timed.append(x.shape)
    merged = all("kernel" in layer for layer in nnx.to_pure_dict(state)["layers"].values())
    return 1e-3 if merged == all_merged_faster else 1.02e-3

  monkeypatch.setattr(export, "time_fn", fake_time)
  chosen = export.dense_by_latency(model, (64,), ranks, timings=table, batch_size=5, whole_model=True)
  assert chosen == (["layers.0", "layers.1", "layers.2"] if all_merged_faster else [])
  assert timed == [(5, 64)] * (2 + 2 * 10)  # a warm-up call each, then 10 alternated rounds
  assert export.dense_by_latency(model, (64,), ranks, timings=table) == []  # off by default


def test_dense_by_latency_falls_back_on_the_size_rule():
  model = _mlp()
  ranks = {"layers.0": 4, "layers.1": 12, "layers.2": 3}
  # No timing at all: the size rule, (d_in + d_out) r >= d_in d_out.
  assert export.dense_by_latency(model, None, ranks) == ["layers.1"]
  # A layer missing from the table, or timed at another rank, takes the size rule too.
  table = {"layers.0": _timing("layers.0", 8, factor_s=2e-3, dense_s=1e-3),
           "layers.2": _timing("layers.2", 3, factor_s=1e-3, dense_s=5e-3)}
  assert export.dense_by_latency(model, None, ranks, timings=table) == ["layers.1"]
  with pytest.raises(ValueError, match="unknown"):
    export.dense_by_latency(model, None, {"layers.9": 1})


def test_dense_by_latency_times_each_layer_at_its_export_rank(monkeypatch):
  model = _mlp()
  calls = []

  def fake_measure(model_, input_shape, ranks, **kwargs):
    calls.append((input_shape, dict(ranks), kwargs))
    return {name: _timing(name, rank, factor_s=1.0, dense_s=2.0 if name == "layers.1" else 0.5)
            for name, rank in ranks.items()}

  monkeypatch.setattr(export, "measure_layer_times", fake_measure)
  merged = export.dense_by_latency(model, (8, 8, 1), {"layers.0": 4}, batch_size=7)
  assert merged == ["layers.0", "layers.2"]
  (input_shape, ranks, kwargs), = calls
  assert input_shape == (8, 8, 1) and ranks == {"layers.0": 4, "layers.1": 16, "layers.2": 10}
  assert kwargs["quantum"] == 1 and kwargs["max_candidates"] == 1 and kwargs["batch_size"] == 7


def test_dense_by_latency_measures_on_this_backend():
  model = _mlp()
  merged = export.dense_by_latency(model, (8, 8, 1), {"layers.0": 4}, batch_size=4, repeats=1, warmup=1)
  assert set(merged) <= {"layers.0", "layers.1", "layers.2"}


def test_multi_axis_layers_are_timed_with_their_own_axes():
  """A LinearGeneral contracting two axes is timed as it runs (its factors' matrix view would not take the input)."""

  class Heads(nnx.Module):
    def __init__(self, rngs):
      self.out = mnnx.LinearGeneral((2, 3), (2, 4), axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
      return self.out(x)

  model = Heads(nnx.Rngs(0))
  assert export.layer_inputs(model, (5, 2, 3)) == {"out": (5, 2, 3)}
  (timing,) = export.measure_layer_times(model, (5, 2, 3), batch_size=2, max_candidates=1, repeats=1,
                                         warmup=1).values()
  assert timing.input_shape == (2, 5, 2, 3) and timing.rank == 6 and timing.dense_time > 0
  assert set(export.dense_by_latency(model, (5, 2, 3), batch_size=2, repeats=1, warmup=1)) <= {"out"}
