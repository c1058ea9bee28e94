"""Tests for the input pipeline in maestro_jax.data."""

import gzip
from pathlib import Path
import re

import numpy as np
import pytest
from sklearn.datasets import load_digits

from maestro_jax import data
from maestro_train import layout

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ONE_HOST = {"process_index": 0, "process_count": 1}


def _toy(n=50, shape=(6, 5, 1), name="toy", num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n)
  return data.Source.from_arrays(images, labels, name=name, num_classes=num_classes)


def _equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _by_index(batch_list):
  return {int(i): image for b in batch_list for i, image in zip(b["index"][b["mask"]], b["image"][b["mask"]])}


def _valid_indices(batch_list):
  return np.concatenate([b["index"][b["mask"]] for b in batch_list])


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_tfds_sources_under_mock_data(name, shape, classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10):
    source = data.load(name, "train")
    assert (len(source), source.image_shape, source.num_classes) == (10, shape, classes)
    item = source[3]
    assert item["image"].dtype == np.uint8 and item["image"].shape == shape
    assert 0 <= item["label"] < classes
    for train in (True, False):
      got = list(data.batches(source, 4, seed=1, train=train, **ONE_HOST))
      assert len(got) == (2 if train else 3)
      for b in got:
        assert b["image"].dtype == np.float32 and b["image"].shape == (4, *shape)
        assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
        assert np.isfinite(b["image"]).all()
      valid = _valid_indices(got)
      if not train:
        np.testing.assert_array_equal(valid, np.arange(10))
      labels = np.concatenate([b["label"][b["mask"]] for b in got])
      np.testing.assert_array_equal(labels, [source[int(i)]["label"] for i in valid])


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match=r"not prepared(.|\n)*download=True(.|\n)*idx_dir"):
    data.load("mnist", "train", data_dir=tmp_path)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: digits, mnist, fashion_mnist, cifar10, cifar100"):
    data.load("imagenet", "train")
  with pytest.raises(ValueError, match="idx_dir only applies to mnist, fashion_mnist"):
    data.load("cifar10", "train", idx_dir="/nonexistent")
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    data.load("digits", "validation")


def _write_idx_folder(folder, *, gz, rng, sizes=(7, 3), hw=(5, 6)):
  arrays = {}
  for split, n in zip(("train", "t10k"), sizes):
    images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    data.write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
    data.write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    arrays[split] = images, labels
  return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
  arrays = _write_idx_folder(tmp_path, gz=gz, rng=np.random.default_rng(0))
  assert data.has_idx_files(tmp_path)
  suffix = ".gz" if gz else ""
  raw = (tmp_path / f"train-images-idx3-ubyte{suffix}").read_bytes()
  assert (gzip.decompress(raw) if gz else raw)[:4] == b"\x00\x00\x08\x03"
  for split, stem in (("train", "train"), ("test", "t10k")):
    images, labels = arrays[stem]
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"{stem}-images-idx3-ubyte{suffix}"), images)
    source = data.load("fashion_mnist", split, idx_dir=tmp_path)
    assert source.image_shape == (5, 6, 1) and source.images.dtype == np.uint8
    np.testing.assert_array_equal(source.images[..., 0], images)
    np.testing.assert_array_equal(source.labels, labels)
    assert source.labels.dtype == np.int32


def test_idx_other_dtypes_round_trip(tmp_path):
  for dtype in (np.int8, np.int16, np.int32, np.float32, np.float64):
    array = (np.arange(24) - 7).astype(dtype).reshape(2, 3, 4)
    data.write_idx(tmp_path / "x.gz", array)
    got = data.read_idx(tmp_path / "x.gz")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, array)


def test_idx_corrupt_magic_is_a_clear_error(tmp_path):
  _write_idx_folder(tmp_path, gz=False, rng=np.random.default_rng(0))
  path = tmp_path / "train-images-idx3-ubyte"
  raw = path.read_bytes()
  path.write_bytes(b"\x12\x34" + raw[2:])
  with pytest.raises(ValueError, match=r"not an IDX file: magic number 0x12340803"):
    data.load("mnist", "train", idx_dir=tmp_path)
  # Labels where images belong: valid IDX, wrong kind.
  path.write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes())
  with pytest.raises(ValueError, match=r"expected uint8 images \(magic 0x00000803\)"):
    data.load("mnist", "train", idx_dir=tmp_path)
  path.write_bytes(raw[:-5])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    data.load("mnist", "train", idx_dir=tmp_path)
  gz_path = tmp_path / "train-images-idx3-ubyte.gz"
  path.unlink()
  gz_path.write_bytes(gzip.compress(raw)[:-8])
  with pytest.raises(ValueError, match="corrupt gzip data"):
    data.load("mnist", "train", idx_dir=tmp_path)


def test_idx_missing_file_names_the_path(tmp_path):
  _write_idx_folder(tmp_path, gz=True, rng=np.random.default_rng(0))
  missing = tmp_path / "t10k-labels-idx1-ubyte.gz"
  missing.unlink()
  assert not data.has_idx_files(tmp_path)
  data.load("mnist", "train", idx_dir=tmp_path)  # The train files are all there.
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    data.load("mnist", "test", idx_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
    data.load("mnist", "test", idx_dir=tmp_path / "nope")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx_files(name):
  folder = SHARED_DATA / name
  if not data.has_idx_files(folder):
    pytest.skip(f"no IDX files at {folder} (optional shared data)")
  assert layout.find_idx_dir(name) is not None
  train = data.load(name, "train", idx_dir=folder)
  test = data.load(name, "test", idx_dir=folder)
  assert (len(train), len(test)) == (60000, 10000)
  for source in (train, test):
    assert source.image_shape == (28, 28, 1) and source.images.shape[1:] == (28, 28, 1)
    assert source.labels.min() == 0 and source.labels.max() == 9
  # The normalization constants are the training set's own statistics.
  mean, std = data.pixel_stats(train.images)
  np.testing.assert_allclose(mean, train.mean, atol=1e-4)
  np.testing.assert_allclose(std, train.std, atol=1e-4)


def test_runner_finds_idx_folders_in_or_beside_the_repository(tmp_path, monkeypatch):
  # The search is the runner's (idx_dir='auto'); the library only reads folders it is given.
  assert not hasattr(data, "default_idx_dir")
  repo = tmp_path / "repo"
  monkeypatch.setattr(layout, "REPO", repo)
  assert layout.find_idx_dir("mnist") is None
  beside = tmp_path / "shared" / "data" / "mnist"
  beside.mkdir(parents=True)
  _write_idx_folder(beside, gz=True, rng=np.random.default_rng(0))
  assert layout.find_idx_dir("mnist") == beside
  inside = repo / "shared" / "data" / "mnist"
  inside.mkdir(parents=True)
  _write_idx_folder(inside, gz=False, rng=np.random.default_rng(1))
  assert layout.find_idx_dir("mnist") == inside  # The repository's own folder comes first.
  assert layout.find_idx_dir("fashion_mnist") is None and layout.find_idx_dir("digits") is None


def test_digits_split_is_reproducible_and_disjoint():
  train, test = data.load("digits", "train"), data.load("digits", "test")
  assert (len(train), len(test)) == (1438, 359)
  assert train.image_shape == test.image_shape == (8, 8, 1) and train.num_classes == 10
  assert train.images.dtype == np.uint8 and train.images.max() == 255
  again = data.load("digits", "test")
  np.testing.assert_array_equal(again.images, test.images)
  np.testing.assert_array_equal(again.labels, test.labels)
  np.testing.assert_array_equal(train.mean, test.mean)  # Both use training statistics.
  digits = load_digits()
  train_idx, test_idx = data.stratified_split(digits.target, test_fraction=0.2, seed=0)
  assert np.intersect1d(train_idx, test_idx).size == 0
  np.testing.assert_array_equal(np.union1d(train_idx, test_idx), np.arange(1797))
  np.testing.assert_array_equal(test.labels, digits.target[test_idx])
  np.testing.assert_array_equal(test.images[..., 0], np.rint(digits.images[test_idx] * 255 / 16))
  # Stratified: every class is about 20% test.
  fractions = np.bincount(test.labels) / np.bincount(digits.target)
  assert np.all(np.abs(fractions - 0.2) < 0.01)


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def test_shuffling_is_seeded_per_epoch_and_a_permutation():
  source = _toy(50)
  run = lambda **kw: list(data.batches(source, 8, seed=3, drop_remainder=False, **ONE_HOST, **kw))
  epoch0, epoch1 = run(epoch=0), run(epoch=1)
  _equal_batches(epoch0, run(epoch=0))
  order0, order1 = _valid_indices(epoch0), _valid_indices(epoch1)
  assert not np.array_equal(order0, order1)
  other_seed = list(data.batches(source, 8, seed=4, drop_remainder=False, **ONE_HOST))
  assert not np.array_equal(order0, _valid_indices(other_seed))
  for order in (order0, order1):
    np.testing.assert_array_equal(np.sort(order), np.arange(50))
  np.testing.assert_array_equal(order0, data.epoch_order(50, seed=3, epoch=0))
  for b in epoch0:
    m = b["mask"]
    np.testing.assert_array_equal(b["label"][m], source.labels[b["index"][m]])
    expected = data.normalize(source.images[b["index"][m]], source.mean, source.std)
    np.testing.assert_allclose(b["image"][m], expected)
  # Training drops the remainder: 6 full batches, 48 distinct examples.
  train = list(data.batches(source, 8, seed=3, **ONE_HOST))
  assert len(train) == 6 and all(b["mask"].all() for b in train)
  assert len(np.unique(_valid_indices(train))) == 48


@pytest.mark.parametrize("augment", [False, True])
def test_resume_mid_epoch_gives_the_tail(augment):
  source = _toy(40, shape=(8, 8, 3))
  full = list(data.batches(source, 6, seed=7, epoch=2, augment=augment, **ONE_HOST))
  assert len(full) == 6
  for k in (0, 1, 4, 6):
    _equal_batches(list(data.batches(source, 6, seed=7, epoch=2, start_batch=k, augment=augment, **ONE_HOST)),
                   full[k:])
  with pytest.raises(ValueError, match="start_batch must be in 0..6"):
    data.batches(source, 6, start_batch=7, **ONE_HOST)


def test_train_stream_resumes_across_epochs():
  source = _toy(20)
  def steps(start, count):
    stream = data.train_stream(source, 6, seed=1, start_step=start, **ONE_HOST)
    return [b for _, b in zip(range(count), stream)]

  full = steps(0, 9)  # 3 batches per epoch: epochs 0, 1, 2.
  _equal_batches(full[:3], list(data.batches(source, 6, seed=1, epoch=0, **ONE_HOST)))
  _equal_batches(full[6:], list(data.batches(source, 6, seed=1, epoch=2, **ONE_HOST)))
  _equal_batches(steps(4, 5), full[4:])


def test_eval_covers_every_example_once_with_a_mask():
  source = _toy(50)
  got = list(data.batches(source, 16, train=False, **ONE_HOST))
  assert len(got) == 4
  assert [int(b["mask"].sum()) for b in got] == [16, 16, 16, 2]
  assert all(b["image"].shape == (16, 6, 5, 1) for b in got)
  np.testing.assert_array_equal(_valid_indices(got), np.arange(50))
  last = got[-1]
  assert (last["index"][2:] == -1).all() and (last["label"][2:] == 0).all() and (last["image"][2:] == 0).all()


def test_crop_flip():
  images = np.random.default_rng(0).integers(1, 256, (3, 5, 7, 2), dtype=np.uint8)
  same = data.crop_flip(images, np.full((3, 2), 4), np.zeros(3, bool), padding=4)
  np.testing.assert_array_equal(same, images)
  flipped = data.crop_flip(images, np.full((3, 2), 4), np.array([True, False, True]), padding=4)
  np.testing.assert_array_equal(flipped[[0, 2]], images[[0, 2], :, ::-1])
  np.testing.assert_array_equal(flipped[1], images[1])
  # Offset (0, 0) moves the image 4 pixels down-right and fills the border with zeros.
  shifted = data.crop_flip(images, np.zeros((3, 2), int), np.zeros(3, bool), padding=4)
  assert shifted.shape == images.shape and shifted.dtype == np.uint8
  np.testing.assert_array_equal(shifted[:, 4:, 4:], images[:, :-4, :-4])
  assert (shifted[:, :4] == 0).all() and (shifted[:, :, :4] == 0).all()


def test_augmentation_is_seeded_and_only_when_asked_for():
  source = _toy(64, shape=(32, 32, 3), name="cifar10")
  plain = data.normalize(source.images, source.mean, source.std)
  run = lambda **kw: list(data.batches(source, 32, **ONE_HOST, **kw))
  augmented = run(seed=5, augment=True)
  _equal_batches(augmented, run(seed=5, augment=True))
  other_seed = _by_index(run(seed=6, augment=True))
  seed5 = _by_index(augmented)
  assert any(not np.array_equal(seed5[i], other_seed[i]) for i in seed5.keys() & other_seed.keys())
  assert augmented[0]["image"].shape == (32, 32, 32, 3)
  changed = [not np.array_equal(b["image"][i], plain[b["index"][i]]) for b in augmented for i in range(32)]
  assert np.mean(changed) > 0.5
  # Not asked for, nothing is augmented: not in training, not in evaluation, whatever the dataset's name.
  for kw in ({"seed": 5}, {"train": False}):
    for b in run(**kw):
      np.testing.assert_array_equal(b["image"], plain[b["index"]])
  # With no padding the crop is the identity: every image is the original or its mirror, both occur.
  mirrored = []
  for b in run(seed=5, padding=0, augment=True):
    for image, i in zip(b["image"], b["index"]):
      same, mirror = np.array_equal(image, plain[i]), np.array_equal(image, plain[i][:, ::-1])
      assert same or mirror
      mirrored.append(mirror)
  assert 0 < np.mean(mirrored) < 1


@pytest.mark.parametrize("train", [True, False])
def test_host_shards_partition_the_global_batch(train):
  source = _toy(45, shape=(8, 8, 3))
  kwargs = {"seed": 2, "epoch": 1, "train": train, "augment": train}  # Augmented when training.
  whole = list(data.batches(source, 8, **kwargs, **ONE_HOST))
  shards = [list(data.batches(source, 8, process_index=i, process_count=2, **kwargs)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(whole) == (5 if train else 6)
  for b, s0, s1 in zip(whole, *shards):
    assert s0["image"].shape == (4, 8, 8, 3)
    for k in b:
      np.testing.assert_array_equal(np.concatenate([s0[k], s1[k]]), b[k], err_msg=k)
    ids0, ids1 = s0["index"][s0["mask"]], s1["index"][s1["mask"]]
    assert np.intersect1d(ids0, ids1).size == 0
  with pytest.raises(ValueError, match="multiple of process_count=2"):
    data.batches(source, 7, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index < process_count"):
    data.batches(source, 8, process_index=2, process_count=2)


def test_preparing_a_tfds_dataset_without_tensorflow_is_one_line(monkeypatch):
  """Reading needs no TensorFlow; preparing does, and the error names the install extra."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
  with pytest.raises(ModuleNotFoundError, match=r"preparing tfds dataset 'cifar10' needs TensorFlow: .*maestro-jax\[prepare\]"):
    data.load("cifar10", "train", download=True)
