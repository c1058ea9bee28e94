"""The runner on several devices: sharded state (``shard_state``) trains like a replicated one, resumes on another
device count, and a bfloat16 compute dtype (``compute_dtype``) reaches the model.

The device tests run in a subprocess with 8 simulated CPU devices (``XLA_FLAGS`` must be set before JAX starts).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from maestro_train import config as config_lib
from maestro_train import train as train_lib

REPO = Path(__file__).resolve().parents[1]

# Digits MLP 64 -> 32 -> 10, 11 steps an epoch; the lasso shrinks layers.0 at the epochs' ends. A constant learning
# rate, so that a run resumed with more epochs follows the same trajectory as one planned with them.
_SCRIPT = """
import json, sys, dataclasses
import jax, numpy as np
sys.path.insert(0, {tests!r})
from maestro_jax import sharding, training
from maestro_train import train
from test_train import tiny_config

assert jax.device_count() == 8, jax.devices()
MIN = 256
config = lambda **c: tiny_config(batch_size=128, schedule="constant", shard_min_size=MIN, shrink_threshold=0.15,
                                 reslice_min_saving=0.0, **c)  # every shrink slices: the new shapes are re-sharded

# Record how the states each run's train step receives are placed: the first one and the first after each shrink.
runs = []
make = training.make_train_step
def recording_make(*args, **kwargs):
  step, seen = make(*args, **kwargs), []
  runs.append(seen)
  def wrapped(state, batch, key):
    shapes = jax.tree.map(lambda x: x.shape, state["params"])
    if not seen or seen[-1][0] != shapes:
      seen.append((shapes, [(x.shape, len(x.sharding.device_set), {{s.data.size for s in x.addressable_shards}})
                            for x in jax.tree.leaves(state)]))
    return step(state, batch, key)
  return wrapped
training.make_train_step = recording_make

one = train.train_and_evaluate(config(epochs=2, shard_state="off"), {work!r} + "/one", progress=False,
                               devices=jax.devices()[:1])
eight = train.train_and_evaluate(config(epochs=1), {work!r} + "/sharded", progress=False)  # 'auto': fsdp on 8
four = train.train_and_evaluate(config(epochs=2, shard_state="fsdp"), {work!r} + "/sharded", progress=False,
                                devices=jax.devices()[:4], allow_changes=True)  # resumed on 4 devices

large = 0
placed = [(leaves, 8) for _, leaves in runs[1]] + [(leaves, 4) for _, leaves in runs[2]]
assert eight["ranks"]["layers.0"][0] < 32, "the 8-device run should shrink at its epoch's end"
assert runs[2][0][0] != runs[1][0][0], "the resumed run should train the shrunk shapes"
for leaves, n in placed:
  for shape, devices, sizes in leaves:
    size = int(np.prod(shape))
    assert devices == n, (shape, devices)
    if sharding.partition_spec(shape, n, min_size=MIN) != jax.sharding.PartitionSpec():
      assert sizes == {{size // n}}, (shape, n, sizes)
      large += 1
    else:
      assert sizes == {{size}}, (shape, n, sizes)
assert large >= 6, large
a = train.load_run({work!r} + "/one", optimizer_state=True).state
b = train.load_run({work!r} + "/sharded", optimizer_state=True).state
assert int(a["step"]) == int(b["step"]) == 22
diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
           zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))
print(json.dumps({{"ranks": [one["ranks"], four["ranks"]], "eight_ranks": eight["ranks"], "max_param_diff": diff, "large": large,
                  "accuracy": [one["test_accuracy"], four["test_accuracy"]]}}))
"""


def test_sharded_run_equals_replicated_and_resumes_on_fewer_devices(tmp_path):
  """fsdp over 8 devices for an epoch (shrunk and re-sharded at its end), resumed over 4 for another, against 1."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  script = _SCRIPT.format(tests=str(REPO / "tests"), work=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "8 device(s), state sharded (fsdp), compute float32" in proc.stdout
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  one, four = result["ranks"]
  assert one == four and one["layers.0"][0] < 32  # the same shrinks, and there were some
  assert result["max_param_diff"] <= 1e-5, result
  assert result["accuracy"][0] == pytest.approx(result["accuracy"][1], abs=1e-3)


def test_shard_state_and_compute_dtype_options():
  config = config_lib.override(config_lib.load("digits_mlp"), ["shard_state=fsdp", "compute_dtype=bfloat16"])
  assert (config.shard_state, config.compute_dtype) == ("fsdp", "bfloat16")
  with pytest.raises(ValueError, match=r"shard_state='zero3' is not valid; choose one of auto, off, fsdp"):
    config_lib.override(config, ["shard_state=zero3"])
  # The CIFAR configs decide at run time: bfloat16 on an accelerator, float32 on this CPU.
  for name in ("cifar10_resnet18", "cifar10_vgg19"):
    cifar = config_lib.load(name)
    assert cifar.compute_dtype == "auto"
    assert train_lib.compute_dtype(cifar) == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  shards = train_lib.Shards.for_config(config, jax.devices()[:1])
  assert shards.fsdp and shards.size == 1
  assert not train_lib.Shards.for_config(dataclasses.replace(config, shard_state="auto"), jax.devices()[:1]).fsdp


def test_bfloat16_compute_reaches_the_model_and_keeps_float32_state(tmp_path):
  from test_train import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(epochs=1, compute_dtype="bfloat16")
  sources = train_lib.load_sources(config)
  view, params, model_state = train_lib.build_view(config, sources)
  logits, _ = view.apply(params, model_state, jnp.zeros((2, 8, 8, 1)))
  assert logits.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  summary = train_lib.train_and_evaluate(config, tmp_path, progress=False)
  assert summary["test_accuracy"] > 0.3  # it trains (chance is 0.1); tests/test_mixed_precision.py checks the curve
  state = train_lib.load_run(tmp_path, optimizer_state=True).state
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((state["params"], state["opt_state"]))
             if jnp.issubdtype(leaf.dtype, jnp.floating))



def test_initialize_distributed_reads_flags_then_environment(monkeypatch):
  """What ``maestro-train`` hands ``jax.distributed.initialize`` (tests/runner_multiprocess_check.py runs it for real)."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.config, "update", lambda *args: calls.append(args))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert not train_lib.initialize_distributed() and not calls  # one process: nothing is started
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert train_lib.initialize_distributed(process_id=2)  # a flag wins over its variable
  assert calls == [("jax_cpu_collectives_implementation", "gloo"),
                   {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]
