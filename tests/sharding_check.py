"""Sharded (FSDP-style) training equals replicated training; sharded checkpoints restore onto other device counts.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py does).
Trains a small factorized MLP for 50 steps with a shrink after step 25, once on
one device and once with parameters and optimizer state sharded over 8; then
saves the sharded state with Orbax, restores it onto 1 and onto 4 devices and
continues 5 steps on each, against continuing on 8.
"""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import maestro_jax as mj
from maestro_jax import functional, models, sharding, training

MIN_SIZE = 512  # small enough that this test's larger factors are sharded
assert jax.device_count() == 8, jax.devices()

model = models.MLP(64, (128, 64), 10, rngs=nnx.Rngs(0))
view, params, model_state = functional.from_module(model)
optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
steps = {}


def step(state, batch, key):
  """The library's train step keeping the state sharded over the batch's mesh."""
  mesh = batch["image"].sharding.mesh
  if mesh not in steps:
    steps[mesh] = training.make_train_step(view, optimizer, sampler=mj.samplers.independent(), lasso=1e-3,
                                           donate=False, mesh=mesh, min_shard_size=MIN_SIZE)
  return steps[mesh](state, batch, key)

x = jax.random.normal(jax.random.key(1), (16, 64))
y = jax.random.randint(jax.random.key(2), (16,), 0, 10)


def run(mesh, state, first, last):
  """Steps ``first..last-1`` on ``mesh``, shrinking after step 25; batches split over the mesh."""
  batch = jax.device_put({"image": x, "label": y}, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  for i in range(first, last):
    state, _ = step(state, batch, jax.random.fold_in(jax.random.key(3), i))
    if i == 24:
      host = jax.device_get(state)
      ranks = {name: max(1, cap - 5) for name, cap in mj.capacities(host["params"]).items()}
      p, o, _ = mj.shrink(host["params"], ranks, opt_state=host["opt_state"], optimizer=optimizer)
      host = {**host, "params": p, "opt_state": o, "ranks": {k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()}}
      state = sharding.shard_state(host, mesh, min_size=MIN_SIZE)
  return state


one, eight = sharding.data_mesh(jax.devices()[:1]), sharding.data_mesh()
start = training.init_state(params, model_state, optimizer)
replicated = run(one, sharding.shard_state(start, one, min_size=MIN_SIZE), 0, 50)
sharded = run(eight, sharding.shard_state(start, eight, min_size=MIN_SIZE), 0, 50)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), jax.device_get(replicated),
             jax.device_get(sharded))
print("50 steps with a shrink: sharded equals replicated")

# Every large array is split into 8 equal parts, one per device; small ones are replicated.
large = 0
for leaf in jax.tree.leaves(sharded):
  shard_sizes = {s.data.size for s in leaf.addressable_shards}
  if leaf.size >= MIN_SIZE and sharding.partition_spec(leaf.shape, 8, min_size=MIN_SIZE) != jax.sharding.PartitionSpec():
    assert shard_sizes == {leaf.size // 8}, (leaf.shape, shard_sizes)
    large += 1
  else:
    assert shard_sizes == {leaf.size}, (leaf.shape, shard_sizes)
assert large >= 4, large  # the big factors and their momenta
print(f"{large} arrays hold 1/8 per device")

with tempfile.TemporaryDirectory() as tmp:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(Path(tmp) / "state", sharded)
  checkpointer.wait_until_finished()
  expected = jax.device_get(run(eight, sharded, 50, 55))
  for n in (1, 4):
    mesh = sharding.data_mesh(jax.devices()[:n])
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sharded,
                          sharding.state_shardings(sharded, mesh, min_size=MIN_SIZE))
    restored = checkpointer.restore(Path(tmp) / "state", target)
    assert {d for leaf in jax.tree.leaves(restored) for d in leaf.sharding.device_set} == set(jax.devices()[:n])
    continued = jax.device_get(run(mesh, restored, 50, 55))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), continued, expected)
    print(f"restored onto {n} device(s) and continued identically")
print("ok")
