"""Command line: ``maestro-train [CONFIG] [key=value ...] [--workdir DIR] [--fresh] [--allow-changes] [--debug]``."""

from __future__ import annotations

import argparse
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
  args = parser.parse_args(argv)
  if "=" in args.config:  # Only overrides were given.
    args.overrides.insert(0, args.config)
    args.config = "digits_mlp"
  config = config_lib.override(config_lib.load(args.config), args.overrides)
  workdir = Path(args.workdir or Path("workdirs") / Path(args.config).stem)
  return config, workdir, args


def cli(argv=None) -> None:
  """Runs ``maestro-train``: every error is one line on stderr and exit status 1 (``--debug``: the traceback).

  SIGTERM and SIGINT exit with 128 + the signal number after saving (see :mod:`maestro_train.interrupt`).
  """
  debug = "--debug" in (sys.argv[1:] if argv is None else argv)
  with interrupt.handling():
    try:
      config, workdir, args = parse(argv)
      from . import train  # Heavy imports only after the arguments are known to be good.
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
