"""Text sources for language models: a character vocabulary, corpora, seeded window batching.

Vocabulary
  :class:`CharVocab` maps characters to token ids: id ``i`` is ``chars[i]``
  (sorted by code point when built from text), and, unless disabled, one more
  id ``len(chars)`` stands for every character the vocabulary does not know
  (decoded as ``unknown``, U+FFFD by default). Without an unknown id, encoding
  an unknown character raises. ``save``/``load`` write it as JSON; the round
  trip is exact.

Sources
  A :class:`TextSource` is one split of a corpus held once in memory: a 1-D
  token array (``uint8`` when the vocabulary has at most 256 ids, else
  ``int32``), its vocabulary, and the names and start offsets of the documents
  it concatenates (documents are joined as they are, with no separator).

  * :func:`read_documents` reads a ``.txt`` or ``.txt.gz`` file (UTF-8; gzip is
    detected from the content) or every such file of a folder.
  * :func:`load_text` splits a file or folder into ``'train'``,
    ``'validation'`` and ``'test'``: whole documents by name, or else contiguous
    tail fractions of the concatenated text. The vocabulary is built from the
    training split only (or given, e.g. loaded from a run's folder).
  * :func:`load_shakespeare` reads the offline folder of 42 works
    (``shared/data/shakespeare``; the runner finds it beside a checkout) and
    holds out whole works: :data:`SHAKESPEARE_VALIDATION` and
    :data:`SHAKESPEARE_TEST`.
  * :func:`load_tfds` reads a prepared tfds text dataset (e.g.
    ``'tiny_shakespeare'``) through ``tfds.data_source``; it never downloads.

Batching
  A window is ``length + 1`` consecutive tokens: the model reads the first
  ``length`` and predicts the last ``length``. Batches are dicts of numpy
  arrays ``{'tokens': int32 (b, length + 1), 'mask': bool (b, length),
  'index': int32 (b,)}``: ``mask`` marks the targets that count, ``index`` is
  each window's start (-1 for padding rows).

  * Training (:func:`train_batches`, :func:`train_stream`): an epoch cuts the
    tokens into ``(N - length) // length`` windows with stride ``length``
    starting at a random offset in ``0..length - 1`` (so window edges move
    between epochs), in the order ``data.epoch_order(n, seed, epoch)``. The
    offset is drawn from ``np.random.default_rng((seed, epoch, 1))``. The
    batch sequence is a pure function of ``(seed, epoch)`` and resumes at any
    batch, exactly like :func:`maestro_jax.data.batches`.
  * Evaluation (:func:`eval_batches`): deterministic windows that score every
    target token once. With ``stride = length`` (the default) the windows do
    not overlap; a smaller stride gives every scored token at least
    ``length - stride`` tokens of context (the first window scores all its
    targets, each later one only its last ``stride``). The last batch is padded
    with masked rows, so shapes stay static for ``jit``.

  ``batch_size`` is global: each process gets the contiguous slice
  ``process_index`` of size ``batch_size / process_count`` of every global
  batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from maestro_jax import data

__all__ = ["CharVocab", "TextSource", "SPLITS", "UNKNOWN", "SHAKESPEARE_VALIDATION", "SHAKESPEARE_TEST",
           "read_text", "read_documents", "load_text", "load_shakespeare", "load_tfds",
           "num_train_batches", "train_batches", "train_stream", "num_eval_windows", "eval_batches"]

SPLITS = ("train", "validation", "test")
UNKNOWN = "\ufffd"

# Whole works held out from the 42 Shakespeare files: two plays each (about 4.6% of the characters each),
# fixed so that every run and every engineer validates and tests on the same text.
SHAKESPEARE_VALIDATION = ("julius_caesar", "twelfth_night")
SHAKESPEARE_TEST = ("macbeth", "much_ado_about_nothing")

_SUFFIXES = (".txt.gz", ".txt")


# ----------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------


def _code_points(text: str) -> np.ndarray:
  # UTF-32 gives one uint32 per character; surrogatepass keeps lone surrogates (valid Python str) encodable.
  return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")


@dataclasses.dataclass(frozen=True)
class CharVocab:
  """A character vocabulary: id ``i`` is ``chars[i]``; id ``len(chars)`` is the unknown character.

  Attributes:
    chars: the known characters, one per id.
    unknown: what the unknown id decodes to; None: there is no unknown id and
      encoding a character outside ``chars`` raises.
  """

  chars: tuple[str, ...]
  unknown: str | None = UNKNOWN

  def __post_init__(self):
    object.__setattr__(self, "chars", tuple(self.chars))
    bad = [c for c in self.chars if not isinstance(c, str) or len(c) != 1]
    if bad:
      raise ValueError(f"CharVocab: every entry must be one character, got {bad[:5]!r}")
    if len(set(self.chars)) != len(self.chars):
      raise ValueError("CharVocab: characters must be unique")
    if self.unknown is not None and self.unknown in self.chars:
      raise ValueError(f"CharVocab: the unknown marker {self.unknown!r} is also a known character; pick another "
                       "marker (unknown=...) so that decoding stays unambiguous")
    code_points = _code_points("".join(self.chars))
    order = np.argsort(code_points, kind="stable")
    # Sorted code points and their ids: encoding is one searchsorted over the whole text.
    object.__setattr__(self, "_sorted_points", code_points[order])
    object.__setattr__(self, "_sorted_ids", order.astype(np.int32))

  @classmethod
  def build(cls, texts: str | Iterable[str], *, unknown: str | None = UNKNOWN) -> CharVocab:
    """The characters of ``texts`` (a string or several), sorted by code point.

    Args:
      texts: the training text.
      unknown: the unknown id's decoded form (None: no unknown id).

    Returns:
      The vocabulary.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    chars = set()
    for text in texts:
      chars.update(text)
    return cls(tuple(sorted(chars)), unknown)

  @property
  def size(self) -> int:
    """The number of ids (known characters, plus one for the unknown id if there is one)."""
    return len(self.chars) + (self.unknown is not None)

  def __len__(self) -> int:
    return self.size

  @property
  def unknown_id(self) -> int | None:
    """The id of unknown characters, ``len(chars)``; None without one."""
    return None if self.unknown is None else len(self.chars)

  @property
  def dtype(self) -> np.dtype:
    """The smallest token dtype: ``uint8`` for at most 256 ids, else ``int32``."""
    return np.dtype(np.uint8) if self.size <= 256 else np.dtype(np.int32)

  def encode(self, text: str) -> np.ndarray:
    """The ids of ``text``, a 1-D array of :attr:`dtype`; unknown characters get :attr:`unknown_id`.

    Raises:
      ValueError: an unknown character when the vocabulary has no unknown id
        (the message lists them).
    """
    points = _code_points(text)
    if not len(self.chars):
      where = np.zeros(len(points), np.int64)
      found = np.zeros(len(points), bool)
    else:
      where = np.minimum(np.searchsorted(self._sorted_points, points), len(self.chars) - 1)
      found = self._sorted_points[where] == points
    ids = self._sorted_ids[where]
    if not found.all():
      if self.unknown is None:
        missing = sorted({chr(p) for p in points[~found][:10_000]})
        raise ValueError(f"CharVocab: {int((~found).sum())} characters are not in the vocabulary (e.g. "
                         f"{''.join(missing[:20])!r}) and it has no unknown id; build it with unknown=...")
      ids = np.where(found, ids, self.unknown_id)
    return ids.astype(self.dtype)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of 1-D ``ids``; the unknown id decodes to :attr:`unknown`.

    Raises:
      ValueError: ids outside ``0..size - 1`` or not 1-D.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"CharVocab.decode: ids must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise ValueError(f"CharVocab.decode: ids must be in 0..{self.size - 1}, got {ids.min()}..{ids.max()}")
    table = self.chars + (() if self.unknown is None else (self.unknown,))
    return "".join(table[i] for i in ids.tolist())

  def to_json(self) -> str:
    """A JSON document (ASCII, characters escaped) from which :meth:`from_json` rebuilds this vocabulary."""
    return json.dumps({"type": "characters", "chars": list(self.chars), "unknown": self.unknown})

  @classmethod
  def from_json(cls, text: str) -> CharVocab:
    """The vocabulary of a :meth:`to_json` document."""
    spec = json.loads(text)
    if not isinstance(spec, dict) or spec.get("type") != "characters":
      raise ValueError("not a character vocabulary: expected a JSON object with type 'characters'")
    return cls(tuple(spec["chars"]), spec.get("unknown"))

  def save(self, path: str | os.PathLike) -> None:
    """Writes :meth:`to_json` to ``path``."""
    Path(path).write_text(self.to_json() + "\n", encoding="ascii")

  @classmethod
  def load(cls, path: str | os.PathLike) -> CharVocab:
    """Reads a vocabulary written by :meth:`save`."""
    return cls.from_json(Path(path).read_text(encoding="ascii"))


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TextSource:
  """One split of a text corpus as one token array.

  Attributes:
    name: the corpus' name.
    split: the split's name.
    tokens: 1-D token ids (``vocab.dtype``).
    vocab: the vocabulary.
    documents: names of the concatenated documents, in order.
    offsets: ``int64 (len(documents) + 1,)``: document ``i`` is
      ``tokens[offsets[i]:offsets[i + 1]]``.
  """

  name: str
  split: str
  tokens: np.ndarray
  vocab: CharVocab
  documents: tuple[str, ...]
  offsets: np.ndarray

  def __post_init__(self):
    if self.tokens.ndim != 1:
      raise ValueError(f"TextSource: tokens must be 1-D, got shape {self.tokens.shape}")
    if self.offsets.shape != (len(self.documents) + 1,) or self.offsets[-1] != len(self.tokens):
      raise ValueError("TextSource: offsets must hold each document's start and end with len(tokens)")

  @classmethod
  def from_documents(cls, documents: Mapping[str, str], vocab: CharVocab, *, name: str = "text",
                     split: str = "train") -> TextSource:
    """Encodes and concatenates ``{document name: text}`` in the mapping's order."""
    arrays = [vocab.encode(text) for text in documents.values()]
    offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros((0,), vocab.dtype)
    return cls(name, split, tokens, vocab, tuple(documents), offsets)

  def __len__(self) -> int:
    return len(self.tokens)

  def text(self, start: int = 0, stop: int | None = None) -> str:
    """The decoded text of ``tokens[start:stop]``."""
    return self.vocab.decode(self.tokens[start:stop])


def read_text(path: str | os.PathLike) -> str:
  """Reads a UTF-8 text file, gunzipping it when its content is gzip.

  Raises:
    FileNotFoundError: no such file.
    ValueError: corrupt gzip data or text that is not UTF-8.
  """
  path = Path(path)
  raw = data.read_maybe_gzipped(path, "text file")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def _document_name(path: Path) -> str:
  for suffix in _SUFFIXES:
    if path.name.endswith(suffix):
      return path.name[: -len(suffix)]
  return path.stem


def read_documents(path: str | os.PathLike) -> dict[str, str]:
  """``{name: text}`` of a text file, or of every ``*.txt``/``*.txt.gz`` file of a folder.

  A document's name is its file name without ``.txt`` / ``.txt.gz``; a folder's
  files are read in sorted name order (not recursively).

  Raises:
    FileNotFoundError: a missing path or a folder without text files.
    ValueError: two files with the same document name, or unreadable text.
  """
  path = Path(path)
  if path.is_file():
    return {_document_name(path): read_text(path)}
  if not path.is_dir():
    raise FileNotFoundError(f"no text file or folder at {path}")
  files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES))
  if not files:
    raise FileNotFoundError(f"no *.txt or *.txt.gz files in {path}")
  documents: dict[str, str] = {}
  for file in files:
    name = _document_name(file)
    if name in documents:
      raise ValueError(f"{path}: two files hold document {name!r} (e.g. {name}.txt and {name}.txt.gz)")
    documents[name] = read_text(file)
  return documents


def _split_by_fraction(documents: Mapping[str, str], validation_fraction: float,
                       test_fraction: float) -> dict[str, dict[str, str]]:
  if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
    raise ValueError(f"need fractions in [0, 1) with a positive remainder for training, got "
                     f"validation_fraction={validation_fraction} and test_fraction={test_fraction}")
  text = "".join(documents.values())
  name = next(iter(documents)) if len(documents) == 1 else "text"
  n = len(text)
  test_start = n - round(test_fraction * n)
  validation_start = test_start - round(validation_fraction * n)
  pieces = {"train": text[:validation_start], "validation": text[validation_start:test_start],
            "test": text[test_start:]}
  return {split: {f"{name}[{split}]": piece} for split, piece in pieces.items()}


def _split_by_name(documents: Mapping[str, str], validation: Sequence[str],
                   test: Sequence[str]) -> dict[str, dict[str, str]]:
  validation, test = tuple(validation), tuple(test)
  unknown = [n for n in validation + test if n not in documents]
  if unknown:
    raise ValueError(f"held-out documents {unknown} are not in the corpus; it has {sorted(documents)}")
  both = set(validation) & set(test)
  if both:
    raise ValueError(f"documents {sorted(both)} are held out for both validation and test")
  held = set(validation) | set(test)
  return {"train": {n: t for n, t in documents.items() if n not in held},
          "validation": {n: documents[n] for n in validation},
          "test": {n: documents[n] for n in test}}


def load_text(path: str | os.PathLike | Mapping[str, str], *, validation: Sequence[str] | None = None,
              test: Sequence[str] | None = None, validation_fraction: float = 0.05, test_fraction: float = 0.05,
              vocab: CharVocab | None = None, unknown: str | None = UNKNOWN,
              name: str | None = None) -> dict[str, TextSource]:
  """Reads a text corpus and splits it into ``'train'``, ``'validation'`` and ``'test'`` sources.

  With ``validation`` or ``test`` given, those documents are held out whole and
  every other document is training text. Otherwise the concatenated text is cut
  in three contiguous pieces: training first, then ``validation_fraction`` and
  ``test_fraction`` of the characters at the end.

  Args:
    path: a file, a folder (see :func:`read_documents`) or ``{name: text}``.
    validation: document names held out for validation.
    test: document names held out for testing.
    validation_fraction: share of the text for validation when no names are given.
    test_fraction: share of the text for testing when no names are given.
    vocab: the vocabulary (e.g. a run's saved one); default: built from the
      training split.
    unknown: the unknown marker of a built vocabulary (None: no unknown id, and
      characters that only occur in held-out text raise).
    name: the corpus' name (default: the file or folder name).

  Returns:
    ``{'train': ..., 'validation': ..., 'test': ...}``; the sources share one vocabulary.
  """
  if isinstance(path, Mapping):
    documents, default_name = dict(path), "text"
  else:
    documents, default_name = read_documents(path), _document_name(Path(path))
  if validation is not None or test is not None:
    parts = _split_by_name(documents, validation or (), test or ())
  else:
    parts = _split_by_fraction(documents, validation_fraction, test_fraction)
  if vocab is None:
    vocab = CharVocab.build(parts["train"].values(), unknown=unknown)
  name = name or default_name
  return {split: TextSource.from_documents(parts[split], vocab, name=name, split=split) for split in SPLITS}


def load_shakespeare(directory: str | os.PathLike, *, vocab: CharVocab | None = None,
                     unknown: str | None = UNKNOWN) -> dict[str, TextSource]:
  """Shakespeare's works with whole works held out: :data:`SHAKESPEARE_VALIDATION` and :data:`SHAKESPEARE_TEST`.

  Args:
    directory: the folder of ``<work>.txt.gz`` files (the runner finds the
      offline copy beside a checkout: ``maestro_train.layout.find_text_dir``).
    vocab: the vocabulary; default: built from the training works.
    unknown: the unknown marker of a built vocabulary.

  Returns:
    ``{'train', 'validation', 'test'}`` sources named ``'shakespeare'``.
  """
  return load_text(directory, validation=SHAKESPEARE_VALIDATION, test=SHAKESPEARE_TEST, vocab=vocab,
                   unknown=unknown, name="shakespeare")


def load_tfds(name: str, *, data_dir: str | os.PathLike | None = None, text_key: str = "text",
              splits: Mapping[str, str] | None = None, vocab: CharVocab | None = None,
              unknown: str | None = UNKNOWN) -> dict[str, TextSource]:
  """A prepared tfds text dataset (e.g. ``'tiny_shakespeare'``), read with ``tfds.data_source``.

  Each record's ``text_key`` feature is one document. Nothing is downloaded.

  Args:
    name: the tfds dataset name.
    data_dir: the tfds data directory (default: tfds' own).
    text_key: the feature that holds the text (bytes or str).
    splits: our split name to the tfds split (default: the same names).
    vocab: the vocabulary; default: built from the training split.
    unknown: the unknown marker of a built vocabulary.

  Returns:
    ``{'train', 'validation', 'test'}`` sources.

  Raises:
    FileNotFoundError: the dataset is not prepared in array_record format.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = dict(splits or {s: s for s in SPLITS})
  documents: dict[str, dict[str, str]] = {}
  for split, tfds_split in splits.items():
    try:
      records = tfds.data_source(name, split=tfds_split, data_dir=None if data_dir is None else os.fspath(data_dir),
                                 download=False, builder_kwargs={"file_format": "array_record"})
    except (KeyError, NotImplementedError, FileNotFoundError) as e:
      raise FileNotFoundError(f"tfds dataset {name!r} (split {tfds_split!r}) is not prepared in array_record format; "
                              f"prepare it once with `tfds build {name} --file_format=array_record`. "
                              f"(tfds said: {type(e).__name__}: {e})") from e
    texts = {}
    for i in range(len(records)):
      value = records[i][text_key]
      texts[f"{name}[{tfds_split}][{i}]"] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    documents[split] = texts
  if vocab is None:
    vocab = CharVocab.build(documents["train"].values(), unknown=unknown)
  return {split: TextSource.from_documents(documents[split], vocab, name=name, split=split) for split in splits}


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def _check_length(length: int) -> None:
  if length < 1:
    raise ValueError(f"length must be positive, got {length}")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  """``int32 (len(starts), length + 1)`` windows; positions past the end are 0."""
  positions = starts[:, None] + np.arange(length + 1)
  inside = positions < len(tokens)
  return np.where(inside, tokens[np.minimum(positions, len(tokens) - 1)], 0).astype(np.int32)


def num_train_batches(source: TextSource, batch_size: int, length: int) -> int:
  """Training batches per epoch: ``((N - length) // length) // batch_size`` (the same every epoch)."""
  _check_length(length)
  return max(len(source) - length, 0) // length // batch_size


def train_batches(source: TextSource, batch_size: int, length: int, *, seed: int = 0, epoch: int = 0,
                  start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each global training batch of one epoch, from ``start_batch`` on.

  Args:
    source: the training text.
    batch_size: the global batch size; a multiple of ``process_count``.
    length: the model's input length; windows hold ``length + 1`` tokens.
    seed: non-negative seed of the offset and the order.
    epoch: non-negative epoch number.
    start_batch: the first global batch to yield (to resume mid-epoch).
    process_index: this process (default: ``jax.process_index()``).
    process_count: the number of processes (default: ``jax.process_count()``).

  Returns:
    An iterator of ``{'tokens': int32 (b, length + 1), 'mask': bool (b, length),
    'index': int32 (b,)}`` with ``b = batch_size / process_count``; the last
    partial batch of windows is dropped.

  Raises:
    ValueError: bad sizes, seeds or positions (raised here, not on iteration).
  """
  index, count = data.process_shard(process_index, process_count)
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size must be a positive multiple of process_count={count}, got {batch_size}")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got {seed} and {epoch}")
  total = num_train_batches(source, batch_size, length)
  if not 0 <= start_batch <= total:
    raise ValueError(f"start_batch must be in 0..{total} for {total} batches per epoch, got {start_batch}")
  windows = max(len(source) - length, 0) // length
  offset = int(np.random.default_rng((seed, epoch, 1)).integers(0, length))
  starts = offset + length * data.epoch_order(windows, seed=seed, epoch=epoch)
  per_host = batch_size // count

  def generate():
    for b in range(start_batch, total):
      mine = starts[b * batch_size + index * per_host:][:per_host]
      yield {"tokens": _windows(source.tokens, mine, length), "mask": np.ones((per_host, length), bool),
             "index": mine.astype(np.int32)}

  return generate()


def train_stream(source: TextSource, batch_size: int, length: int, *, seed: int = 0, start_step: int = 0,
                 **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches for steps ``start_step, start_step + 1, ...`` across epochs.

  Step ``s`` is batch ``s % n`` of epoch ``s // n`` with ``n`` batches per epoch,
  so a run restarted at step ``s`` sees the same batches.

  Args:
    source: the training text.
    batch_size: the global batch size.
    length: the model's input length.
    seed: the seed.
    start_step: the first step to yield.
    **kwargs: ``process_index`` / ``process_count`` of :func:`train_batches`.

  Returns:
    An endless iterator of batches.
  """
  n = num_train_batches(source, batch_size, length)
  if n == 0:
    raise ValueError(f"{len(source)} tokens make no batch of {batch_size} windows of {length + 1}")
  if start_step < 0:
    raise ValueError(f"start_step must be non-negative, got {start_step}")
  first = train_batches(source, batch_size, length, seed=seed, epoch=start_step // n, start_batch=start_step % n,
                        **kwargs)

  def stream():
    yield from first
    epoch = start_step // n + 1
    while True:
      yield from train_batches(source, batch_size, length, seed=seed, epoch=epoch, **kwargs)
      epoch += 1

  return stream()


def _eval_stride(length: int, stride: int | None) -> int:
  _check_length(length)
  stride = length if stride is None else stride
  if not 1 <= stride <= length:
    raise ValueError(f"stride must be in 1..length={length}, got {stride}")
  return stride


def num_eval_windows(num_tokens: int, length: int, *, stride: int | None = None) -> int:
  """Windows :func:`eval_batches` needs to score all ``num_tokens - 1`` targets once."""
  stride = _eval_stride(length, stride)
  targets = max(num_tokens - 1, 0)
  if targets == 0:
    return 0
  return 1 + -(-max(targets - length, 0) // stride)


def eval_batches(source: TextSource, batch_size: int, length: int, *, stride: int | None = None,
                 max_windows: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic evaluation windows scoring every target token of ``source`` exactly once.

  Window ``w`` starts at ``w * stride``; window 0 scores all its ``length``
  targets, every later window only its last ``stride`` (the ones no earlier
  window scored). Targets past the end are masked; the last batch is padded
  with fully masked rows (``index == -1``).

  Args:
    source: the held-out text.
    batch_size: the global batch size; a multiple of ``process_count``.
    length: the model's input length.
    stride: step between windows, ``1..length`` (default ``length``: no overlap).
    max_windows: evaluate only the first this many windows (a quick estimate).
    process_index: this process (default: ``jax.process_index()``).
    process_count: the number of processes (default: ``jax.process_count()``).

  Returns:
    An iterator of ``{'tokens': int32 (b, length + 1), 'mask': bool (b, length),
    'index': int32 (b,)}``; the masks add up to ``len(source) - 1`` over all
    processes (fewer with ``max_windows``).
  """
  stride = _eval_stride(length, stride)
  index, count = data.process_shard(process_index, process_count)
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size must be a positive multiple of process_count={count}, got {batch_size}")
  windows = num_eval_windows(len(source), length, stride=stride)
  if max_windows is not None:
    windows = min(windows, max_windows)
  per_host = batch_size // count
  targets = len(source) - 1

  def generate():
    for b in range(data.num_batches(windows, batch_size, drop_remainder=False)):
      ids = b * batch_size + index * per_host + np.arange(per_host)
      valid = ids < windows
      starts = np.where(valid, ids * stride, 0)
      # Target j of window w is token starts + j + 1; it counts if it is new and inside the text.
      position = starts[:, None] + np.arange(1, length + 1)
      first_new = np.where(ids == 0, 0, length - stride)[:, None]
      mask = valid[:, None] & (np.arange(length) >= first_new) & (position <= targets)
      tokens = np.where(valid[:, None], _windows(source.tokens, starts, length), 0)
      yield {"tokens": tokens, "mask": mask, "index": np.where(valid, starts, -1).astype(np.int32)}

  return generate()
