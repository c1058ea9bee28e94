"""Command line: ``maestro-train [CONFIG] [key=value ...] [--workdir DIR] [--fresh] [--allow-changes] [--debug]``.

Several processes (one per host, or several on one machine) each run the same
command with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or
the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``; ``--distributed`` lets JAX detect a Cloud TPU pod, SLURM or
Open MPI cluster instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from . import config as config_lib
from . import interrupt


def parse(argv=None) -> tuple[config_lib.Config, Path, argparse.Namespace]:
  parser = argparse.ArgumentParser(
      prog="maestro-train",
      description="Train a model with Maestro low-rank ordered dropout; resumes from WORKDIR's checkpoints.")
  parser.add_argument("config", nargs="?", default="digits_mlp",
                      help=f"config name ({', '.join(config_lib.available())}) or a .py file; "
                           "default digits_mlp (offline, about a minute on 2 CPU cores)")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3 lasso=1e-4")
  parser.add_argument("--workdir", help="output folder (default: workdirs/CONFIG)")
  parser.add_argument("--fresh", action="store_true",
                      help="remove what maestro-train wrote in WORKDIR (checkpoints, records, plots, summary) and "
                           "start over; other files, sweep/ and export/ are kept")
  parser.add_argument("--allow-changes", action="store_true",
                      help="resume even though epochs, learning rate, schedule or another trajectory field changed "
                           "(the change is recorded in WORKDIR/config_changes.jsonl)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
  several = parser.add_argument_group(
      "several processes", "start JAX's multi-controller runtime (jax.distributed); every process runs the same "
      "command and feeds its own share of each batch; process 0 writes records, plots and the summary")
  several.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address for the coordination service (default: $JAX_COORDINATOR_ADDRESS)")
  several.add_argument("--num-processes", type=int, metavar="N", help="default: $JAX_NUM_PROCESSES")
  several.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1 (default: $JAX_PROCESS_ID)")
  several.add_argument("--distributed", action="store_true",
                       help="start it even with none of the above, letting JAX detect the cluster (TPU pod, SLURM)")
  args = parser.parse_args(argv)
  if "=" in args.config:  # Only overrides were given.
    args.overrides.insert(0, args.config)
    args.config = "digits_mlp"
  config = config_lib.override(config_lib.load(args.config), args.overrides)
  workdir = Path(args.workdir or Path("workdirs") / Path(args.config).stem)
  return config, workdir, args


def limit_malloc_arenas(count: int = 2) -> bool:
  """Caps glibc's malloc arenas for this process (``MALLOC_ARENA_MAX``, unless the environment sets it).

  XLA compiles and runs on a pool of threads, and glibc gives each its own arena, whose freed memory
  is rarely returned: with 2 arenas the quick start peaked at 740 MB instead of 815 MB, as fast. Call it
  before JAX starts its threads. Returns whether the cap was set (False off glibc).
  """
  if "MALLOC_ARENA_MAX" in os.environ:
    return False
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    return ctypes.CDLL("libc.so.6").mallopt(-8, count) == 1  # -8: M_ARENA_MAX
  except (OSError, AttributeError):
    return False


def cli(argv=None) -> None:
  """Runs ``maestro-train``: every error is one line on stderr and exit status 1 (``--debug``: the traceback).

  SIGTERM and SIGINT exit with 128 + the signal number after saving (see :mod:`maestro_train.interrupt`).
  """
  limit_malloc_arenas()
  debug = "--debug" in (sys.argv[1:] if argv is None else argv)
  with interrupt.handling():
    try:
      config, workdir, args = parse(argv)
      from . import train  # Heavy imports only after the arguments are known to be good.
      # Before anything asks JAX for devices (the cache asks for the backend): the runtime must know about every
      # process first.
      train.initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
      use_compilation_cache()
      train.train_and_evaluate(config, workdir, progress=not args.no_progress, fresh=args.fresh,
                               allow_changes=args.allow_changes)
    except interrupt.Interrupted as e:
      if debug:
        traceback.print_exc()
      print(f"\nmaestro-train: {e.args[0]}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - every failure is one line; --debug shows where it came from.
      if debug:
        traceback.print_exc()
      sys.exit(f"maestro-train: error: {one_line(e)}")


def use_compilation_cache() -> None:
  """On a GPU or TPU, turns on JAX's persistent compilation cache: a second run starts with its programs compiled.

  The cache lives in ``$XDG_CACHE_HOME/maestro_train/xla`` (``~/.cache/...``);
  setting ``JAX_COMPILATION_CACHE_DIR`` (empty: no cache) overrides it, on any
  backend. Not by default on a CPU: jaxlib logs a false machine-feature mismatch
  at error level for every executable it loads from the cache there.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu":
    return
  cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maestro_train" / "xla"
  jax.config.update("jax_compilation_cache_dir", str(cache))
  # Many of the runner's programs (evaluation, small steps) compile in under JAX's default threshold of 1 s.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def one_line(error: BaseException) -> str:
  """An exception as one line: its message (its type too when that is not a plain user error)."""
  text = " ".join(str(error.args[0] if len(error.args) == 1 else error).split())
  if isinstance(error, (ValueError, FileNotFoundError, FloatingPointError)) or type(error).__name__ in (
      "WorkdirError", "DeployError"):
    return text
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
  return f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
  cli()
