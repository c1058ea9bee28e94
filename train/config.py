"""Run configuration: one dataclass, config files, and ``key=value`` overrides."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"

# The runner's own choices; datasets, models, samplers and losses are checked
# against the library's registries (see registry_choices).
CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("constant", "step", "cosine"),
    "shard_state": ("auto", "off", "fsdp"),
    "compute_dtype": ("float32", "bfloat16", "auto"),
}


def registry_choices() -> dict[str, tuple[str, ...]]:
  """The valid values of the fields the registries own (imported only when a config is checked).

  ``dataset`` and ``model`` list every task's; a config is checked against its own task's
  (a model may also be an import path ``package.module:factory``, see :mod:`maestro_train.modeling`).
  """
  from maestro_jax import samplers, training  # pylint: disable=import-outside-toplevel
  from . import tasks  # pylint: disable=import-outside-toplevel
  return {"task": tuple(tasks.TASKS),
          "dataset": tuple(d for t in tasks.TASKS.values() for d in t.datasets()),
          "model": tuple(m for t in tasks.TASKS.values() for m in t.zoo()),
          "sampler": tuple(samplers.SAMPLERS), "loss": tuple(training.LOSSES)}


@dataclasses.dataclass
class Config:
  """Everything a run needs. Defaults are the paper's where it gives one."""
  task: str = "classification"         # 'classification' or 'language_modeling' (see maestro_train.tasks)
  dataset: str = "digits"
  data_dir: str | None = None          # tfds data dir
  idx_dir: str | None = None           # folder of original MNIST-format IDX files ('auto': look beside the repo)
  download: bool = False               # let tfds download a missing dataset
  augment: bool = False                # training batches: random crop (zero padding 4) and horizontal flip
  model: str = "mlp"                   # a zoo name, or a factory 'package.module:factory' (NNX or Linen)
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  python_path: tuple = ()              # folders to import a model factory from (a config file adds its own)
  factorized: bool = True
  init_from: str | None = None         # workdir of a finished dense run to start from, factorized by SVD
  rank_fraction: float | None = None   # with init_from: keep this fraction of each layer's rank (Pufferfish)
  dense_layers: tuple = ()             # with init_from: layers left dense (Pufferfish keeps the first ones)
  epochs: int = 10
  batch_size: int = 128
  eval_batch_size: int = 500
  optimizer: str = "sgd"
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 1e-4
  schedule: str = "constant"
  sampler: str = "single_layer"
  sampler_kwargs: dict = dataclasses.field(default_factory=dict)
  loss: str = "maestro"
  alpha: float = 0.5                   # Decomposable-Net weight of the low-rank loss
  distill_weight: float = 1.0          # loss='distill': weight of the sampled model's term
  lasso: float = 0.0                   # hierarchical group lasso weight (lambda)
  lasso_epochs: int = 0                # the lasso acts in the first N epochs only, then training goes on free of it
                                       # (0: every epoch)
  lasso_decoupled: bool = False        # step down the lasso's gradient after the optimizer (lasso is the step size)
  frobenius_decay: float = 0.0         # weight of sum ||A B||_F^2 (spectral init + Frobenius decay baseline)
  shrink: bool = True                  # progressive shrinking at each epoch end
  shrink_threshold: float = 1e-5
  rank_quantum: int = 1
  reslice_min_saving: float = 0.25  # cut shapes only once that share of the factor MACs is freed (fewer compiles)
  recalibrate_batches: int = 10        # BatchNorm recalibration before evaluation (0: off)
  seq_len: int = 64                    # language modelling: tokens a model reads (windows of seq_len + 1)
  steps_per_epoch: int = 0             # language modelling: steps between shrink/evaluate/save (0: one pass)
  eval_max_windows: int = 0            # language modelling: windows of each epoch's evaluation (0: all)
  seed: int = 0
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 3
  log_every_steps: int = 50
  # Several devices and hosts (see README "Several devices and hosts").
  shard_state: str = "auto"            # 'fsdp': params and optimizer state split over the devices
  #                                      (maestro_jax.sharding); 'off': replicated; 'auto': fsdp on >1 device
  shard_min_size: int = 2 ** 14        # with fsdp, arrays of fewer elements stay replicated
  compute_dtype: str = "float32"       # activations and matmuls: 'float32', 'bfloat16' (params, optimizer
  #                                      state and loss stay float32) or 'auto' (bfloat16 off CPU)

  def validate(self) -> Config:
    """Checks every field's type and range; raises ValueError with a one-line message."""
    for field in dataclasses.fields(self):
      setattr(self, field.name, _typed(field.name, getattr(self, field.name), _field_types()[field.name]))
    from . import tasks  # pylint: disable=import-outside-toplevel
    task = tasks.get(self.task)
    choices = {**CHOICES, **registry_choices(), "dataset": task.datasets()}
    choices["model"] = tuple(task.zoo())
    if ":" in self.model:  # An import path is resolved when the model is built.
      del choices["model"]
    for field, valid in choices.items():
      value = getattr(self, field)
      if value not in valid:
        also = " or an import path 'package.module:factory'" if field == "model" else ""
        raise ValueError(f"config: {field}={value!r} is not valid for task {self.task!r}; choose one of "
                         f"{', '.join(valid)}{also}" if field in ("dataset", "model") else
                         f"config: {field}={value!r} is not valid; choose one of {', '.join(valid)}")
    from maestro_jax import samplers  # pylint: disable=import-outside-toplevel
    accepted = inspect.signature(samplers.SAMPLERS[self.sampler]).parameters
    if unknown := sorted(set(self.sampler_kwargs) - set(accepted)):
      raise ValueError(f"config: sampler_kwargs {', '.join(unknown)} not taken by sampler {self.sampler!r}; it takes "
                       f"{', '.join(accepted) or 'none'}")
    for field in ("epochs", "batch_size", "eval_batch_size", "rank_quantum", "checkpoint_every_steps",
                  "keep_checkpoints", "log_every_steps", "seq_len", "shard_min_size"):
      if getattr(self, field) < 1:
        raise ValueError(f"config: {field}={getattr(self, field)!r} must be >= 1")
    if not 0 <= self.reslice_min_saving < 1:
      raise ValueError(f"config: reslice_min_saving={self.reslice_min_saving!r} must be in [0, 1)")
    if self.rank_fraction is not None and not 0 < self.rank_fraction <= 1:
      raise ValueError(f"config: rank_fraction={self.rank_fraction!r} must be in (0, 1]")
    for field in ("learning_rate", "lasso", "lasso_epochs", "frobenius_decay", "shrink_threshold", "weight_decay",
                  "recalibrate_batches", "steps_per_epoch", "eval_max_windows"):
      if getattr(self, field) < 0:
        raise ValueError(f"config: {field}={getattr(self, field)!r} must be >= 0")
    if not 0 <= self.alpha <= 1:
      raise ValueError(f"config: alpha={self.alpha!r} must be in [0, 1]")
    if self.distill_weight < 0:
      raise ValueError(f"config: distill_weight={self.distill_weight!r} must be >= 0")
    return self

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, source: str | Path = "config.json") -> Config:
    """The config a workdir's ``config.json`` holds; unknown or mistyped fields raise a one-line ValueError."""
    try:
      values = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
      raise ValueError(f"{source} must hold a JSON object of config fields")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"{source} has unknown config field(s) {', '.join(map(repr, unknown))} "
                       "(written by another version of maestro_train?)")
    try:
      return cls(**values).validate()
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None


def _field_types() -> dict[str, Any]:
  return typing.get_type_hints(Config)


_TYPE_NAMES = {int: "an int", float: "a number", bool: "True or False", str: "a string", dict: "a dict",
               tuple: "a tuple"}


def _type_name(kind: Any) -> str:
  options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
  names = [_TYPE_NAMES[o] for o in options if o is not type(None)]
  return " or ".join(names + (["None"] if type(None) in options else []))


def _typed(name: str, value: Any, kind: Any) -> Any:
  """``value`` as field ``name``'s declared type ``kind``, or a ValueError naming field, value and type.

  Ints are accepted for floats, and lists for tuples (JSON has no tuples); nothing
  else is converted, so ``epochs=2.5`` or ``batch_size=64.0`` is an error rather
  than a silent truncation.
  """
  options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
  if value is None and type(None) in options:
    return None
  base = next(o for o in options if o is not type(None))
  if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if base is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if base is tuple and isinstance(value, (list, tuple)):
    return tuple(value)
  if base in (str, bool, dict) and isinstance(value, base):
    return value
  raise ValueError(f"config: {name}={value!r} is not {_type_name(kind)}")


# Fields whose change makes an old checkpoint unusable for this run.
IDENTITY_FIELDS = ("task", "dataset", "model", "seq_len", "model_kwargs", "factorized", "init_from", "rank_fraction", "dense_layers",
                   "batch_size", "optimizer", "seed", "sampler", "loss", "rank_quantum")

# Fields whose change alters the rest of a resumed run's trajectory (the learning-rate schedule spreads over
# all epochs); a resume with changed values needs --allow-changes and is recorded.
TRAJECTORY_FIELDS = ("epochs", "learning_rate", "momentum", "weight_decay", "schedule", "sampler_kwargs", "alpha",
                     "distill_weight", "lasso", "lasso_epochs", "lasso_decoupled", "frobenius_decay", "shrink",
                     "shrink_threshold", "reslice_min_saving", "steps_per_epoch", "compute_dtype", "augment")
# shard_state and shard_min_size are in neither list: placement changes no value beyond float rounding, and a
# checkpoint restores onto any device count and either placement.


def available() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name_or_path: str) -> Config:
  """Loads a config by name (``train/configs/NAME.py``) or from a Python file defining ``get_config()``."""
  path = Path(name_or_path)
  folder = None
  if path.suffix == ".py" and path.exists():
    # The config file's folder is importable while it runs and for its model factory (``python_path``).
    folder = str(path.parent.absolute())
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    added = folder not in sys.path
    if added:
      sys.path.insert(0, folder)
    try:
      spec.loader.exec_module(module)
    finally:
      if added and folder in sys.path:
        sys.path.remove(folder)
  elif name_or_path in available():
    module = importlib.import_module(f"{__package__}.configs.{name_or_path}")
  else:
    raise ValueError(f"unknown config {name_or_path!r}; choose one of {', '.join(available())} or a .py file")
  config = module.get_config()
  if not isinstance(config, Config):
    raise ValueError(f"{name_or_path}: get_config() must return maestro_train.config.Config")
  if folder is not None:
    paths = tuple(str((path.parent / p).absolute()) for p in config.python_path)
    config = dataclasses.replace(config, python_path=paths + (() if folder in paths else (folder,)))
  return config


def override(config: Config, assignments: list[str]) -> Config:
  """Applies ``key=value`` strings, each parsed to the field's declared type.

  Values are Python literals (strings may be bare: ``sampler=none``); a value of
  the wrong type fails with one line naming the field, the value and the type.
  """
  types_ = _field_types()
  changes: dict[str, Any] = {}
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    if key not in types_:
      raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(types_)}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    options = typing.get_args(types_[key]) or (types_[key],)
    if str in options and not isinstance(value, str) and value is not None:
      value = text  # A string field takes the text as written: data_dir=2024 is the folder '2024'.
    if bool in options and isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
    changes[key] = _typed(key, value, types_[key])
  if changes.get("sampler", config.sampler) != config.sampler and "sampler_kwargs" not in changes:
    changes["sampler_kwargs"] = {}  # The config's sampler_kwargs were for its own sampler.
  return dataclasses.replace(config, **changes).validate()
