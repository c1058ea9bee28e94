"""The accelerator check runs end to end in its CPU smoke form and writes its report (figures are not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "device_tests", "train_step_vs_dense", "rank_quanta", "sweep_vs_loop", "lenet_end_to_end",
            "peak_memory")


def test_device_check_small(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "--device", "--small", "--out", str(tmp_path)], cwd=REPO,
                        env=dict(os.environ), capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((tmp_path / "results-gpu.json").read_text())
  assert set(SECTIONS) <= set(results) and results["small"] is True
  assert results["device_tests"]["returncode"] == 0 and "passed" in results["device_tests"]["summary"]
  assert set(results["train_step_vs_dense"]) == {"mlp/float32", "mlp/bfloat16"}
  assert all(v["ratio"] > 0 for v in results["train_step_vs_dense"].values())
  assert set(results["rank_quanta"]) == {"quantum 1", "quantum 8", "quantum 64", "quantum 128"}
  assert results["lenet_end_to_end"]["wall_s"] > 0
  text = (tmp_path / "RESULTS-gpu.md").read_text()
  assert text.startswith("# Device check") and "## rank quanta" in text
