"""Parameter and MAC counts against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax.nnx as mnnx
from maestro_jax import accounting
from maestro_jax import models


# LeNet-5 on 28x28 (the Maestro MNIST model): conv1 5x5 1->6 gives 24x24, pool 12x12, conv2 5x5 6->16 gives
# 8x8, pool 4x4, so fc1 has 16 * 4 * 4 = 256 inputs.
LENET_POSITIONS = {"conv1": 24 * 24, "conv2": 8 * 8, "fc1": 1, "fc2": 1, "fc3": 1}
LENET_DENSE_PARAMS = {"conv1": 25 * 6 + 6, "conv2": 150 * 16 + 16, "fc1": 256 * 120 + 120, "fc2": 120 * 84 + 84,
                      "fc3": 84 * 10 + 10}
LENET_DENSE_MACS = {"conv1": 86_400, "conv2": 153_600, "fc1": 30_720, "fc2": 10_080, "fc3": 840}
# At full rank r = min(d_in, d_out): (d_in + d_out) * r weights.
LENET_FACT_PARAMS = {"conv1": (25 + 6) * 6 + 6, "conv2": (150 + 16) * 16 + 16, "fc1": (256 + 120) * 120 + 120,
                     "fc2": (120 + 84) * 84 + 84, "fc3": (84 + 10) * 10 + 10}
LENET_FACT_MACS = {"conv1": 576 * (25 * 6 + 6 * 6), "conv2": 64 * (150 * 16 + 16 * 16), "fc1": 256 * 120 + 120 * 120,
                   "fc2": 120 * 84 + 84 * 84, "fc3": 84 * 10 + 10 * 10}


@pytest.fixture(scope="module")
def lenet():
  return models.LeNet5(init_method="random", rngs=nnx.Rngs(0))


def test_lenet5_positions(lenet):
  assert accounting.layer_positions(lenet, (28, 28, 1)) == LENET_POSITIONS
  dense = models.LeNet5(factorized=False, rngs=nnx.Rngs(0))
  assert accounting.layer_positions(dense, (28, 28, 1)) == LENET_POSITIONS
  # The model itself is untouched (no recording subclass leaks out of the trace).
  assert type(lenet.conv1) is mnnx.Conv and type(dense.fc1) is nnx.Linear


def test_lenet5_full_rank(lenet):
  report = accounting.count(lenet, positions=LENET_POSITIONS)
  assert [l.name for l in report.layers] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
  for l in report.layers:
    assert l.factorized and l.keep == l.capacity == min(l.d_in, l.d_out)
    assert l.params_dense == LENET_DENSE_PARAMS[l.name]
    assert l.macs_dense == LENET_DENSE_MACS[l.name]
    assert l.params_factorized == LENET_FACT_PARAMS[l.name]
    assert l.macs_factorized == LENET_FACT_MACS[l.name]
    # At full rank the factors are never smaller than the kernel: every layer deploys dense.
    assert l.merged_as == "dense"
    assert (l.params_merged, l.macs_merged) == (l.params_dense, l.macs_dense)
  conv1 = report.layer("conv1")
  assert (conv1.kind, conv1.kernel_shape, conv1.d_in, conv1.d_out, conv1.bias) == ("conv", (5, 5, 1, 6), 25, 6, 6)
  assert report.other_params == 0
  assert report.params_dense == 44_426
  assert report.macs_dense == 281_640
  assert report.params_factorized == 66_274
  assert report.macs_factorized == 340_316
  assert report.params_merged == 44_426 and report.macs_merged == 281_640
  # The factorized total is the model's actual parameter count.
  assert report.params_factorized == sum(x.size for x in jax.tree.leaves(nnx.state(lenet, nnx.Param)))


def test_lenet5_dense_baseline():
  dense = models.LeNet5(factorized=False, rngs=nnx.Rngs(0))
  report = accounting.count(dense, positions=LENET_POSITIONS)
  assert all(not l.factorized and l.keep is None for l in report.layers)
  assert report.params_dense == report.params_factorized == report.params_merged == 44_426
  assert report.macs_dense == report.macs_factorized == report.macs_merged == 281_640
  # On 32x32 inputs the flattened size is 16 * 5 * 5 = 400: the classic 61,706-parameter LeNet-5.
  classic = models.LeNet5(image_shape=(32, 32, 1), factorized=False, rngs=nnx.Rngs(0))
  positions = accounting.layer_positions(classic, (32, 32, 1))
  assert positions == {"conv1": 28 * 28, "conv2": 10 * 10, "fc1": 1, "fc2": 1, "fc3": 1}
  report = accounting.count(classic, positions=positions)
  assert report.params_dense == 61_706
  assert report.macs_dense == 28 * 28 * 150 + 10 * 10 * 2400 + 400 * 120 + 120 * 84 + 84 * 10


def test_lenet5_partial_keeps(lenet):
  report = accounting.count(lenet, {"conv2": 3, "fc1": 10}, LENET_POSITIONS)
  conv2, fc1 = report.layer("conv2"), report.layer("fc1")
  assert (conv2.keep, conv2.capacity) == (3, 16)
  assert conv2.params_factorized == (150 + 16) * 3 + 16 == 514
  assert conv2.macs_factorized == 64 * (150 * 3 + 3 * 16) == 31_872
  assert fc1.params_factorized == (256 + 120) * 10 + 120 == 3_880
  assert fc1.macs_factorized == 3_760
  assert conv2.merged_as == fc1.merged_as == "factorized"
  assert (fc1.params_merged, fc1.macs_merged) == (3_880, 3_760)
  # Unnamed layers stay at full rank, merged as dense.
  assert report.layer("fc2").merged_as == "dense"
  assert report.params_merged == 156 + 514 + 3_880 + 10_164 + 850
  assert report.macs_merged == 86_400 + 31_872 + 3_760 + 10_080 + 840
  # A model's own (concrete) keep counts can be passed straight in.
  mnnx.set_keep_counts(lenet, {"fc1": 10})
  assert accounting.count(lenet, mnnx.keep_counts(lenet)).layer("fc1").params_factorized == 3_880
  mnnx.set_keep_counts(lenet, {"fc1": 120})


def _mlp_params(d_in, hidden, d_out, factorized=True):
  return nnx.to_pure_dict(nnx.state(models.MLP(d_in, hidden, d_out, factorized=factorized, init_method="random",
                                               rngs=nnx.Rngs(0)), nnx.Param))


def test_mlp_from_a_pure_dict():
  params = _mlp_params(12, [8], 3)
  report = accounting.count(params)  # no positions: MACs are None
  l0, l1 = report.layers
  assert (l0.name, l0.d_in, l0.d_out, l0.capacity) == ("layers.0", 12, 8, 8)
  assert (l0.params_dense, l0.params_factorized) == (12 * 8 + 8, (12 + 8) * 8 + 8)
  assert (l1.params_dense, l1.params_factorized) == (8 * 3 + 3, (8 + 3) * 3 + 3)
  assert report.params_dense == 104 + 27 and report.params_factorized == 168 + 36
  assert report.macs_dense is None and l0.macs_dense is None
  positions = {"layers.0": 1, "layers.1": 1}
  report = accounting.count(params, {"layers.0": 2, "layers.1": 0}, positions)
  l0, l1 = report.layers
  assert (l0.params_factorized, l0.macs_factorized, l0.merged_as) == (40 + 8, 40, "factorized")
  assert (l1.params_factorized, l1.macs_factorized) == (3, 0)  # keep 0: only the bias
  assert report.totals == {"params_dense": 131, "params_factorized": 51, "params_merged": 51,
                           "macs_dense": 96 + 24, "macs_factorized": 40, "macs_merged": 40}


def test_merge_rule_boundary():
  params = _mlp_params(8, [8], 4)
  # (8 + 8) * k >= 8 * 8 from k = 4: a square layer at half rank already deploys as a dense kernel.
  assert accounting.count(params, {"layers.0": 4}).layer("layers.0").merged_as == "dense"
  below = accounting.count(params, {"layers.0": 3}).layer("layers.0")
  assert below.merged_as == "factorized" and below.params_merged == 48 + 8


def test_positions_of_sequences_and_plain_layers():
  model = models.TransformerEncoder(3, vocab_size=20, d_model=8, num_heads=2, num_layers=1, mlp_dim=16, max_len=10,
                                    init_method="random", rngs=nnx.Rngs(0))
  positions = accounting.layer_positions(model, (7,), dtype=jnp.int32)
  assert positions["head"] == 1
  assert all(positions[n] == 7 for n in mnnx.capacities(model) if n != "head")
  report = accounting.count(model, {"blocks.0.fc1": 2}, positions)
  fc1 = report.layer("blocks.0.fc1")
  assert fc1.macs_factorized == 7 * (8 * 2 + 2 * 16) and fc1.macs_dense == 7 * 8 * 16
  # Non-factorized parameters: embedding, positions, three LayerNorms (scale and bias).
  assert report.other_params == 20 * 8 + 10 * 8 + 3 * 2 * 8
  assert report.params_factorized == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - (
      (8 + 16) * 8 - (8 + 16) * 2)

  # The dense twin: nnx.MultiHeadAttention's LinearGeneral projections count as plain layers.
  dense = models.TransformerEncoder(3, vocab_size=20, d_model=8, num_heads=2, num_layers=1, mlp_dim=16,
                                    max_len=10, factorized=False, rngs=nnx.Rngs(0))
  dense_positions = accounting.layer_positions(dense, (7,), dtype=jnp.int32)
  assert dense_positions == positions
  dense_report = accounting.count(dense, positions=dense_positions)
  query = dense_report.layer("blocks.0.attn.query")
  assert (query.factorized, query.kernel_shape, query.d_in, query.d_out) == (False, (8, 2, 4), 8, 8)
  assert dense_report.params_dense == report.params_dense
  assert dense_report.params_dense == sum(x.size for x in jax.tree.leaves(nnx.state(dense, nnx.Param)))
  assert dense_report.macs_dense == report.macs_dense


def test_norm_parameters_are_counted():
  model = models.ResNet18(3, width=2, init_method="random", rngs=nnx.Rngs(0))
  report = accounting.count(model)
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert report.params_factorized == total
  bn_channels = 2 * (1 + 4) + sum(2 * c * 2 + c for c in (4, 8, 16))  # stem + layer1, then 2 blocks + shortcut
  assert report.other_params == 2 * bn_channels  # scale and bias
  assert all(l.bias == 0 for l in report.layers if l.name != "fc")
  dense = models.ResNet18(3, width=2, factorized=False, rngs=nnx.Rngs(0))
  assert report.params_dense == sum(x.size for x in jax.tree.leaves(nnx.state(dense, nnx.Param)))
  positions = accounting.layer_positions(model, (8, 8, 3))
  assert positions["conv1"] == 64 and positions["layer2.0.conv1"] == 16 and positions["layer2.0.shortcut"] == 16
  assert positions["layer4.1.conv2"] == 1 and positions["fc"] == 1


def test_errors(lenet):
  with pytest.raises(ValueError, match="unknown layers in keep counts"):
    accounting.count(lenet, {"fc9": 1})
  with pytest.raises(ValueError, match="out of range"):
    accounting.count(lenet, {"fc3": 11})
  with pytest.raises(ValueError, match=r"positions lack layers \['fc3'\]"):
    accounting.count(lenet, positions={k: v for k, v in LENET_POSITIONS.items() if k != "fc3"})
  dense = _mlp_params(4, [], 2, factorized=False)
  with pytest.raises(ValueError, match="unknown layers in keep counts"):
    accounting.count(dense, {"layers.0": 1})  # plain layers have no keep count


def test_format_table(lenet):
  report = accounting.count(lenet, {"fc1": 10}, LENET_POSITIONS)
  table = accounting.format_table(report)
  assert "fc1" in table and "10/120" in table and "281,640" in table and "44,426" in table
  assert len(table.splitlines()) == 2 + 5 + 1 + 2 + 1
  as_dict = report.to_dict()
  assert as_dict["totals"]["macs_dense"] == 281_640 and as_dict["layers"][2]["keep"] == 10
  np.testing.assert_equal(as_dict["totals"], report.totals)


def test_one_recorder_serves_positions_and_inputs():
  """Positions (accounting) and input shapes (export) come from the same recorder: a tied layer called twice
  sums its positions and reports its first input; the caller's model keeps its classes."""
  from maestro_jax import export
  from maestro_jax._src import recording

  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.fc = mnnx.Linear(4, 4, rngs=rngs)
      self.again = self.fc  # the same layer reached by two paths: one layer, two calls
      self.out = mnnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(self.again(self.fc(x)).mean(axis=1))

  model = Tied(nnx.Rngs(0))
  tied = next(name for name in mnnx.capacities(model) if name != "out")  # Flax names a shared layer by one path
  assert accounting.layer_positions(model, (3, 4)) == {tied: 6, "out": 1}
  assert export.layer_inputs(model, (3, 4)) == {tied: (3, 4), "out": (4,)}
  assert type(model.fc) is mnnx.Linear and type(model.out) is mnnx.Linear

  # Nested recordings each see only their own layers, each call once (also a layer watched by both, or named
  # twice); classes come back after each block.
  with recording.recording({"fc": model.fc}, lambda layer, x, out: "outer") as outer:
    with recording.recording({"out": model.out, "fc": model.fc, "tied": model.fc},
                             lambda layer, x, out: x.shape) as inner:
      model(jnp.ones((1, 3, 4)))
    assert type(model.out) is mnnx.Linear and type(model.fc) is not mnnx.Linear
  assert outer == {"fc": ["outer", "outer"]}
  assert inner == {"out": [(1, 4)], "fc": [(1, 3, 4)] * 2, "tied": [(1, 3, 4)] * 2}
  assert type(model.fc) is mnnx.Linear
