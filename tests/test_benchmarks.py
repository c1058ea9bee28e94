"""The benchmark suite runs end to end in its small mode and writes a complete report.

Speed is measured, not unit-tested: no assertion here is about a timing ratio.
The one exact figure is the compile count of the train step over a training
run, which must be ``1 + capacity-changing shrink events``.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train_step_vs_dense", "ordered_dropout_overhead", "compile_count", "sweep_vs_loop", "export_latency",
            "freezing", "end_to_end")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """Runs ``python -m benchmarks --small --out TMP`` once; returns ``(out dir, results dict)``."""
  out = tmp_path_factory.mktemp("benchmarks")
  proc = subprocess.run([sys.executable, "-W", "error", "-m", "benchmarks", "--small", "--out", str(out)],
                        cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=1200,
                        check=False)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
  return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_every_section_has_finite_positive_ratios(small_run):
  _, results, _ = small_run
  assert results["mode"] == "small"
  assert set(results["benchmarks"]) == set(SECTIONS)
  for name in SECTIONS:
    ratios = results["benchmarks"][name]["ratios"]
    assert ratios, f"{name} reports no ratios"
    bad = {k: v for k, v in ratios.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    assert not bad, f"{name}: ratios that are not finite and positive: {bad}"
    assert results["benchmarks"][name]["rows"], f"{name} has an empty table"


def test_report_and_progress_lines(small_run):
  out, results, stdout = small_run
  report = (out / "RESULTS.md").read_text()
  for name in SECTIONS:
    assert results["benchmarks"][name]["title"] in report
    assert f"] {name} (" in stdout, f"no progress line for {name}"
  machine = results["machine"]
  assert machine["devices"] and machine["cpu_count"] >= 1 and machine["versions"]["jax"]
  assert "may have been shared" in report


def test_compiles_are_one_plus_capacity_changing_shrinks(small_run):
  _, results, _ = small_run
  runs = results["benchmarks"]["compile_count"]["runs"]
  assert [r["quantum"] for r in runs] == [1, 8]
  for run in runs:
    counted = sum(e["capacity_changed"] and e["before_last_epoch"] for e in run["events"])
    assert run["expected"] == 1 + counted
    assert run["compiles"] == run["expected"], run
  assert runs[0]["capacity_change_events_before_last_epoch"] >= 1, "ranks must shrink for the count to mean anything"
