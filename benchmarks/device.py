"""The accelerator check: ``python -m benchmarks --device [--small] [--out DIR]``.

One script, sized for at most 8 minutes on one H100, that records the
environment and measures on the default backend:

1. the test suite's device-sensitive subset (layers, sweeps, sharding, mixed precision);
2. train step against the dense twin for VGG-19 and ResNet-18 at full CIFAR
   width, batch 128, float32 and bfloat16 compute;
3. step time against rank for rank quanta 1, 8, 64 and 128 (does a
   hardware-friendly rank pay?);
4. the vmapped sweep's throughput against a Python loop over configurations;
5. LeNet-5 on MNIST end to end with the real runner (when the data is present);
6. peak device memory.

It writes ``RESULTS-gpu.md`` and ``results-gpu.json`` (into ``benchmarks/`` by
default). ``--small`` shrinks every model and count so that the whole check runs
on a CPU in CI; its figures are a smoke test, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import maestro_jax as mj
from maestro_jax import functional, models, sweep, training

from benchmarks import timing

HERE = Path(__file__).resolve().parent
DEVICE_TESTS = ("tests/test_factorized.py", "tests/test_sweep.py", "tests/test_sharding.py",
                "tests/test_mixed_precision.py", "tests/test_any_model.py")


def environment() -> dict[str, Any]:
  """What ran the check: versions, backend, devices."""
  import flax  # pylint: disable=import-outside-toplevel
  import optax as optax_lib  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax_lib.__version__, "backend": jax.default_backend(), "device_count": len(devices),
          "device_kind": devices[0].device_kind, "platform": platform.platform()}


def device_tests(small: bool) -> dict[str, Any]:
  """Runs the device-sensitive tests; returns their summary line and exit code."""
  # The smoke form checks this section's plumbing with three quick tests; the suite runs the rest anyway.
  files = ("tests/test_factorized.py::test_dense_svd_reproduces_dense",) if small else DEVICE_TESTS
  start = time.perf_counter()
  # The tests assert float32 equalities to 1e-5; GPUs multiply float32 in TF32 by default (errors near 5e-3).
  env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  # One process (-n 0): two test workers would each claim most of the accelerator's memory.
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *files],
                        cwd=HERE.parent, capture_output=True, text=True, check=False, env=env)
  lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
  return {"files": list(files), "returncode": proc.returncode, "summary": lines[-1] if lines else "",
          "seconds": round(time.perf_counter() - start, 1)}


def _step_times(model_fn, image_shape, batch_size: int, rounds: int, dtype) -> dict[str, float]:
  """Median step time (ms) of a factorized model at full rank and of its dense twin, timed in alternation."""
  x = jax.random.normal(jax.random.key(0), (batch_size,) + image_shape, jnp.float32)
  y = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
  batch = {"image": x, "label": y}
  steppers = {}
  for name, factorized in (("maestro", True), ("dense", False)):
    view, params, state = functional.from_module(model_fn(factorized, dtype))
    optimizer = optax.sgd(0.01, momentum=0.9)
    step = training.make_train_step(view, optimizer, sampler=mj.samplers.none(), lasso=1e-4)
    steppers[name] = timing.Stepper(step, training.init_state(params, state, optimizer), batch, jax.random.key(2))
  times = timing.interleaved(steppers, rounds=rounds, warmup=2)
  return {"maestro_ms": round(1e3 * timing.median(times["maestro"]), 3),
          "dense_ms": round(1e3 * timing.median(times["dense"]), 3),
          "ratio": round(timing.paired_ratio(times, "maestro", "dense"), 4)}


def train_step_vs_dense(small: bool) -> dict[str, Any]:
  batch, rounds, shape = (8, 3, (8, 8, 3)) if small else (128, 20, (32, 32, 3))
  if small:  # the CPU smoke test: a small MLP instead of two deep networks that take minutes to compile
    networks = {"mlp": lambda factorized, dt: models.MLP(192, (64,), 10, factorized=factorized, dtype=dt,
                                                        rngs=nnx.Rngs(0))}
  else:
    networks = {name: (lambda factorized, dt, cls=cls: cls(10, width=64, factorized=factorized, dtype=dt,
                                                           rngs=nnx.Rngs(0)))
                for name, cls in (("vgg19", models.VGG19), ("resnet18", models.ResNet18))}
  out = {}
  for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    for name, make in networks.items():
      out[f"{name}/{dtype_name}"] = _step_times(make, shape, batch, rounds, dtype)
  return out


def rank_quanta(small: bool) -> dict[str, Any]:
  """Step time of one factorized dense layer stack at ranks just below and at multiples of each quantum."""
  d, batch, rounds = (256, 16, 2) if small else (1024, 256, 20)
  x = jax.random.normal(jax.random.key(0), (batch, d))
  out = {}
  for quantum in (1, 8, 64, 128):
    rank = max(quantum, (d // 4) // quantum * quantum)  # a quarter of full rank, snapped to the quantum
    ranks = {"snapped": rank, "off_by_one": max(1, rank - 1)}
    fns = {}
    for label, r in ranks.items():
      params = mj.init_layer(jax.random.key(quantum), (d, d), rank=r)
      fn = jax.jit(jax.grad(lambda p, x: jnp.sum(mj.dense(p, x) ** 2)))
      fns[label] = (lambda fn=fn, p=params: fn(p, x))
    times = timing.interleaved(fns, rounds=rounds, inner=5, warmup=2)
    out[f"quantum {quantum}"] = {"rank": rank, "snapped_ms": round(1e3 * timing.median(times["snapped"]), 4),
                                 "off_by_one_ms": round(1e3 * timing.median(times["off_by_one"]), 4),
                                 "ratio_off_by_one_vs_snapped": round(
                                     timing.paired_ratio(times, "off_by_one", "snapped"), 4)}
  return out


def sweep_vs_loop(small: bool) -> dict[str, Any]:
  """Configurations per second: one vmapped sweep against a jitted loop over the same configurations."""
  hidden, k, batch = ((32,), 8, 64) if small else ((1024, 1024), 64, 512)
  view, params, state = functional.from_module(models.MLP(784, hidden, 10, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (batch, 784))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  stacked = sweep.fraction_grid(mj.capacities(params), np.linspace(0.05, 1.0, k))
  sweep_fn = sweep.make_sweep(view)
  one = jax.jit(lambda keeps: view.apply(params, state, x, keeps)[0])
  configs = sweep.unstack(stacked)
  times = timing.interleaved({"sweep": lambda: sweep_fn(params, state, x, y, None, stacked),
                              "loop": lambda: [one(c) for c in configs]}, rounds=5, warmup=1)
  return {"configs": k, "sweep_configs_per_s": round(k / timing.median(times["sweep"]), 1),
          "loop_configs_per_s": round(k / timing.median(times["loop"]), 1),
          "speedup": round(1 / timing.paired_ratio(times, "sweep", "loop"), 3)}


def lenet_end_to_end(small: bool) -> dict[str, Any]:
  """The real runner, LeNet-5 on MNIST (``--small``: one digits epoch): wall seconds and the summary."""
  from maestro_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from maestro_train import train as train_lib  # pylint: disable=import-outside-toplevel
  from maestro_train import layout  # pylint: disable=import-outside-toplevel
  if small:
    config = config_lib.override(config_lib.load("digits_mlp"), ["epochs=1"])
  elif layout.find_idx_dir("mnist") is None:
    return {"skipped": "the MNIST IDX files are not beside the repository"}
  else:
    config = config_lib.load("mnist_lenet")
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    summary = train_lib.train_and_evaluate(config, Path(workdir) / "run", progress=False)
    seconds = time.perf_counter() - start
  return {"config": "digits_mlp epochs=1" if small else "mnist_lenet", "wall_s": round(seconds, 1),
          "summary": json.loads(json.dumps(summary, default=str))}


def peak_memory() -> dict[str, Any]:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats} or {"unavailable": True}


def _markdown(results: dict[str, Any]) -> str:
  lines = ["# Device check", "", f"Generated by `python -m benchmarks --device{' --small' if results['small'] else ''}` "
           f"in {results['seconds']} s.", "", "## Environment", ""]
  lines += [f"- {k}: {v}" for k, v in results["environment"].items()]
  for section in ("train_step_vs_dense", "rank_quanta", "sweep_vs_loop", "lenet_end_to_end", "device_tests",
                  "peak_memory"):
    if section not in results:
      continue
    lines += ["", f"## {section.replace('_', ' ')}", "", "```json", json.dumps(results[section], indent=2), "```"]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks --device", description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke test that runs on a CPU")
  parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS-gpu.md and results-gpu.json")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  results: dict[str, Any] = {"small": args.small, "environment": environment()}
  # Measurements first, the tests last: if the machine's time runs out, what was measured is already written.
  sections = {"train_step_vs_dense": lambda: train_step_vs_dense(args.small),
              "rank_quanta": lambda: rank_quanta(args.small), "sweep_vs_loop": lambda: sweep_vs_loop(args.small),
              "lenet_end_to_end": lambda: lenet_end_to_end(args.small),
              "device_tests": lambda: device_tests(args.small)}
  for name, fn in sections.items():
    print(f"[device] {name} ...", flush=True)
    section_start = time.perf_counter()
    results[name] = fn()
    print(f"[device] {name} ({time.perf_counter() - section_start:.0f} s): {json.dumps(results[name])[:400]}",
          flush=True)
    results["peak_memory"] = peak_memory()
    results["seconds"] = round(time.perf_counter() - start, 1)
    _write(args.out, results)
  print(f"[device] wrote {args.out / 'RESULTS-gpu.md'} in {results['seconds']} s")
  return 0 if results["device_tests"]["returncode"] == 0 else 1


def _write(out: Path, results: dict[str, Any]) -> None:
  """Writes both reports (after every section, so a run cut short keeps what it measured)."""
  for name, text in (("results-gpu.json", json.dumps(results, indent=2)), ("RESULTS-gpu.md", _markdown(results))):
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)
