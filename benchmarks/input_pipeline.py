"""Input pipelines compared on CIFAR-shaped data: data.batches against data.grain_loader, ratios from one run.

Usage: ``python benchmarks/input_pipeline.py`` (two repetitions; about a minute on 2 CPU cores).
"""

import time

import numpy as np

from maestro_jax import data


def batches_per_second(make_batches) -> float:
  start = time.perf_counter()
  count = sum(1 for _ in make_batches())
  return count / (time.perf_counter() - start)


def main():
  """Batches per second of the numpy batcher and the grain loader (0 and 2 workers), augmentation on."""
  rng = np.random.default_rng(0)
  n = 8192
  source = data.Source.from_arrays(rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                                   rng.integers(0, 10, n).astype(np.int32), name="cifar10", split="train",
                                   num_classes=10)
  for _ in range(2):
    base = batches_per_second(lambda: data.batches(source, 128, seed=0, epoch=0, train=True, augment=True))
    alone = batches_per_second(lambda: data.grain_loader(source, 128, seed=0, augment=True, worker_count=0))
    workers = batches_per_second(lambda: data.grain_loader(source, 128, seed=0, augment=True, worker_count=2))
    print(f"batches/s: numpy batcher {base:.1f}, grain 0 workers {alone:.1f} ({alone / base:.2f}x), "
          f"grain 2 workers {workers:.1f} ({workers / base:.2f}x)")


if __name__ == "__main__":
  main()
