"""Image-classification sources: tfds data sources, scikit-learn's digits, offline IDX files (see maestro_jax.data)."""


from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import importlib.util
import operator
import os
from typing import Any

import numpy as np


from maestro_jax.data.idx import load_idx_split

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
IDX_DATASETS = ("mnist", "fashion_mnist")
DATASETS = ("digits",) + TFDS_DATASETS
SPLITS = ("train", "test")


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
      name: dataset name.
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

  if download and importlib.util.find_spec("tensorflow") is None:
    # Reading a prepared dataset needs no TensorFlow; preparing (downloading and converting) an image dataset does.
    raise ModuleNotFoundError(f"preparing tfds dataset {name!r} needs TensorFlow: pip install 'maestro-jax[prepare]' "
                              "(or prepare it once elsewhere and pass data_dir)")
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
