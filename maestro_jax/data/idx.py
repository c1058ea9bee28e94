"""MNIST-format IDX files: read, write, find them in a folder."""


from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
import zlib

import numpy as np


# ----------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_maybe_gzipped(path: str | os.PathLike, what: str = "file") -> bytes:
  """A file's bytes, gunzipped when its content is gzip (whatever its name says).

  Raises:
    FileNotFoundError: no such file (the message names it as ``what``).
    ValueError: corrupt gzip data.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found: {path}")
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f"{path}: corrupt gzip data ({e})") from e
  return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (gzipped or not; detected from its content) as a read-only array.

  Args:
    path: the file.

  Returns:
    The array, with the dtype and shape of the file's header, native byte order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: bad gzip data, bad magic number, or a size that does not match
      the header.
  """
  path = Path(path)
  raw = read_maybe_gzipped(path, "IDX file")
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(
        f"{path}: not an IDX file: magic number 0x{raw[:4].hex()}, expected 0x0000TTNN with type TT in "
        f"{', '.join(f'{t:02x}' for t in _IDX_DTYPES)} (e.g. 0x00000803 for images, 0x00000801 for labels)"
    )
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = header + math.prod(shape) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
        f"{path}: {len(raw)} bytes, but the header's shape {shape} of {dtype} needs {expected}; "
        "the file is truncated or corrupt"
    )
  array = np.frombuffer(raw, dtype, count=math.prod(shape), offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else array


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file, gzipped if ``path`` ends in ``.gz``.

  Args:
    path: the file to write.
    array: an array of uint8, int8, int16, int32, float32 or float64.
  """
  array = np.asarray(array)
  native = array.dtype.newbyteorder("=")
  if native not in _IDX_CODES:
    raise ValueError(f"IDX cannot store {array.dtype}; use one of {', '.join(map(str, _IDX_CODES))}")
  code = _IDX_CODES[native]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  data = header + np.ascontiguousarray(array, _IDX_DTYPES[code]).tobytes()
  path = Path(path)
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _find_idx_file(directory: Path, stem: str) -> Path:
  candidates = [directory / stem, directory / f"{stem}.gz"]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f"missing IDX file {stem}[.gz] in {directory}: none of {', '.join(map(str, candidates))} exists"
  )


def has_idx_files(directory: str | os.PathLike) -> bool:
  """Whether ``directory`` holds all four MNIST-format IDX files (gzipped or not)."""
  directory = Path(directory)
  stems = [stem for pair in IDX_FILES.values() for stem in pair]
  return all((directory / s).is_file() or (directory / f"{s}.gz").is_file() for s in stems)


def load_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads MNIST-format IDX images and labels of ``split`` from ``directory``.

  Args:
    directory: a folder with ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
      ``t10k-labels-idx1-ubyte``, each optionally with ``.gz``.
    split: ``'train'`` or ``'test'`` (the ``t10k`` files).

  Returns:
    ``uint8 (N, H, W, 1)`` images and ``int32 (N,)`` labels.

  Raises:
    FileNotFoundError: a missing folder or file (the message names the path).
    ValueError: an unknown split, or files that are corrupt or do not match.
  """
  if split not in IDX_FILES:
    raise ValueError(f"unknown split {split!r} for IDX files; valid splits: {', '.join(IDX_FILES)}")
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"IDX directory not found: {directory}")
  images_path, labels_path = (_find_idx_file(directory, stem) for stem in IDX_FILES[split])
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim != 3:
    raise ValueError(
        f"{images_path}: expected uint8 images (magic 0x00000803), got {images.dtype} of shape {images.shape}"
    )
  if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
    raise ValueError(
        f"{labels_path}: expected integer labels (magic 0x00000801), got {labels.dtype} of shape {labels.shape}"
    )
  if len(images) != len(labels):
    raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
  return images[..., None], labels.astype(np.int32)
