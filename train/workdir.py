"""A run's workdir: the marker that makes it one, a lock against a second live run, and ``--fresh``.

The runner writes a marker file (``.maestro-train``) into every workdir it uses.
``--fresh`` only ever removes the entries the runner itself writes (:data:`OWNED`),
and only in a folder that holds the marker, so pointing ``--workdir`` at a
folder of one's own can never delete one's files. The outputs of
``maestro-sweep`` and ``maestro-export`` (``sweep/``, ``export/``) are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

MARKER = ".maestro-train"
LOCK = ".maestro-train.lock"
# Everything maestro-train writes into a workdir; --fresh removes these and nothing else.
OWNED = ("checkpoints", "skipped_checkpoints", "config.json", "config_changes.jsonl", "metrics.jsonl",
         "summary.json", "summary.txt", "ranks.png", "accuracy.png", "loss.png", "vocab.json", "tensorboard")


class WorkdirError(Exception):
  """A workdir that cannot be used; the message is one line for the user."""


def atomic_write_text(path: Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half of it."""
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  temporary.write_text(text)
  os.replace(temporary, path)


def is_workdir(path: Path) -> bool:
  """Whether ``path`` is a folder maestro-train has written (it holds the marker)."""
  return (path / MARKER).is_file()


def _is_legacy_workdir(path: Path) -> bool:
  # Written by a version before the marker: a config.json beside checkpoints or metrics.
  return (path / "config.json").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def prepare(path: str | Path) -> Path:
  """Makes ``path`` a usable workdir (created if missing, marked) and returns it.

  Raises:
    WorkdirError: ``path`` is a file, cannot be created or written, or is a
      non-empty folder that maestro-train did not write.
  """
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {path} is a file, not a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {path}: {e.strerror or e}") from None
  if not is_workdir(path):
    foreign = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if foreign and not _is_legacy_workdir(path):
      shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
      raise WorkdirError(f"workdir {path} holds files maestro-train did not write ({shown}); "
                         "use a new or empty folder")
    try:
      atomic_write_text(path / MARKER, json.dumps({"written_by": "maestro-train"}) + "\n")
    except OSError as e:
      raise WorkdirError(f"cannot write to workdir {path}: {e.strerror or e}") from None
  return path


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
  """Holds ``path``'s lock for a run; a second live run is refused, naming the first one's pid.

  The lock is an ``flock`` on a file that holds the owner's pid: the kernel drops
  it when the owner dies however it dies, so a lock left by a killed run is taken
  over without any clean-up.

  Raises:
    WorkdirError: another live process holds the lock.
  """
  lock_path = path / LOCK
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"cannot write to workdir {path}: {e.strerror or e}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise WorkdirError(f"workdir {path} is in use by another maestro-train run (pid {owner}); "
                         "wait for it to finish or use another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # The file stays (unlinking it would race with a run about to lock it).
  finally:
    os.close(fd)


def check_clearable(path: Path) -> None:
  """Raises WorkdirError unless ``path`` is missing, empty or a maestro-train workdir (what --fresh may clear)."""
  if not path.exists():
    return
  if not path.is_dir():
    raise WorkdirError(f"--fresh: {path} is a file, not a workdir")
  if not is_workdir(path) and not _is_legacy_workdir(path) and any(p.name != LOCK for p in path.iterdir()):
    raise WorkdirError(f"--fresh: {path} is not a maestro-train workdir (no {MARKER} file); nothing was removed")


def clear(path: Path) -> list[str]:
  """Removes what maestro-train wrote in workdir ``path`` (see :data:`OWNED`) and returns the names removed.

  Raises:
    WorkdirError: ``path`` exists but is not a maestro-train workdir.
  """
  check_clearable(path)
  if not path.exists() or not is_workdir(path) and not _is_legacy_workdir(path):
    return []
  removed = []
  for name in OWNED:
    entry = path / name
    if entry.is_dir() and not entry.is_symlink():
      shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
      entry.unlink()
    else:
      continue
    removed.append(name)
  return removed


def set_aside(path: Path, step_dir: Path) -> Path:
  """Moves a checkpoint step folder that does not restore to ``path/skipped_checkpoints`` (kept for inspection)."""
  target_dir = path / "skipped_checkpoints"
  target_dir.mkdir(exist_ok=True)
  target = target_dir / step_dir.name
  n = 1
  while target.exists():
    n += 1
    target = target_dir / f"{step_dir.name}.{n}"
  step_dir.rename(target)
  return target


def write_records(path: Path, records: list[dict]) -> None:
  """Rewrites ``metrics.jsonl`` to exactly ``records`` (the history a restored checkpoint carries)."""
  atomic_write_text(path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def append_record(path: Path, record: dict) -> None:
  with (path / "metrics.jsonl").open("a") as f:
    f.write(json.dumps(record) + "\n")
