"""Where a checkout keeps its offline data: ``shared/data/<name>`` in or beside the repository.

The library reads IDX files from a folder it is given (``maestro_jax.data.load(...,
idx_dir=DIR)``); which folder that is on this machine is the runner's business, so
the search lives here. ``Config.idx_dir='auto'`` resolves through
:func:`find_idx_dir`, as do the benchmarks and ``maestro-compare``.
"""

from __future__ import annotations

from pathlib import Path

from maestro_jax import data as data_lib

# <repo>/train/layout.py, or <site-packages>/maestro_train/layout.py when installed.
REPO = Path(__file__).resolve().parents[1]


def data_roots() -> tuple[Path, Path]:
  """The folders searched, in order: ``<repo>/shared/data`` and ``<repo>/../shared/data``."""
  return REPO / "shared" / "data", REPO.parent / "shared" / "data"


def find_text_dir(name: str) -> Path | None:
  """The folder ``shared/data/<name>`` (e.g. ``shakespeare``) in or beside the repository if it holds text files.

  Returns:
    The first of :func:`data_roots` whose ``<name>`` folder holds ``.txt`` or
    ``.txt.gz`` files, or None.
  """
  for root in data_roots():
    folder = root / name
    if folder.is_dir() and any(p.name.endswith((".txt", ".txt.gz")) for p in folder.iterdir()):
      return folder
  return None


def find_idx_dir(name: str) -> Path | None:
  """The folder ``shared/data/<name>`` in or beside the repository if it holds the IDX files, else None.

  Args:
    name: ``'mnist'`` or ``'fashion_mnist'`` (any other name finds nothing).

  Returns:
    The first of :func:`data_roots` whose ``<name>`` folder holds all four IDX
    files, or None.
  """
  if name not in data_lib.IDX_DATASETS:
    return None
  for root in data_roots():
    if data_lib.has_idx_files(root / name):
      return root / name
  return None
