"""The sharding rule, and sharded training/checkpoints on 8 simulated devices (tests/sharding_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from jax.sharding import PartitionSpec

from maestro_jax import sharding

REPO = Path(__file__).resolve().parents[1]


def test_partition_spec_rule():
  spec = lambda shape, n=8, min_size=16: sharding.partition_spec(shape, n, min_size=min_size)
  assert spec((64, 32)) == PartitionSpec("data", None)     # A (d_in, r): the larger d_in
  assert spec((32, 64)) == PartitionSpec(None, "data")     # B (r, d_out): the larger d_out
  assert spec((48, 48)) == PartitionSpec("data", None)     # a tie goes to the earlier axis
  assert spec((5, 5, 1, 6), min_size=1) == PartitionSpec()  # no axis divisible by 8: replicated
  assert spec((60, 16)) == PartitionSpec(None, "data")     # the largest *divisible* axis
  assert spec((8,), min_size=16) == PartitionSpec()        # small: replicated
  assert spec(()) == PartitionSpec()                       # scalars: replicated
  assert spec((64, 32), n=1) == PartitionSpec()            # one device: nothing to split


def test_sharded_training_and_checkpoints_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_check.py")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "sharded equals replicated" in proc.stdout
  assert "restored onto 4 device(s) and continued identically" in proc.stdout


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  """jax.distributed with a coordinator on 127.0.0.1: two processes, each feeding its half of every batch."""
  script = str(REPO / "tests" / "multiprocess_check.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, script, str(tmp_path), str(port), str(i), "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
    assert "4 devices, saved, resumed identically" in out
  single = subprocess.run([sys.executable, script, str(tmp_path), "0", "0", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stdout + single.stderr
  one, two = np.load(tmp_path / "params_1.npz"), np.load(tmp_path / "params_2.npz")
  assert sorted(one.files) == sorted(two.files) and one.files
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)
