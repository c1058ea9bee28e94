"""Input pipeline: image-classification sources, seeded batching, augmentation.

Rooms: ``sources`` (datasets and their metadata), ``idx`` (MNIST-format files),
``batching`` (seeded, resumable, process-sharded batches and augmentation).

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
    of going through tfds. The folder is always given: finding one on the
    machine (the runner's ``idx_dir='auto'``) is the runner's job.

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
  With ``augment=True`` (the runner's CIFAR configs set ``augment``) a batch
  gets a random crop of the image zero-padded by 4 pixels, at the image's
  size, and a random horizontal flip, drawn from
  ``np.random.default_rng((seed, epoch, batch, 1))`` for the whole global batch
  so that the result does not depend on ``process_count``.
"""

from maestro_jax.data.batching import num_batches
from maestro_jax.data.batching import epoch_order
from maestro_jax.data.batching import normalize
from maestro_jax.data.batching import crop_flip
from maestro_jax.data.batching import sample_crop_flip
from maestro_jax.data.batching import process_shard
from maestro_jax.data.batching import batches
from maestro_jax.data.batching import train_stream
from maestro_jax.data.idx import IDX_FILES
from maestro_jax.data.idx import read_idx
from maestro_jax.data.idx import read_maybe_gzipped
from maestro_jax.data.idx import write_idx
from maestro_jax.data.idx import has_idx_files
from maestro_jax.data.idx import load_idx_split
from maestro_jax.data.sources import TFDS_DATASETS
from maestro_jax.data.sources import IDX_DATASETS
from maestro_jax.data.sources import DATASETS
from maestro_jax.data.sources import SPLITS
from maestro_jax.data.sources import Source
from maestro_jax.data.sources import pixel_stats
from maestro_jax.data.sources import load
from maestro_jax.data.sources import stratified_split
from maestro_jax.data.loader import grain_loader

__all__ = [
    "grain_loader",
    "TFDS_DATASETS",
    "IDX_DATASETS",
    "DATASETS",
    "SPLITS",
    "Source",
    "pixel_stats",
    "load",
    "stratified_split",
    "IDX_FILES",
    "read_idx",
    "read_maybe_gzipped",
    "write_idx",
    "has_idx_files",
    "load_idx_split",
    "num_batches",
    "epoch_order",
    "normalize",
    "crop_flip",
    "sample_crop_flip",
    "process_shard",
    "batches",
    "train_stream",
]
