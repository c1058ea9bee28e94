"""Seeded, resumable, process-sharded batching and random crop-and-flip augmentation (see maestro_jax.data)."""


from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from maestro_jax.data.sources import Source


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


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """``(process_index, process_count)``, each defaulting to JAX's own; checks ``0 <= index < count``."""
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
    augment: bool = False,
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
    train: picks the defaults below: shuffled and remainder dropped for
      training; in order and padded otherwise.
    shuffle: permute the examples (default: ``train``).
    drop_remainder: drop a final partial batch instead of padding it (default:
      ``train``).
    augment: a random crop of the image zero-padded by ``padding`` and a
      random horizontal flip. Off unless asked for: whether a dataset is
      augmented is the caller's choice (the runner's config), not a property
      of its name.
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
  index, count = process_shard(process_index, process_count)
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
