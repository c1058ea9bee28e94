"""Two JAX processes (jax.distributed, coordinator on 127.0.0.1, gloo CPU collectives) train like one process.

Usage: ``python multiprocess_check.py OUT_DIR PORT PROCESS_ID NUM_PROCESSES`` (tests/test_sharding.py
starts it). Each process has 2 CPU devices and feeds only its own half of every
global batch; the state is sharded over all 4 devices. The script trains 20
steps, saves with Orbax (which coordinates the processes), trains 10 more,
then restores the step-20 checkpoint, trains the same 10 steps again and
checks both continuations agree. Process 0 writes the final parameters to
``OUT_DIR/params_<NUM_PROCESSES>.npz`` for the test to compare across process counts.
"""

import os
import sys
from pathlib import Path

out_dir, port, process_id, num_processes = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id)

import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import maestro_jax as mj  # noqa: E402
from maestro_jax import data, functional, models, sharding, training  # noqa: E402

MIN_SIZE = 512
GLOBAL_BATCH = 16

mesh = sharding.data_mesh()  # every device of every process
model = models.MLP(64, (128, 64), 10, rngs=nnx.Rngs(0))
view, params, model_state = functional.from_module(model)
optimizer = optax.sgd(0.05, momentum=0.9)
step = training.make_train_step(view, optimizer, sampler=mj.samplers.independent(), lasso=1e-3, donate=False,
                                mesh=mesh, min_shard_size=MIN_SIZE)
rng = np.random.default_rng(0)
images = rng.normal(size=(30, GLOBAL_BATCH, 64)).astype(np.float32)
labels = rng.integers(0, 10, size=(30, GLOBAL_BATCH)).astype(np.int32)
index, count = data.process_shard(None, None)
share = GLOBAL_BATCH // count
batch_sharding = NamedSharding(mesh, PartitionSpec("data"))


def global_batch(i):
  """This process's contiguous share of global batch ``i``, assembled into one global array."""
  local = {"image": images[i, index * share:(index + 1) * share], "label": labels[i, index * share:(index + 1) * share]}
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def train(state, first, last):
  for i in range(first, last):
    state, _ = step(state, global_batch(i), jax.random.fold_in(jax.random.key(1), i))
  return state


def gathered(state):
  return jax.tree.map(np.asarray, jax.experimental.multihost_utils.process_allgather(state, tiled=True))


state = sharding.shard_state(training.init_state(params, model_state, optimizer), mesh, min_size=MIN_SIZE)
state = train(state, 0, 20)
checkpoints = ocp.CheckpointManager((out_dir / f"checkpoints_{num_processes}").absolute())
checkpoints.save(20, args=ocp.args.StandardSave(state))
checkpoints.wait_until_finished()
final = gathered(train(state, 20, 30))

target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
restored = checkpoints.restore(20, args=ocp.args.StandardRestore(target))
again = gathered(train(restored, 20, 30))
jax.tree.map(np.testing.assert_array_equal, again, final)
if process_id == 0:
  flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(final["params"])}
  np.savez(out_dir / f"params_{num_processes}.npz", **flat)
print(f"process {process_id}/{num_processes}: {jax.device_count()} devices, saved, resumed identically")
