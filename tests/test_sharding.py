"""The sharding rule, and sharded training/checkpoints on 8 simulated devices (tests/sharding_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

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
