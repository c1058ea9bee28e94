"""The benchmark suite: seven measurements, each a ratio against a baseline timed in the same process.

1. ``train_step_vs_dense``: the Maestro train step (factorized layers, sampled
   keep counts, group lasso) against the same network built from plain
   ``nnx.Linear``/``nnx.Conv`` (``factorized=False``), at full rank and with
   every layer shrunk to 25% of its rank, with XLA's FLOP ratio beside it (the
   full run: MLP and LeNet-5 on MNIST shapes, VGG-19 and ResNet-18 at width 16,
   and ResNet-18 at its real width 64).
2. ``ordered_dropout_overhead``: the step with the ``single_layer`` sampler
   against the same step with keep = capacity (sampler ``none``).
3. ``compile_count``: compilations of the train step over a real run of
   ``train.train.train_and_evaluate`` on digits, for several rank quanta,
   against ``1 + capacity-changing shrink events``.
4. ``sweep_vs_loop``: one ``make_sweep`` call over 16 LeNet rank settings
   against 16 full-rank evaluations and against the naive loop that slices and
   re-jits a model per setting; cold (compilation included) and steady state.
5. ``export_latency``: inference latency of exported (sliced, merged) models at
   several rank fractions against the dense twin, batch 1 and 128, and whether
   the export compiles to the dense twin's own program.
6. ``freezing``: the train step with factor ``a`` (or ``b``) of every layer
   frozen against no freezing.
7. ``end_to_end``: LeNet/MNIST epochs with the real runner (full mode); set
   beside the official PyTorch code's reference figure on a 2-core CPU (not re-measured).

``python -m benchmarks`` runs the full suite; ``--small`` a quick version for
CI (same code, smaller shapes and fewer repeats).

Rooms: :mod:`benchmarks.common` (the two modes' sizes, reference models, the
timed step), :mod:`benchmarks.training_steps` (1, 2, 3, 6),
:mod:`benchmarks.deployment` (4, 5), :mod:`benchmarks.end_to_end` (7); this
module runs them, records the machine and writes ``RESULTS.md`` and
``results.json`` (rendered by :mod:`benchmarks.markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import maestro_jax
from maestro_jax import export as export_lib

from benchmarks import deployment
from benchmarks import end_to_end
from benchmarks import markdown
from benchmarks import training_steps
from benchmarks.common import FULL, SMALL, Settings

PACKAGE_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------- the suite


BENCHMARKS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "train_step_vs_dense": training_steps.bench_train_step_vs_dense,
    "ordered_dropout_overhead": training_steps.bench_ordered_dropout_overhead,
    "compile_count": training_steps.bench_compile_count,
    "sweep_vs_loop": deployment.bench_sweep_vs_loop,
    "export_latency": deployment.bench_export_latency,
    "freezing": training_steps.bench_freezing,
    "end_to_end": end_to_end.bench_end_to_end,
}


def _versions() -> dict[str, str]:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
          "maestro_jax": maestro_jax.__version__}


def machine_info() -> dict[str, Any]:
  """Platform, CPUs, library versions, JAX devices and the load average."""
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "cpus_usable": affinity, "versions": _versions(),
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def run(settings: Settings, names: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmarks (all, or ``names``); returns the results dict."""
  names = list(BENCHMARKS) if not names else names
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise ValueError(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
  results = {"mode": settings.mode, "settings": dataclasses.asdict(settings), "machine": machine_info(),
             "benchmarks": {}}
  start = time.perf_counter()
  for i, name in enumerate(names):
    t0 = time.perf_counter()
    section = BENCHMARKS[name](settings)
    section["seconds"] = round(time.perf_counter() - t0, 1)
    results["benchmarks"][name] = section
    log(f"[{i + 1}/{len(names)}] {name} ({section['seconds']:.1f} s): {markdown.headline(name, section)}")
  results["total_seconds"] = round(time.perf_counter() - start, 1)
  if hasattr(os, "getloadavg"):
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  return results


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
  """Writes ``results.json`` and the markdown report into ``out_dir``; returns their paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path = out_dir / "results.json"
  json_path.write_text(json.dumps(results, indent=2, default=export_lib.json_default) + "\n")
  report_path = out_dir / "RESULTS.md"
  report_path.write_text(markdown.render(results))
  return json_path, report_path


def main(argv: list[str] | None = None) -> int:
  """Command line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="quick CI version (tiny shapes, few repeats)")
  parser.add_argument("--out", type=Path, default=None,
                      help="output folder (default: benchmarks/results for --small, benchmarks for the full run)")
  parser.add_argument("--only", nargs="+", default=None, choices=list(BENCHMARKS), help="run only these")
  args = parser.parse_args(argv)
  settings = SMALL if args.small else FULL
  out_dir = args.out or (PACKAGE_DIR / "results" if args.small else PACKAGE_DIR)
  print(f"maestro_jax benchmarks ({settings.mode}) on {jax.devices()}, {os.cpu_count()} CPUs", flush=True)
  results = run(settings, args.only, log=lambda line: print(line, flush=True))
  json_path, report_path = write(results, out_dir)
  print(f"done in {results['total_seconds']:.1f} s; wrote {json_path} and {report_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
