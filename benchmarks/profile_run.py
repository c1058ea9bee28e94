"""``python -m benchmarks.profile_run [CONFIG] [key=value ...]``: where a training run's wall time goes.

Runs ``train_and_evaluate`` in this process (a temporary workdir, no progress
bar) with timers around the runner's phases and prints one markdown table:
the set-up (imports, data, model build, first compile), and per epoch the
time spent fetching batches, dispatching steps, waiting for the device,
compiling, shrinking, evaluating, checkpointing, plotting and trimming memory.

Timers wrap the functions the runner calls by name (the module attributes it
looks up at call time); compile time is JAX's own account
(``jax.monitoring`` duration events). Steps run asynchronously: *dispatch* is
the time inside the step call, *device wait* is the rest of the epoch's
train time, spent blocked on results (at log steps and the epoch's end).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

_START = time.perf_counter()

import jax  # noqa: E402  (timed as part of the imports)

from maestro_train import config as config_lib  # noqa: E402
from maestro_train import train as train_lib  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _START

# JAX's compile-time events: tracing, lowering and the backend compile of each jitted program.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class Clock:
  """Seconds per phase, split by epoch (``epoch`` 0 is the set-up before the first one)."""

  def __init__(self):
    self.epoch = 0
    self.in_steps = False  # between an epoch's first batch request and the end of its batches
    self.seconds: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

  def add(self, phase: str, seconds: float) -> None:
    self.seconds[self.epoch][phase] += seconds

  def timed(self, phase: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.add(phase, time.perf_counter() - start)
    return wrapper

  def timed_iterator(self, phase: str, iterator: Iterator) -> Iterator:
    iterator, done = iter(iterator), object()
    while True:
      start = time.perf_counter()
      item = next(iterator, done)
      self.add(phase, time.perf_counter() - start)
      if item is done:
        self.in_steps = False
        return
      yield item


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def profile(config: config_lib.Config) -> tuple[Clock, list[dict], float]:
  """Runs ``config`` with the phase timers on: ``(clock, epoch records, wall seconds)``."""
  clock = Clock()

  def on_duration(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
      clock.add("compile (trace, lower, XLA)", seconds)

  make_step = train_lib.training.make_train_step
  task = train_lib.tasks.get(config.task)
  train_batches = task.train_batches
  append = train_lib.workdir_lib.append_record
  trim = train_lib.release_freed_memory
  records: list[dict] = []

  def make_timed_step(*args, **kwargs):
    return clock.timed("step dispatch", make_step(*args, **kwargs))

  def batches(sources, config, epoch, start_batch):
    clock.epoch, clock.in_steps = epoch + 1, True  # the runner asks for an epoch's batches first thing in it
    return clock.timed_iterator("batches", train_batches(sources, config, epoch, start_batch))

  def append_record(workdir, record):
    records.append(record)
    return append(workdir, record)

  def release_freed_memory():
    clock.timed("memory trim (in steps)" if clock.in_steps else "memory trim", trim)()

  phases = {
      train_lib: {"load_sources": "data: load", "build_view": "model build", "_save": "checkpoint"},
      train_lib.maestro_jax: {"ranks_from_importance": "shrink", "shrink": "shrink"},
      train_lib.training: {"evaluate": "evaluation"},
      train_lib.report: {"plot_history": "plots", "sizes": "size accounting"},
  }
  with contextlib.ExitStack() as stack:
    for module, names in phases.items():
      for name, phase in names.items():
        stack.enter_context(_patched(module, name, clock.timed(phase, getattr(module, name))))
    stack.enter_context(_patched(train_lib.training, "make_train_step", make_timed_step))
    stack.enter_context(_patched(task, "train_batches", batches))
    stack.enter_context(_patched(train_lib.workdir_lib, "append_record", append_record))
    stack.enter_context(_patched(train_lib, "release_freed_memory", release_freed_memory))
    # Only this listener is removed afterwards: others (a caller's) stay registered.
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    stack.callback(jax.monitoring.unregister_event_duration_listener, on_duration)
    workdir = stack.enter_context(tempfile.TemporaryDirectory())
    start = time.perf_counter()
    train_lib.train_and_evaluate(config, workdir, progress=False)
    wall = time.perf_counter() - start
  return clock, records, wall


def table(clock: Clock, records: list[dict], wall: float) -> str:
  """The markdown table of :func:`profile`'s result: one column per epoch, set-up first."""
  # Nested phases: compile happens inside the first step's dispatch (or in evaluation); host copies inside shrink.
  epochs = sorted(e for e in clock.seconds if e > 0)
  train = {r["epoch"]: r["epoch_seconds"] for r in records}
  rows = ["batches", "step dispatch", "device wait", "memory trim (in steps)", "compile (trace, lower, XLA)",
          "shrink", "evaluation", "size accounting", "checkpoint", "plots", "memory trim"]
  header = "| phase | set-up | " + " | ".join(f"epoch {e}" for e in epochs) + " |"
  lines = [header, "|---|" + "---:|" * (len(epochs) + 1)]
  setup = clock.seconds[0]
  setup_rows = {"imports": IMPORT_SECONDS, "data: load": setup["data: load"], "model build": setup["model build"],
                "compile (trace, lower, XLA)": setup["compile (trace, lower, XLA)"]}
  columns = {}
  for e in epochs:
    s = clock.seconds[e]
    column = {phase: s[phase] for phase in rows}
    column["device wait"] = train.get(e, 0.0) - s["batches"] - s["step dispatch"] - s["memory trim (in steps)"]
    columns[e] = column
  for phase in ["imports", "data: load", "model build"] + rows:
    cells = [f"{setup_rows[phase]:.2f}" if phase in setup_rows else ""]
    cells += [f"{columns[e][phase]:.2f}" if phase in columns[e] else "" for e in epochs]
    if any(cells):
      lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  lines.append("| **epoch train time** (runner's `epoch_seconds`) | | "
               + " | ".join(f"{train.get(e, 0.0):.2f}" for e in epochs) + " |")
  total = IMPORT_SECONDS + wall
  lines.append(f"\nWhole run: {total:.1f} s ({IMPORT_SECONDS:.1f} s imports + {wall:.1f} s in train_and_evaluate). "
               "Compile time is also counted inside the phase that triggered it (the first step's dispatch, "
               "evaluation); the epoch train time is batches + step dispatch + device wait + memory trim (in steps).")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  name = argv[0] if argv and "=" not in argv[0] else "mnist_lenet"
  overrides = [a for a in argv if "=" in a]
  config = config_lib.override(config_lib.load(name), overrides)
  clock, records, wall = profile(config)
  print(f"# Where the time of `{name}` {' '.join(overrides)} goes (backend {jax.default_backend()})\n")
  print(table(clock, records, wall))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
