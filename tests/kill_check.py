"""SIGKILL a short run at random points, resume each, and compare with an uninterrupted run (not a pytest file).

Usage: ``python tests/kill_check.py [--points 20] [--seed 0] [--workdir DIR]``

Each point starts the tiny test config (2 epochs of 22 steps, a checkpoint every
5 steps, shrinking) in a subprocess that SIGKILLs itself a random delay (0-60 ms)
after a random train step, so kills land in steps, saves, evaluation and
records alike. The killed workdir is then resumed with the plain ``maestro-train``
command line, and its final parameters, model state and ranks must be
bit-identical to the reference run's, and its ``metrics.jsonl`` the same records
(every field but the timing). Prints one row per point and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["model_kwargs={'hidden': (32,)}", "epochs=2", "batch_size=64", "learning_rate=0.1", "lasso=1e-2",
             "shrink_threshold=5e-2", "rank_quantum=1", "checkpoint_every_steps=5", "log_every_steps=5",
             "eval_batch_size=128"]
TOTAL_STEPS = 44

_KILLER = """
import os, random, signal, sys, threading
from maestro_jax import training
from maestro_train import main
kill_after, delay = int(sys.argv[1]), float(sys.argv[2])
make = training.make_train_step
def killing_make(*args, **kwargs):
  step = make(*args, **kwargs)
  calls = [0]
  def wrapped(state, batch, key):
    calls[0] += 1
    if calls[0] == kill_after:
      threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    return step(state, batch, key)
  return wrapped
training.make_train_step = killing_make
main.cli(sys.argv[3:])
"""


def _train(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "maestro_train", *OVERRIDES, "--no-progress", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _records(workdir: Path) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in lines]


def _final_state(workdir: Path):
  from maestro_train import train

  state = train.load_run(workdir).state
  return {k: state[k] for k in ("params", "model_state", "ranks", "step")}


def _same(a, b) -> bool:
  import jax
  import numpy as np

  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", help="where to run (default: a temporary folder, removed after)")
  args = parser.parse_args()
  root = Path(args.workdir or tempfile.mkdtemp(prefix="kill_check_"))
  rng = random.Random(args.seed)

  reference = root / "reference"
  proc = _train(["--workdir", str(reference)])
  if proc.returncode:
    print(proc.stderr[-3000:])
    return 1
  ref_state, ref_records = _final_state(reference), _records(reference)

  print(f"{'point':>5}  {'kill after step':>15}  {'delay ms':>8}  {'killed':>6}  {'resumed from':>12}  "
        f"{'warnings':>8}  {'identical':>9}")
  failures = 0
  for point in range(args.points):
    workdir = root / f"point_{point:02d}"
    kill_after, delay = rng.randint(1, TOTAL_STEPS), rng.uniform(0.0, 0.06)
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(kill_after), str(delay), *OVERRIDES,
                             "--no-progress", "--workdir", str(workdir)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    was_killed = killed.returncode == -signal.SIGKILL
    resumed = _train(["--workdir", str(workdir)])
    start = next((line.split()[3] for line in resumed.stdout.splitlines() if line.startswith("resumed from step")),
                 "0")
    warnings = sum(line.startswith("warning:") for line in resumed.stderr.splitlines())
    ok = resumed.returncode == 0 and _records(workdir) == ref_records and _same(_final_state(workdir), ref_state)
    failures += not ok
    print(f"{point:>5}  {kill_after:>15}  {1e3 * delay:>8.1f}  {'yes' if was_killed else 'no':>6}  {start:>12}  "
          f"{warnings:>8}  {'yes' if ok else 'NO':>9}", flush=True)
    if not ok:
      print(resumed.stderr[-2000:])
  print(f"{args.points - failures}/{args.points} resumed runs bit-identical to the uninterrupted run")
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
