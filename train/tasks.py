"""The tasks the runner trains, one registry entry each: what a batch is, how it is scored, what the metrics are called.

Every task hands the library the same batch form, ``{'image', 'label',
'mask'?}``: for classification an image batch and its labels; for language
modelling ``image = tokens[:, :-1]`` and ``label = tokens[:, 1:]`` with a
per-token ``mask``, so the library's train step, evaluation, vmapped sweep and
greedy search (all means over unmasked labels) compute next-token
cross-entropy averaged over tokens without knowing about text.

A task is chosen by ``config.task``; :data:`TASKS` maps names to task objects.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_FILE = "vocab.json"


@dataclasses.dataclass
class Sources:
  """A task's loaded data.

  Attributes:
    train: the training source.
    evaluation: the held-out source scored every epoch, by sweeps and by exports
      (classification: the test split; language modelling: the validation works).
    test: the test source (language modelling; the same as ``evaluation`` for classification).
    factory_args: what a model factory may take: ``num_classes`` and
      ``image_shape``, or ``vocab_size`` and ``max_len``.
    vocab: the character vocabulary (language modelling), else None.
  """
  train: Any
  evaluation: Any
  test: Any
  factory_args: dict[str, Any]
  vocab: Any = None


@dataclasses.dataclass(frozen=True)
class Metric:
  """How a task's headline metric is recorded and shown."""
  key: str          # record and summary key, e.g. 'test_accuracy'
  label: str        # axis label
  scale: float      # shown value = scale * recorded value (100 for percentages)
  higher_is_better: bool


class Classification:
  """Image classification: ``image`` (B, H, W, C) float32, ``label`` (B,) int32; accuracy and cross-entropy."""
  name = "classification"
  eval_split = "test"
  headline = Metric("test_accuracy", "test accuracy (%)", 100.0, True)
  per_token = False

  def datasets(self) -> tuple[str, ...]:
    from maestro_jax import data as data_lib
    return tuple(data_lib.DATASETS)

  def zoo(self) -> dict[str, Any]:
    from maestro_jax import models
    return dict(models.MODELS)

  def build_zoo_model(self, name: str, sources: Sources, *, factorized: bool, rngs, kwargs: Mapping[str, Any]):
    from maestro_jax import models
    return models.make_model(name, num_classes=sources.factory_args["num_classes"],
                             image_shape=sources.factory_args["image_shape"], factorized=factorized, rngs=rngs,
                             **kwargs)

  def load(self, config, workdir: Path | None = None) -> Sources:
    """The train and test sources of the configured dataset."""
    del workdir  # nothing of a classification run's data is saved with it
    from maestro_jax import data as data_lib
    idx_dir = config.idx_dir
    if idx_dir == "auto":
      from maestro_train import layout  # pylint: disable=import-outside-toplevel
      idx_dir = layout.find_idx_dir(config.dataset)
    kw = dict(data_dir=config.data_dir, download=config.download, idx_dir=idx_dir)
    train, test = data_lib.load(config.dataset, "train", **kw), data_lib.load(config.dataset, "test", **kw)
    return Sources(train, test, test, {"num_classes": int(train.num_classes),
                                       "image_shape": tuple(int(d) for d in train.image_shape)})

  def save(self, sources: Sources, workdir: Path) -> None:
    """Nothing to save beside the checkpoints."""

  def example(self, sources: Sources, config) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of one model input."""
    return tuple(sources.factory_args["image_shape"]), np.float32

  def steps_per_epoch(self, sources: Sources, config) -> int:
    from maestro_jax import data as data_lib
    steps = data_lib.num_batches(len(sources.train), config.batch_size, drop_remainder=True)
    if steps == 0:
      raise ValueError(f"batch_size={config.batch_size} is larger than the {len(sources.train)} training examples")
    return steps

  def train_batches(self, sources: Sources, config, epoch: int, start_batch: int) -> Iterator[dict]:
    from maestro_jax import data as data_lib
    return data_lib.batches(sources.train, config.batch_size, seed=config.seed, epoch=epoch,
                            start_batch=start_batch, train=True, augment=config.augment)

  def eval_batches(self, source, config, batch_size: int, *, periodic: bool = False,
                   max_windows: int | None = None) -> Iterator[dict]:
    """Every example of ``source``, padded and masked (``periodic`` and ``max_windows`` are for text)."""
    del config, periodic, max_windows
    from maestro_jax import data as data_lib
    return data_lib.batches(source, batch_size, train=False)

  def calibration_inputs(self, sources: Sources, config, count: int) -> np.ndarray:
    """``count`` unaugmented training batches of inputs stacked as ``(count, B, ...)`` (BatchNorm recalibration)."""
    from maestro_jax import data as data_lib
    it = data_lib.batches(sources.train, config.batch_size, seed=config.seed + 1, epoch=0, train=True, augment=False)
    return np.stack([b["image"] for _, b in zip(range(count), it)])

  def calibration_batch(self, sources: Sources, config, size: int) -> dict[str, np.ndarray]:
    """One unaugmented batch of about ``size`` training examples (greedy search)."""
    from maestro_jax import data as data_lib
    size = min(size, len(sources.train))
    batch = next(iter(data_lib.batches(sources.train, size, seed=config.seed + 2, train=True, augment=False)))
    return {k: batch[k] for k in ("image", "label", "mask")}

  def metrics(self, prefix: str, loss: float, accuracy: float) -> dict[str, float]:
    return {f"{prefix}_accuracy": accuracy, f"{prefix}_loss": loss}

  def describe(self, metrics: Mapping[str, float], prefix: str) -> str:
    return f"{prefix} accuracy {metrics[f'{prefix}_accuracy']:.4f}, loss {metrics[f'{prefix}_loss']:.4f}"


class LanguageModeling:
  """Next-character prediction on windows of ``seq_len + 1`` tokens; loss in nats, bits per character, perplexity.

  Datasets: ``'shakespeare'`` (the offline folder of 42 works, or ``data_dir``;
  whole works held out for validation and test) and ``'text'`` (``data_dir``
  is a text file or a folder of them; the last 5% and 5% of the characters are
  validation and test). The vocabulary is built from the training split and
  saved as ``vocab.json`` in the workdir; a resumed or loaded run reads it back.

  An "epoch" is ``steps_per_epoch`` steps of an endless, resumable window
  stream (0: one pass over the training text); each epoch ends with shrinking,
  an evaluation on the first ``eval_max_windows`` validation windows (0: all)
  and a checkpoint. The run ends with a full validation evaluation.
  """
  name = "language_modeling"
  eval_split = "validation"
  headline = Metric("validation_loss", "validation loss (nats per token)", 1.0, False)
  per_token = True

  def datasets(self) -> tuple[str, ...]:
    return ("shakespeare", "text")

  def zoo(self) -> dict[str, Any]:
    from maestro_jax import language_model
    return {"transformer_lm": language_model.TransformerLM}

  def build_zoo_model(self, name: str, sources: Sources, *, factorized: bool, rngs, kwargs: Mapping[str, Any]):
    kwargs = dict(kwargs)
    kwargs.setdefault("max_len", sources.factory_args["max_len"])
    return self.zoo()[name](sources.factory_args["vocab_size"], factorized=factorized, rngs=rngs, **kwargs)

  def load(self, config, workdir: Path | None = None) -> Sources:
    from maestro_jax import text
    vocab = None
    if workdir is not None and (Path(workdir) / VOCAB_FILE).exists():
      vocab = text.CharVocab.load(Path(workdir) / VOCAB_FILE)
    if config.dataset == "shakespeare":
      from maestro_train import layout  # pylint: disable=import-outside-toplevel
      directory = config.data_dir or layout.find_text_dir("shakespeare")
      if directory is None:
        raise FileNotFoundError("the Shakespeare folder (shared/data/shakespeare next to the repository) was not "
                                "found; set data_dir to it, or use dataset='text' with data_dir for any other text")
      splits = text.load_shakespeare(directory, vocab=vocab)
    else:
      if not config.data_dir:
        raise ValueError("config: dataset='text' needs data_dir, a text file or a folder of .txt/.txt.gz files")
      splits = text.load_text(config.data_dir, vocab=vocab)
    train = splits["train"]
    for split in ("train", "validation"):
      if len(splits[split]) < config.seq_len + 1:
        raise ValueError(f"the {split} text of {config.dataset} has {len(splits[split])} characters, fewer than "
                         f"seq_len + 1 = {config.seq_len + 1}")
    return Sources(train, splits["validation"], splits["test"],
                   {"vocab_size": int(train.vocab.size), "max_len": int(config.seq_len)}, train.vocab)

  def save(self, sources: Sources, workdir: Path) -> None:
    """Writes the vocabulary (``vocab.json``) unless the workdir already holds the same one."""
    from . import workdir as workdir_lib
    path = Path(workdir) / VOCAB_FILE
    text = sources.vocab.to_json() + "\n"
    if not path.exists() or path.read_text(encoding="ascii") != text:
      workdir_lib.atomic_write_text(path, text)

  def example(self, sources: Sources, config) -> tuple[tuple[int, ...], Any]:
    return (int(config.seq_len),), np.int32

  def steps_per_epoch(self, sources: Sources, config) -> int:
    from maestro_jax import text
    if config.steps_per_epoch:
      if len(sources.train) < config.batch_size * config.seq_len + config.seq_len:
        raise ValueError(f"{len(sources.train)} training characters make no batch of {config.batch_size} windows "
                         f"of {config.seq_len + 1}")
      return config.steps_per_epoch
    steps = text.num_train_batches(sources.train, config.batch_size, config.seq_len)
    if steps == 0:
      raise ValueError(f"{len(sources.train)} training characters make no batch of {config.batch_size} windows of "
                       f"{config.seq_len + 1}")
    return steps

  @staticmethod
  def as_batch(windows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of ``(B, L + 1)`` windows in the library's form: inputs, next-token labels, per-token mask."""
    tokens = windows["tokens"]
    return {"image": tokens[:, :-1], "label": tokens[:, 1:], "mask": windows["mask"]}

  def train_batches(self, sources: Sources, config, epoch: int, start_batch: int) -> Iterator[dict]:
    from maestro_jax import text
    steps = self.steps_per_epoch(sources, config)
    stream = text.train_stream(sources.train, config.batch_size, config.seq_len, seed=config.seed,
                               start_step=epoch * steps + start_batch)
    # Only the configured number of steps: the stream itself is endless.
    return (self.as_batch(w) for _, w in zip(range(steps - start_batch), stream))

  def eval_batches(self, source, config, batch_size: int, *, periodic: bool = False,
                   max_windows: int | None = None) -> Iterator[dict]:
    """Every target of ``source`` scored once; only the first ``max_windows`` windows when given, or with
    ``periodic`` the first ``config.eval_max_windows``."""
    from maestro_jax import text
    limit = max_windows or (config.eval_max_windows if periodic and config.eval_max_windows else None)
    return (self.as_batch(w) for w in text.eval_batches(source, batch_size, config.seq_len, max_windows=limit))

  def calibration_inputs(self, sources: Sources, config, count: int) -> np.ndarray:
    from maestro_jax import text
    stream = text.train_stream(sources.train, config.batch_size, config.seq_len, seed=config.seed + 1)
    return np.stack([w["tokens"][:, :-1] for _, w in zip(range(count), stream)])

  def calibration_batch(self, sources: Sources, config, size: int) -> dict[str, np.ndarray]:
    """About ``size`` training tokens as windows of ``seq_len`` (at least one window)."""
    from maestro_jax import text
    windows = max(1, -(-size // config.seq_len))
    windows = min(windows, max(1, (len(sources.train) - config.seq_len) // config.seq_len))
    return self.as_batch(next(text.train_stream(sources.train, windows, config.seq_len, seed=config.seed + 2)))

  def metrics(self, prefix: str, loss: float, accuracy: float) -> dict[str, float]:
    return {f"{prefix}_loss": loss, f"{prefix}_bits_per_char": loss / math.log(2.0),
            f"{prefix}_perplexity": math.exp(min(loss, 700.0)), f"{prefix}_accuracy": accuracy}

  def describe(self, metrics: Mapping[str, float], prefix: str) -> str:
    return (f"{prefix} loss {metrics[f'{prefix}_loss']:.4f} nats/char ({metrics[f'{prefix}_bits_per_char']:.3f} "
            f"bits/char, perplexity {metrics[f'{prefix}_perplexity']:.2f})")


TASKS: dict[str, Any] = {"classification": Classification(), "language_modeling": LanguageModeling()}


def get(name: str):
  """The task registered as ``name``."""
  if name not in TASKS:
    raise ValueError(f"config: task={name!r} is not valid; choose one of {', '.join(TASKS)}")
  return TASKS[name]
