"""Tests of the text sources: vocabulary, corpora and splits, window batching."""

import gzip

import numpy as np
import pytest

from maestro_jax import text
from maestro_train import layout

ONE_HOST = dict(process_index=0, process_count=1)


def _corpus(num_works=5, words=300, seed=0):
  """Generated "works": random words over a small alphabet, each work with its own title line."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghij"))
  works = {}
  for w in range(num_works):
    body = " ".join("".join(rng.choice(letters, rng.integers(1, 7))) for _ in range(words))
    works[f"work_{w}"] = f"WORK {w}\n{body}\n"
  return works


@pytest.fixture
def folder(tmp_path):
  works = _corpus()
  for i, (name, body) in enumerate(works.items()):
    if i % 2:
      (tmp_path / f"{name}.txt.gz").write_bytes(gzip.compress(body.encode()))
    else:
      (tmp_path / f"{name}.txt").write_text(body, encoding="utf-8")
  (tmp_path / "README.md").write_text("not a work")
  return tmp_path, works


# ----------------------------------------------------------------------------------------- vocabulary


def test_vocab_round_trip_and_unknown_characters(tmp_path):
  training = "Héllo, wörld!\n\t\u2603 \U0001F600 \ud800 'quoted' \"double\" \\"
  vocab = text.CharVocab.build(training)
  assert vocab.chars == tuple(sorted(set(training)))
  assert vocab.size == len(vocab.chars) + 1 and vocab.unknown_id == len(vocab.chars)
  ids = vocab.encode(training)
  assert ids.dtype == np.uint8 and ids.shape == (len(training),)
  assert vocab.decode(ids) == training
  np.testing.assert_array_equal(ids, [vocab.chars.index(c) for c in training])

  vocab.save(tmp_path / "vocab.json")
  loaded = text.CharVocab.load(tmp_path / "vocab.json")
  assert loaded == vocab
  np.testing.assert_array_equal(loaded.encode(training), ids)

  # Characters that training never saw all map to the unknown id and decode to the marker.
  unseen = vocab.encode("Hz\u00e9Q")
  np.testing.assert_array_equal(unseen, [vocab.chars.index("H"), vocab.unknown_id, vocab.chars.index("é"),
                                         vocab.unknown_id])
  assert vocab.decode(unseen) == f"H{text.UNKNOWN}é{text.UNKNOWN}"

  strict = text.CharVocab.build(training, unknown=None)
  assert strict.size == len(strict.chars) and strict.unknown_id is None
  assert text.CharVocab.from_json(strict.to_json()) == strict
  with pytest.raises(ValueError, match="not in the vocabulary"):
    strict.encode("Hz")
  with pytest.raises(ValueError, match="also a known character"):
    text.CharVocab.build("ab?", unknown="?")
  with pytest.raises(ValueError, match="ids must be in"):
    vocab.decode([vocab.size])


def test_vocab_with_more_than_256_ids_uses_int32():
  training = "".join(chr(0x400 + i) for i in range(300))
  vocab = text.CharVocab.build(training)
  ids = vocab.encode(training[::-1])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.arange(300)[::-1])


# ------------------------------------------------------------------------------------------- sources


def test_folder_of_txt_and_gz_files_with_whole_works_held_out(folder):
  path, works = folder
  assert text.read_documents(path) == works
  splits = text.load_text(path, validation=["work_1"], test=["work_3", "work_4"])
  assert splits["train"].documents == ("work_0", "work_2")
  assert splits["validation"].documents == ("work_1",)
  assert splits["test"].documents == ("work_3", "work_4")
  assert splits["train"].text() == works["work_0"] + works["work_2"]
  test = splits["test"]
  np.testing.assert_array_equal(test.tokens[test.offsets[1]:], test.vocab.encode(works["work_4"]))
  names = [set(s.documents) for s in splits.values()]
  assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
  assert all(s.vocab is splits["train"].vocab for s in splits.values())
  # The vocabulary comes from the training works only: held-out characters are unknown.
  assert "3" not in splits["train"].vocab.chars
  assert splits["test"].text().startswith(f"WORK {text.UNKNOWN}\n")

  with pytest.raises(ValueError, match="not in the corpus"):
    text.load_text(path, validation=["hamlet"])
  with pytest.raises(ValueError, match="both validation and test"):
    text.load_text(path, validation=["work_1"], test=["work_1"])


def test_single_file_split_by_fraction(tmp_path):
  body = "".join(_corpus(num_works=2).values())
  (tmp_path / "corpus.txt").write_text(body, encoding="utf-8")
  splits = text.load_text(tmp_path / "corpus.txt", validation_fraction=0.1, test_fraction=0.2)
  assert splits["train"].name == "corpus"
  assert "".join(s.text() for s in splits.values()) == body
  assert len(splits["validation"]) == round(0.1 * len(body)) and len(splits["test"]) == round(0.2 * len(body))


@pytest.mark.skipif(layout.find_text_dir("shakespeare") is None, reason="the offline Shakespeare folder is absent")
def test_shakespeare_holds_out_whole_works():
  splits = text.load_shakespeare(layout.find_text_dir("shakespeare"))
  train, validation, test = (splits[s] for s in text.SPLITS)
  assert validation.documents == text.SHAKESPEARE_VALIDATION and test.documents == text.SHAKESPEARE_TEST
  assert len(train.documents) + len(validation.documents) + len(test.documents) == 42
  assert not set(train.documents) & (set(validation.documents) | set(test.documents))
  assert train.tokens.dtype == np.uint8 and len(train) > 4_000_000
  assert 60 <= train.vocab.size <= 100
  assert text.read_text(layout.find_text_dir("shakespeare") / "macbeth.txt.gz")[:2000] == test.text(0, 2000)


def test_tfds_text_dataset_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=2):
    splits = text.load_tfds("tiny_shakespeare")
  assert {s: len(splits[s].documents) for s in text.SPLITS} == {"train": 2, "validation": 2, "test": 2}
  assert len(splits["train"]) > 0 and splits["train"].vocab.size > 1


# ------------------------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def source():
  body = "".join(_corpus(num_works=2, words=200).values())
  return text.load_text({"doc": body}, validation_fraction=0.0, test_fraction=0.0)["train"]


def test_train_batches_are_seeded_windows_of_the_text(source):
  length, batch = 16, 4
  n = text.num_train_batches(source, batch, length)
  assert n == (len(source) - length) // length // batch and n > 3
  epoch = list(text.train_batches(source, batch, length, seed=3, epoch=1, **ONE_HOST))
  assert len(epoch) == n
  for b in epoch:
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (batch, length + 1)
    assert b["mask"].shape == (batch, length) and b["mask"].all()
    for row, start in zip(b["tokens"], b["index"]):
      np.testing.assert_array_equal(row, source.tokens[start:start + length + 1])
  starts = np.concatenate([b["index"] for b in epoch])
  # One offset per epoch, stride `length`: distinct windows that do not overlap in their targets.
  assert len(set(starts.tolist())) == len(starts) and len({s % length for s in starts.tolist()}) == 1
  same = list(text.train_batches(source, batch, length, seed=3, epoch=1, **ONE_HOST))
  for a, b in zip(epoch, same):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  # Window edges move from epoch to epoch.
  offsets = {int(next(text.train_batches(source, batch, length, seed=3, epoch=e, **ONE_HOST))["index"][0]) % length
             for e in range(5)}
  assert len(offsets) > 1
  for other in (dict(seed=4, epoch=1), dict(seed=3, epoch=2)):
    first = next(text.train_batches(source, batch, length, **other, **ONE_HOST))
    assert not np.array_equal(first["index"], epoch[0]["index"])


def test_training_resumes_mid_epoch_and_across_epochs(source):
  length, batch = 16, 4
  n = text.num_train_batches(source, batch, length)
  tail = list(text.train_batches(source, batch, length, seed=1, start_batch=2, **ONE_HOST))
  full = list(text.train_batches(source, batch, length, seed=1, **ONE_HOST))
  assert len(tail) == n - 2
  for a, b in zip(tail, full[2:]):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  stream = text.train_stream(source, batch, length, seed=1, **ONE_HOST)
  steps = [next(stream)["index"] for _ in range(2 * n + 3)]
  resumed = text.train_stream(source, batch, length, seed=1, start_step=n + 1, **ONE_HOST)
  for s in range(n + 1, 2 * n + 3):
    np.testing.assert_array_equal(next(resumed)["index"], steps[s])
  assert not np.array_equal(steps[0], steps[n])  # epochs differ


def test_processes_split_each_global_batch(source):
  length, batch = 8, 6
  whole = list(text.train_batches(source, batch, length, seed=2, **ONE_HOST))
  parts = [list(text.train_batches(source, batch, length, seed=2, process_index=i, process_count=3))
           for i in range(3)]
  for b, (p0, p1, p2) in zip(whole, zip(*parts)):
    np.testing.assert_array_equal(np.concatenate([p0["tokens"], p1["tokens"], p2["tokens"]]), b["tokens"])
  with pytest.raises(ValueError, match="multiple of process_count"):
    text.train_batches(source, 4, length, process_index=0, process_count=3)


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_eval_batches_score_every_target_once(source, stride):
  length, batch = 8, 5
  piece = text.TextSource.from_documents({"d": source.text(0, 103)}, source.vocab, split="validation")
  got = list(text.eval_batches(piece, batch, length, stride=stride, **ONE_HOST))
  windows = text.num_eval_windows(len(piece), length, stride=stride)
  assert len(got) == -(-windows // batch)
  scored = []
  for b in got:
    assert b["tokens"].shape == (batch, length + 1) and b["mask"].shape == (batch, length)
    for row, mask, start in zip(b["tokens"], b["mask"], b["index"]):
      if start < 0:
        assert not mask.any()
        continue
      inside = min(length + 1, len(piece) - start)
      np.testing.assert_array_equal(row[:inside], piece.tokens[start:start + inside])
      scored += (start + 1 + np.flatnonzero(mask)).tolist()
  assert sorted(scored) == list(range(1, len(piece)))
  again = list(text.eval_batches(piece, batch, length, stride=stride, **ONE_HOST))
  for a, b in zip(got, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  if stride == 5:  # every scored target after the first window has at least length - stride tokens of context
    for b in got:
      for mask, start in zip(b["mask"], b["index"]):
        if start > 0:
          assert np.flatnonzero(mask).min() >= length - 5
