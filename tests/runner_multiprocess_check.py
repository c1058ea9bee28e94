"""``maestro-train`` as two processes trains, saves and resumes like one process.

Usage: ``python tests/runner_multiprocess_check.py`` (about a minute on 2 CPU cores; too slow for the suite, which
checks the flag handling in tests/test_runner_sharding.py). Two processes with one CPU device each start JAX's
multi-controller runtime (a coordinator on 127.0.0.1, gloo collectives): process 0 from ``--coordinator``,
``--num-processes`` and ``--process-id``, process 1 from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``. They train one epoch of the digits MLP with the state sharded over both (fsdp), then are started
again for a second epoch (``--allow-changes``), resuming from the checkpoint both wrote. The result must equal one
process training both epochs (parameters within 1e-5, the same ranks), and only process 0 may report.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from maestro_train import config as config_lib
from maestro_train import train as train_lib

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The tiny run of test_train.tiny_config as command-line overrides, at a constant learning rate (a resume with more
# epochs then follows the one-process trajectory), every shrink slicing the state (reslice_min_saving=0, so the new
# shapes are re-sharded) and arrays of 256+ elements sharded.
_OVERRIDES = ["model_kwargs={'hidden': (32,)}", "batch_size=64", "learning_rate=0.1", "lasso=1e-2",
              "shrink_threshold=5e-2", "rank_quantum=1", "checkpoint_every_steps=5", "log_every_steps=5",
              "eval_batch_size=128", "schedule=constant", "shard_min_size=256", "reslice_min_saving=0.0"]


def _two_processes(workdir: Path, epochs: int, *extra: str) -> list[str]:
  """``maestro-train`` as 2 processes with one CPU device each: process 0 told by flags, process 1 by variables."""
  port = _free_port()
  command = [sys.executable, "-m", "maestro_train", "digits_mlp", *_OVERRIDES, f"epochs={epochs}",
             "--workdir", str(workdir), "--no-progress", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(command + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                       "--process-id", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True),
           subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID="1"))]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def main(tmp_path: Path) -> None:
  """jax.distributed on 127.0.0.1 (gloo): an epoch, a resumed second one, against one process for both."""
  first = _two_processes(tmp_path / "two", 1)
  assert "2 device(s) in 2 processes, state sharded (fsdp)" in first[0] and "epoch 1:" in first[0]
  assert "epoch 1:" not in first[1]  # only process 0 reports
  second = _two_processes(tmp_path / "two", 2, "--allow-changes")
  assert "resumed from step 22" in second[0] and "epoch 2:" in second[0]

  config = config_lib.override(config_lib.load("digits_mlp"), _OVERRIDES + ["epochs=2"])
  one = train_lib.train_and_evaluate(config, tmp_path / "one", progress=False)
  two = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert two["ranks"] == one["ranks"] and two["ranks"]["layers.0"][0] < 32
  records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  a = train_lib.load_run(tmp_path / "one").state["params"]
  b = train_lib.load_run(tmp_path / "two").state["params"]  # written by 2 processes, read by 1
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)
  diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  print(f"two processes, resumed: ranks {two['ranks']}, largest parameter difference to one process {diff:.2e}")
  print("ok")


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as folder:
    main(Path(folder))
