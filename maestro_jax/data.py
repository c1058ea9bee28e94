"""Input pipeline: image-classification sources, seeded batching, augmentation.

Sources
  ``load(name, split)`` returns a :class:`Source`: one split of a dataset with
  random access (``len(source)``, ``source[i] -> {'image', 'label'}``) plus its
  metadata (``num_classes``, ``image_shape``, normalization constants). Names:

  * ``'digits'``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes),
    split 80/20 per class with seed 0 (1438 train / 359 test), reproducibly.
  * ``'mnist'``, ``'fashion_mnist'``, ``'cifar10'``, ``'cifar100'``: read with
    ``tfds.data_source`` (array_record files, random access, no TensorFlow).
    ``download=False`` by default: a dataset that is not prepared raises a
    ``FileNotFoundError`` that says how to prepare it.
  * Offline IDX files: ``load('mnist', 'train', idx_dir=DIR)`` (or
    ``'fashion_mnist'``) reads the original ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` files (each gzipped or not) from ``DIR`` instead
    of going through tfds. ``default_idx_dir(name)`` finds such a folder under
    a ``shared/data`` directory next to the repository, if there is one.

Pixel format
  Every source holds ``uint8`` images in ``[0, 255]``, shaped ``(H, W, C)``
  (digits' values ``0..16`` are rescaled losslessly to ``round(v * 255 / 16)``).
  Batches are ``float32`` and normalized per channel:
  ``(x / 255 - mean) / std``, with the usual training-set constants for
  MNIST, Fashion-MNIST and CIFAR and constants computed from the training
  split for digits.

Batching
  ``batches(source, batch_size, seed=..., epoch=..., start_batch=...)`` yields
  dicts of numpy arrays ``{'image': float32 (B, H, W, C), 'label': int32 (B,),
  'mask': bool (B,), 'index': int32 (B,)}``. The epoch order is
  ``np.random.default_rng((seed, epoch)).permutation(n)``, so the batch
  sequence is a pure function of ``(seed, epoch)`` and a run can resume at any
  batch with ``start_batch``. ``batch_size`` is global: each process gets the
  contiguous slice ``process_index`` of size ``batch_size / process_count`` of
  every global batch and reads only those examples. A final partial batch (when
  ``drop_remainder`` is off, the default for evaluation) is padded to full size
  with ``mask == False`` and ``index == -1``, keeping shapes static for ``jit``.
  CIFAR training batches get a random 32x32 crop of the image zero-padded by 4
  pixels and a random horizontal flip, drawn from
  ``np.random.default_rng((seed, epoch, batch, 1))`` for the whole global batch
  so that the result does not depend on ``process_count``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import gzip
import math
import operator
import os
from pathlib import Path
from typing import Any
import zlib

import jax
import numpy as np

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
IDX_DATASETS = ("mnist", "fashion_mnist")
DATASETS = ("digits",) + TFDS_DATASETS
SPLITS = ("train", "test")
CIFAR_DATASETS = ("cifar10", "cifar100")


@dataclasses.dataclass(frozen=True)
class _Meta:
  num_classes: int
  image_shape: tuple[int, int, int]
  # Per-channel mean/std of the training pixels scaled to [0, 1]; None: computed.
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None


_META = {
    "digits": _Meta(10, (8, 8, 1), None, None),
    "mnist": _Meta(10, (28, 28, 1), (0.1307,), (0.3081,)),
    "fashion_mnist": _Meta(10, (28, 28, 1), (0.2860,), (0.3530,)),
    "cifar10": _Meta(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _Meta(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """One split of an image-classification dataset with random access.

  Exactly one of ``images``/``labels`` (in-memory arrays) and ``records`` (a
  random-access sequence such as a tfds data source) is set.

  Attributes:
    name: the dataset's name, e.g. ``'mnist'``.
    split: the split's name, e.g. ``'train'``.
    num_classes: number of classes; labels are in ``0..num_classes - 1``.
    image_shape: ``(H, W, C)`` of one image.
    mean: ``float32 (C,)`` per-channel mean of training pixels scaled to [0, 1].
    std: ``float32 (C,)`` per-channel standard deviation, same scale.
    images: ``uint8 (N, H, W, C)`` images, or None for a record source.
    labels: ``int32 (N,)`` labels, or None for a record source.
    records: a sequence of ``{'image': uint8 (H, W, C), 'label': int}`` mappings,
      or None for an in-memory source.
  """

  name: str
  split: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  images: np.ndarray | None = None
  labels: np.ndarray | None = None
  records: Sequence[Mapping[str, Any]] | None = None

  def __post_init__(self):
    if (self.records is None) == (self.images is None):
      raise ValueError("a Source needs either images and labels or records, not both")
    if (self.images is None) != (self.labels is None):
      raise ValueError("images and labels must be given together")
    channels = self.image_shape[-1]
    if np.shape(self.mean) != (channels,) or np.shape(self.std) != (channels,):
      raise ValueError(
          f"mean and std must have shape ({channels},), got {np.shape(self.mean)} and {np.shape(self.std)}"
      )
    if self.images is not None:
      if self.images.dtype != np.uint8 or self.images.shape[1:] != tuple(self.image_shape):
        raise ValueError(
            f"images must be uint8 (N, {', '.join(map(str, self.image_shape))}), "
            f"got {self.images.dtype} {self.images.shape}"
        )
      if self.labels.shape != self.images.shape[:1]:
        raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")

  @classmethod
  def from_arrays(
      cls,
      images: np.ndarray,
      labels: np.ndarray,
      *,
      name: str = "arrays",
      split: str = "train",
      num_classes: int | None = None,
      mean: Sequence[float] | None = None,
      std: Sequence[float] | None = None,
  ) -> Source:
    """An in-memory source from ``uint8`` images ``(N, H, W[, C])`` and integer labels.

    Args:
      images: ``uint8`` images; a missing channel axis is added.
      labels: integer labels ``(N,)``.
      name: dataset name (``'cifar10'``/``'cifar100'`` turn training augmentation on).
      split: split name.
      num_classes: defaults to ``max(labels) + 1``.
      mean: per-channel mean on the [0, 1] scale; defaults to the images' own.
      std: per-channel std on the [0, 1] scale; defaults to the images' own.

    Returns:
      The source.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4:
      raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    labels = _check_labels(np.asarray(labels), len(images), num_classes)
    if num_classes is None:
      num_classes = int(labels.max()) + 1 if len(labels) else 0
    computed_mean, computed_std = pixel_stats(images)
    return cls(
        name=name,
        split=split,
        num_classes=num_classes,
        image_shape=tuple(int(d) for d in images.shape[1:]),
        mean=computed_mean if mean is None else np.asarray(mean, np.float32),
        std=computed_std if std is None else np.asarray(std, np.float32),
        images=images,
        labels=labels,
    )

  def __len__(self) -> int:
    return len(self.labels) if self.records is None else len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    """Example ``i``: ``{'image': uint8 (H, W, C), 'label': int}``."""
    i = operator.index(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {self.name}/{self.split} with {len(self)} examples")
    images, labels = self.take(np.array([i % len(self)]))
    return {"image": images[0], "label": int(labels[0])}

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (k, H, W, C)`` and labels ``int32 (k,)`` at integer ``indices``."""
    indices = np.asarray(indices, np.int64)
    if self.records is None:
      return self.images[indices], self.labels[indices]
    if len(indices) == 0:
      return np.zeros((0, *self.image_shape), np.uint8), np.zeros((0,), np.int32)
    items = _fetch_records(self.records, [int(i) for i in indices])
    images = np.stack([np.asarray(item["image"], np.uint8) for item in items])
    labels = np.array([item["label"] for item in items], np.int32)
    if images.shape[1:] != tuple(self.image_shape):
      raise ValueError(f"{self.name}: records have images {images.shape[1:]}, expected {self.image_shape}")
    return images, labels


def _fetch_records(records: Sequence[Mapping[str, Any]], keys: list[int]) -> list[Mapping[str, Any]]:
  """Items ``records[k]`` for ``keys``, in one ``__getitems__`` call where possible."""
  getitems = getattr(records, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(keys))
    except TypeError:
      # tfds.testing.mock_data patches __getitems__ with a function that cannot
      # bind `self`; item-by-item access below still works there.
      pass
  return [records[k] for k in keys]


def _check_labels(labels: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
  if n and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
    valid = "non-negative" if num_classes is None else f"in 0..{num_classes - 1}"
    raise ValueError(f"labels must be {valid}, got values in {labels.min()}..{labels.max()}")
  return labels.astype(np.int32)


def pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std ``float32 (C,)`` of ``uint8 (N, H, W, C)`` images scaled to [0, 1]."""
  # Exact moments from per-channel histograms: no float copy of the images.
  channels = np.moveaxis(np.asarray(images, np.uint8), -1, 0).reshape(images.shape[-1], -1)
  counts = np.stack([np.bincount(c, minlength=256) for c in channels]).astype(np.float64)
  values = np.arange(256) / 255.0
  total = np.maximum(counts.sum(axis=1), 1)
  mean = counts @ values / total
  std = np.sqrt(np.maximum(counts @ values**2 / total - mean**2, 0.0))
  return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _validate_name(name: str) -> _Meta:
  if name not in _META:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
  return _META[name]


def _validate_split(name: str, split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for {name!r}; valid splits: {', '.join(SPLITS)}")


def load(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    idx_dir: str | os.PathLike | None = None,
) -> Source:
  """Loads one split of a dataset as a random-access :class:`Source`.

  Args:
    name: one of ``DATASETS``: ``'digits'``, ``'mnist'``, ``'fashion_mnist'``,
      ``'cifar10'``, ``'cifar100'``.
    split: ``'train'`` or ``'test'`` (tfds datasets also accept any tfds split
      string, e.g. ``'train[:90%]'``).
    data_dir: the tfds data directory (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Unused for digits and IDX files.
    download: let tfds download and prepare a missing dataset (needs network).
    idx_dir: for ``'mnist'``/``'fashion_mnist'``, read the original IDX files
      from this folder instead of tfds.

  Returns:
    The source.

  Raises:
    ValueError: unknown ``name`` or ``split``, or corrupt IDX files.
    FileNotFoundError: missing IDX files, or a tfds dataset that is not
      prepared while ``download`` is False.
  """
  meta = _validate_name(name)
  if idx_dir is not None:
    if name not in IDX_DATASETS:
      raise ValueError(f"idx_dir only applies to {', '.join(IDX_DATASETS)}, not {name!r}")
    _validate_split(name, split)
    images, labels = load_idx_split(idx_dir, split)
    return _in_memory(name, split, meta, images, labels)
  if name == "digits":
    _validate_split(name, split)
    return _load_digits(split)
  return _load_tfds(name, split, meta, data_dir=data_dir, download=download)


def _in_memory(name: str, split: str, meta: _Meta, images: np.ndarray, labels: np.ndarray) -> Source:
  labels = _check_labels(labels, len(images), meta.num_classes)
  return Source(
      name=name,
      split=split,
      num_classes=meta.num_classes,
      image_shape=tuple(int(d) for d in images.shape[1:]),
      mean=np.asarray(meta.mean, np.float32),
      std=np.asarray(meta.std, np.float32),
      images=images,
      labels=labels,
  )


def _load_tfds(name: str, split: str, meta: _Meta, *, data_dir, download: bool) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    records = tfds.data_source(
        name,
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
        builder_kwargs={"file_format": "array_record"},
    )
  except (KeyError, NotImplementedError, FileNotFoundError) as e:
    if download:
      raise
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    offline = (
        f" Offline, the original IDX files also work: load({name!r}, {split!r}, idx_dir=DIR)."
        if name in IDX_DATASETS
        else ""
    )
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared in array_record format under {where}. "
        f"Prepare it once with network access, e.g. load({name!r}, {split!r}, data_dir=DIR, download=True) or "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR`.{offline} "
        f"(tfds said: {type(e).__name__}: {e})"
    ) from e
  return Source(
      name=name,
      split=split,
      num_classes=meta.num_classes,
      image_shape=meta.image_shape,
      mean=np.asarray(meta.mean, np.float32),
      std=np.asarray(meta.std, np.float32),
      records=records,
  )


# ----------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Sorted train and test indices, ``round(test_fraction * count)`` of each class in test.

  Args:
    labels: integer labels ``(N,)``.
    test_fraction: the fraction of each class that goes to the test split.
    seed: the seed of the per-class permutations.

  Returns:
    ``(train_indices, test_indices)``, disjoint and together ``0..N-1``.
  """
  rng = np.random.default_rng(seed)
  test = [
      rng.permutation(members)[: round(test_fraction * len(members))]
      for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
  ]
  test = np.sort(np.concatenate(test)) if test else np.zeros((0,), np.int64)
  return np.setdiff1d(np.arange(len(labels)), test), test


def _load_digits(split: str) -> Source:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = stratified_split(labels, test_fraction=0.2, seed=0)
  mean, std = pixel_stats(images[train])
  idx = train if split == "train" else test
  return Source(
      name="digits",
      split=split,
      num_classes=10,
      image_shape=(8, 8, 1),
      mean=mean,
      std=std,
      images=images[idx],
      labels=labels[idx],
  )


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
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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
  if not path.is_file():
    raise FileNotFoundError(f"IDX file not found: {path}")
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f"{path}: corrupt gzip data ({e})") from e
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
  stems = [stem for pair in _IDX_FILES.values() for stem in pair]
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
  if split not in _IDX_FILES:
    raise ValueError(f"unknown split {split!r} for IDX files; valid splits: {', '.join(_IDX_FILES)}")
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"IDX directory not found: {directory}")
  images_path, labels_path = (_find_idx_file(directory, stem) for stem in _IDX_FILES[split])
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


def default_idx_dir(name: str) -> Path | None:
  """The folder ``shared/data/<name>`` near the repository if it holds the IDX files, else None.

  Looks in ``<repo>/shared/data/<name>`` and then ``<repo>/../shared/data/<name>``,
  where ``<repo>`` is the folder that contains the ``maestro_jax`` package.

  Args:
    name: ``'mnist'`` or ``'fashion_mnist'``.

  Returns:
    The first candidate that holds all four IDX files, or None.
  """
  if name not in IDX_DATASETS:
    return None
  repo = Path(__file__).resolve().parents[1]
  for root in (repo, repo.parent):
    candidate = root / "shared" / "data" / name
    if has_idx_files(candidate):
      return candidate
  return None


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool) -> int:
  """Global batches per epoch: ``floor`` with ``drop_remainder``, else ``ceil``."""
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The example order of an epoch: ``default_rng((seed, epoch)).permutation(n)``, or ``arange(n)``."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``float32 (x / 255 - mean) / std`` of ``uint8 (..., C)`` images, per channel."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) * np.float32(1 / 255) - mean) / std


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, *, padding: int = 4) -> np.ndarray:
  """Crops each zero-padded image at ``offsets`` and mirrors it where ``flips``.

  Args:
    images: ``(B, H, W, C)`` images.
    offsets: ``int (B, 2)`` top-left ``(row, col)`` of each crop in the padded
      image, in ``0..2 * padding``; ``(padding, padding)`` is the identity crop.
    flips: ``bool (B,)``; True mirrors the image left-right.
    padding: zero pixels added on each side before cropping.

  Returns:
    The ``(B, H, W, C)`` images, same dtype.
  """
  b, h, w, _ = images.shape
  offsets = np.asarray(offsets)
  if offsets.shape != (b, 2) or offsets.min(initial=0) < 0 or offsets.max(initial=0) > 2 * padding:
    raise ValueError(f"offsets must be (B, 2) = ({b}, 2) in 0..{2 * padding}, got shape {offsets.shape}")
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, :1] + np.arange(h)
  cols = offsets[:, 1:] + np.arange(w)
  cols = np.where(np.asarray(flips, bool)[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def sample_crop_flip(
    rng: np.random.Generator, batch_size: int, *, padding: int = 4
) -> tuple[np.ndarray, np.ndarray]:
  """Uniform crop ``offsets (B, 2)`` in ``0..2 * padding`` and fair-coin ``flips (B,)``."""
  offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
  flips = rng.random(batch_size) < 0.5
  return offsets, flips


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need 0 <= process_index < process_count, got {index} and {count}")
  return index, count


def batches(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    train: bool = True,
    shuffle: bool | None = None,
    drop_remainder: bool | None = None,
    augment: bool | None = None,
    padding: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each global batch of one epoch, from ``start_batch`` on.

  Args:
    source: the data.
    batch_size: the global batch size; a multiple of ``process_count``.
    seed: non-negative seed of the shuffle and the augmentation.
    epoch: non-negative epoch number; each epoch has its own order.
    start_batch: the first global batch to yield (to resume mid-epoch).
    train: picks the defaults below: shuffled, remainder dropped, CIFAR
      augmentation for training; in order, padded, unaugmented otherwise.
    shuffle: permute the examples (default: ``train``).
    drop_remainder: drop a final partial batch instead of padding it (default:
      ``train``).
    augment: random crop and flip (default: ``train`` and a CIFAR dataset).
    padding: the zero padding of the random crop.
    process_index: this process (default: ``jax.process_index()``).
    process_count: the number of processes (default: ``jax.process_count()``).

  Returns:
    An iterator of ``{'image': float32 (b, H, W, C), 'label': int32 (b,),
    'mask': bool (b,), 'index': int32 (b,)}`` with ``b = batch_size /
    process_count``; padding rows have zero images and labels, ``mask`` False
    and ``index`` -1.

  Raises:
    ValueError: bad sizes, seeds or positions (raised here, not on iteration).
  """
  shuffle = train if shuffle is None else shuffle
  drop_remainder = train if drop_remainder is None else drop_remainder
  augment = (train and source.name in CIFAR_DATASETS) if augment is None else augment
  index, count = _process(process_index, process_count)
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size must be a positive multiple of process_count={count}, got {batch_size}")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got {seed} and {epoch}")
  total = num_batches(len(source), batch_size, drop_remainder=drop_remainder)
  if not 0 <= start_batch <= total:
    raise ValueError(f"start_batch must be in 0..{total} for {total} batches per epoch, got {start_batch}")
  order = epoch_order(len(source), seed=seed, epoch=epoch, shuffle=shuffle)
  return _batches(
      source, order, batch_size, index, count, range(start_batch, total), seed, epoch, augment, padding
  )


def _batches(source, order, batch_size, index, count, batch_range, seed, epoch, augment, padding):
  per_host = batch_size // count
  first = index * per_host
  for b in batch_range:
    positions = b * batch_size + first + np.arange(per_host)
    valid = positions[positions < len(order)]
    ids = order[valid]
    images, labels = source.take(ids)
    if augment:
      offsets, flips = sample_crop_flip(np.random.default_rng((seed, epoch, b, 1)), batch_size, padding=padding)
      mine = slice(first, first + len(ids))
      images = crop_flip(images, offsets[mine], flips[mine], padding=padding)
    batch = {
        "image": normalize(images, source.mean, source.std),
        "label": labels.astype(np.int32),
        "mask": np.ones(len(ids), bool),
        "index": ids.astype(np.int32),
    }
    if len(ids) < per_host:
      batch = {k: _pad(v, per_host, -1 if k == "index" else 0) for k, v in batch.items()}
    yield batch


def _pad(x: np.ndarray, size: int, value) -> np.ndarray:
  out = np.full((size, *x.shape[1:]), value, x.dtype)
  out[: len(x)] = x
  return out


def train_stream(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    **kwargs: Any,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches for steps ``start_step, start_step + 1, ...`` across epochs.

  Step ``s`` is batch ``s % n`` of epoch ``s // n`` with ``n`` batches per
  epoch, so a run restarted at step ``s`` sees the same batches.

  Args:
    source: the data.
    batch_size: the global batch size.
    seed: the seed.
    start_step: the first step to yield.
    **kwargs: more arguments of :func:`batches` (``train`` is always True).

  Returns:
    An endless iterator of batches.
  """
  drop_remainder = kwargs.get("drop_remainder", True)
  n = num_batches(len(source), batch_size, drop_remainder=True if drop_remainder is None else drop_remainder)
  if n == 0:
    raise ValueError(f"{len(source)} examples make no batch of {batch_size}")
  if start_step < 0:
    raise ValueError(f"start_step must be non-negative, got {start_step}")
  kwargs = {**kwargs, "train": True}
  first = batches(source, batch_size, seed=seed, epoch=start_step // n, start_batch=start_step % n, **kwargs)

  def stream():
    yield from first
    epoch = start_step // n + 1
    while True:
      yield from batches(source, batch_size, seed=seed, epoch=epoch, **kwargs)
      epoch += 1

  return stream()
