"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_train.py).

Checks that one train step sharded over 8 devices gives the same loss and
update as on one device, and that Orbax saves and restores the sharded state.
"""

import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).parent))
import maestro_jax  # noqa: E402
from maestro_jax import data, training  # noqa: E402
from test_train import tiny_config  # noqa: E402
from maestro_train import train  # noqa: E402

print("devices:", jax.device_count())
config = tiny_config()
source, _ = train.load_data(config)
model = train.build_model(config, source)
fmodel, params, model_state = training.FunctionalModel.from_module(model)
optimizer = train.make_optimizer(config, 100)
batch = next(data.batches(source, config.batch_size, seed=0, epoch=0))
key = jax.random.key(3)

results = {}
for n in (1, 8):
  shards = train.Shards(jax.devices()[:n])
  state = shards.put_state(training.init_state(params, model_state, optimizer))
  step = training.make_train_step(fmodel, optimizer, sampler=maestro_jax.samplers.single_layer(), lasso=config.lasso,
                                  donate=False)  # the same initial params serve both runs
  new_state, metrics = step(state, shards.put_batch(batch), key)
  results[n] = (jax.device_get(new_state["params"]), float(metrics["loss"]))
  if n == 8:
    leaf = new_state["params"]["layers"][0]["a"]
    assert len(leaf.sharding.device_set) == 8, leaf.sharding
    sharded_state = new_state

np.testing.assert_allclose(results[1][1], results[8][1], rtol=1e-5)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[1][0], results[8][0])
print("sharded step matches one device: loss", results[8][1])

with tempfile.TemporaryDirectory() as tmp:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(Path(tmp) / "state", sharded_state)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, sharded_state)
  restored = checkpointer.restore(Path(tmp) / "state", abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(sharded_state))
  assert restored["params"]["layers"][0]["a"].sharding == sharded_state["params"]["layers"][0]["a"].sharding
print("restored sharded state with its shardings")
