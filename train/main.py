"""Command line: ``maestro-train [CONFIG] [key=value ...] [--workdir DIR] [--fresh]``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from . import config as config_lib


def parse(argv=None) -> tuple[config_lib.Config, Path, argparse.Namespace]:
  parser = argparse.ArgumentParser(
      prog="maestro-train",
      description="Train a model with Maestro low-rank ordered dropout; resumes from WORKDIR's checkpoints.")
  parser.add_argument("config", nargs="?", default="digits_mlp",
                      help=f"config name ({', '.join(config_lib.available())}) or a .py file; "
                           "default digits_mlp (offline, about a minute on 2 CPU cores)")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3 lasso=1e-4")
  parser.add_argument("--workdir", help="output folder (default: workdirs/CONFIG)")
  parser.add_argument("--fresh", action="store_true", help="delete WORKDIR's checkpoints and start over")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if "=" in args.config:  # Only overrides were given.
    args.overrides.insert(0, args.config)
    args.config = "digits_mlp"
  config = config_lib.override(config_lib.load(args.config), args.overrides)
  workdir = Path(args.workdir or Path("workdirs") / Path(args.config).stem)
  return config, workdir, args


def cli(argv=None) -> None:
  try:
    config, workdir, args = parse(argv)
  except ValueError as e:
    sys.exit(f"maestro-train: error: {e}")
  if args.fresh and workdir.exists():
    shutil.rmtree(workdir)
  from . import train  # Heavy imports only after the arguments are known to be good.
  try:
    train.train_and_evaluate(config, workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    sys.exit(f"maestro-train: error: {e}")


if __name__ == "__main__":
  cli()
