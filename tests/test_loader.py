"""The grain input pipeline: deterministic whatever the workers, exact resumption from its state, process shards."""

import numpy as np
import pytest

from maestro_jax import data


def _source(n=96, shape=(8, 8, 3)):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  return data.Source.from_arrays(images, labels, name="cifar10", split="train", num_classes=10)


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _equal(a, b):
  return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_batches_are_normalized_shuffled_and_cover_the_epoch():
  source = _source()
  batches = list(data.grain_loader(source, 16, seed=1, num_epochs=1))
  assert len(batches) == 6 and batches[0]["image"].shape == (16, 8, 8, 3) and batches[0]["image"].dtype == np.float32
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels.tolist()) == sorted(source.labels.tolist())  # every example once
  assert not np.array_equal(labels, source.labels)  # in a shuffled order
  normalized = (source.images / 255.0 - source.mean) / source.std
  assert any(np.allclose(batches[0]["image"][0], normalized[i], atol=1e-5) for i in range(len(source)))


def test_resumes_exactly_from_its_state():
  source = _source()
  uninterrupted = _take(iter(data.grain_loader(source, 16, seed=2, num_epochs=3, augment=True)), 12)
  it = iter(data.grain_loader(source, 16, seed=2, num_epochs=3, augment=True))
  head = _take(it, 5)
  state = it.get_state()
  resumed = iter(data.grain_loader(source, 16, seed=2, num_epochs=3, augment=True))
  resumed.set_state(state)
  assert _equal(head + _take(resumed, 7), uninterrupted)


def test_workers_do_not_change_the_batches_and_resume_exactly():
  source = _source(64)
  alone = list(data.grain_loader(source, 16, seed=3, augment=True, worker_count=0, num_epochs=2))
  workers = list(data.grain_loader(source, 16, seed=3, augment=True, worker_count=2, num_epochs=2))
  assert len(alone) == len(workers) == 8 and _equal(alone, workers)
  assert not _equal(alone[:4], alone[4:])  # each epoch has its own order and augmentation
  it = iter(data.grain_loader(source, 16, seed=3, augment=True, worker_count=2, num_epochs=2))
  head = _take(it, 3)
  resumed = iter(data.grain_loader(source, 16, seed=3, augment=True, worker_count=2, num_epochs=2))
  resumed.set_state(it.get_state())
  assert _equal(head + _take(resumed, 5), alone)


def test_augmentation_changes_images_and_seeds_matter():
  source = _source()
  plain = _take(iter(data.grain_loader(source, 16, seed=4)), 2)
  augmented = _take(iter(data.grain_loader(source, 16, seed=4, augment=True)), 2)
  assert [b["label"].tolist() for b in plain] == [b["label"].tolist() for b in augmented]
  assert not _equal(plain, augmented)
  other = _take(iter(data.grain_loader(source, 16, seed=5)), 2)
  assert not _equal(plain, other)


def test_process_shards_are_disjoint_and_cover_the_epoch():
  source = _source()
  seen = []
  for index in range(2):
    batches = list(data.grain_loader(source, 16, seed=6, shuffle=False, process_index=index, process_count=2))
    assert all(b["image"].shape[0] == 8 for b in batches)
    seen.append(np.concatenate([b["label"] for b in batches]))
  assert sorted(np.concatenate(seen).tolist()) == sorted(source.labels.tolist())


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiple of process_count=2"):
    data.grain_loader(_source(), 15, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="worker_count must be >= 0"):
    data.grain_loader(_source(), 16, worker_count=-1)
  with pytest.raises(ValueError, match="num_epochs must be >= 1"):
    data.grain_loader(_source(), 16, num_epochs=0)
