"""``train_and_evaluate(config, workdir)``: train once with Maestro, come out with ranks and a family of models.

Per step: keep counts are sampled from the step's key and the jitted, donated
train step runs data-parallel over all devices. Per epoch: progressive
shrinking (params and optimizer state sliced), BatchNorm recalibration on
training batches, evaluation, a JSON-lines record, plots and a checkpoint.

Several devices and hosts: batches are split over a 1-D ``data`` mesh of every
device of every process; ``config.shard_state`` also splits parameters and
optimizer state over it (:mod:`maestro_jax.sharding`), and Orbax saves and
restores them sharded, onto any device count. Started as several processes
(:func:`initialize_distributed`), each process feeds its own share of every
batch and only process 0 writes records, plots and the summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import maestro_jax
from maestro_jax import nnx as mnx
from maestro_jax import sharding
from maestro_jax import training
from . import config as config_lib
from . import interrupt
from . import modeling
from . import report
from . import tasks
from . import workdir as workdir_lib

REPO_ROOT = Path(__file__).resolve().parents[1]
# Drawing the plots costs about 0.4 s; short epochs redraw them at most this often (and after the last).
PLOT_EVERY_SECONDS = 30.0


# ----------------------------------------------------------------------------- several processes


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
  """Starts JAX's multi-controller runtime when this program is one of several processes.

  Each argument left None is read from the environment (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Nothing is started for a single
  process. Must run before anything asks JAX for its devices.

  Args:
    coordinator: ``host:port`` of process 0's coordination service.
    num_processes: how many processes take part.
    process_id: this process's number, ``0 .. num_processes - 1``.
    auto: start even with nothing given, letting JAX detect the cluster (Cloud
      TPU pod slices, SLURM, Open MPI).

  Returns:
    Whether ``jax.distributed.initialize`` was called.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if not auto and (num_processes or 1) <= 1 and coordinator is None:
    return False
  # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib. Accelerators ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that writes records, plots and the summary."""
  return jax.process_index() == 0


def host_copy(tree: Any) -> Any:
  """``tree``'s global values as numpy arrays on this host.

  With several processes a sharded array is not wholly on any one host; it is
  gathered, so every process must call this at the same point.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


def _sync(name: str) -> None:
  """Waits for every process (no-op for one): process 0 prepares the workdir before the others read it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _agreed_signal() -> int | None:
  """The signal any process received, agreed by all (each process may see a signal at a different step)."""
  local = interrupt.requested()
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  received = multihost_utils.process_allgather(np.int32(local or 0))
  return int(np.max(received)) or None


# ----------------------------------------------------------------------------- errors


class NonFiniteLossError(FloatingPointError):
  """The loss or the train state became NaN or infinite; the newest finite checkpoint is kept."""


Interrupted = interrupt.Interrupted


# ----------------------------------------------------------------------------- building blocks


def make_optimizer(config: config_lib.Config, total_steps: int) -> optax.GradientTransformation:
  """The configured optax optimizer and learning-rate schedule."""
  lr = config.learning_rate
  if config.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif config.schedule == "step":
    schedule = optax.piecewise_constant_schedule(lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})
  else:
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if config.optimizer == "sgd":
    # Coupled weight decay, as in torch.optim.SGD (the paper's setting).
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum or None))
  if config.optimizer == "adam":
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_sampler(config: config_lib.Config) -> maestro_jax.Sampler | maestro_jax.ParamSampler:
  return maestro_jax.make_sampler(config.sampler, **config.sampler_kwargs)


def load_data(config: config_lib.Config, workdir: str | Path | None = None):
  """The training and held-out sources of the configured dataset (``workdir``: read a saved vocabulary)."""
  sources = tasks.get(config.task).load(config, None if workdir is None else Path(workdir))
  return sources.train, sources.evaluation


def load_sources(config: config_lib.Config, workdir: str | Path | None = None) -> tasks.Sources:
  """The configured task's data (a language model's vocabulary is read from ``workdir`` when it is saved there)."""
  return tasks.get(config.task).load(config, None if workdir is None else Path(workdir))


def _as_sources(config: config_lib.Config, source_or_sources) -> tasks.Sources:
  if isinstance(source_or_sources, tasks.Sources):
    return source_or_sources
  # A classification training source alone (the older call): its metadata is all a model needs.
  return tasks.Sources(source_or_sources, None, None, {"num_classes": int(source_or_sources.num_classes),
                                                       "image_shape": tuple(source_or_sources.image_shape)})


def compute_dtype(config: config_lib.Config) -> jnp.dtype:
  """The dtype of the model's activations and matmuls (parameters, optimizer state and loss stay float32).

  ``'auto'`` is decided here, when the run starts and its devices are known:
  bfloat16 on an accelerator (GPU/TPU matrix units run it at several times the
  float32 rate and it halves activation memory), float32 on CPU, where it would
  cost precision without being faster.
  """
  name = config.compute_dtype
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return jnp.dtype(name)


def build_model(config: config_lib.Config, sources) -> Any:
  """The configured model as built: an ``nnx.Module`` or an uninitialized Linen module.

  With ``init_from``, a trained dense run's (NNX) model factorized by SVD. A
  compute dtype other than float32 (:func:`compute_dtype`) is passed as the
  model's ``dtype=``; a factory given by import path must then take ``dtype``.
  """
  sources = _as_sources(config, sources)
  task = tasks.get(config.task)
  if config.init_from:
    run = load_run(config.init_from)
    if run.config.factorized:
      raise ValueError(f"init_from={config.init_from!r} must be a dense run (factorized=False)")
    model = modeling.to_nnx_module(run.model, jax.device_get(run.state["params"]),
                                   jax.device_get(run.state["model_state"]), "init_from (SVD of a dense run)")
    # At rank_fraction None the function is unchanged (Pufferfish's switch from dense warm-up).
    return mnx.factorize(model, rank_fraction=config.rank_fraction, skip=tuple(config.dense_layers))
  dtype = compute_dtype(config)
  # float32 passes nothing, so a float32 model is built exactly as before the option existed.
  extra = {} if dtype == jnp.float32 else {"dtype": dtype}
  if modeling.is_import_path(config.model):
    factory = modeling.resolve_factory(config.model, config.python_path)
    names, any_keyword = modeling._accepted(factory)  # pylint: disable=protected-access
    if extra and not (any_keyword or "dtype" in names):
      raise ValueError(f"config: compute_dtype={config.compute_dtype!r} runs in {dtype.name}, but model factory "
                       f"{config.model!r} takes no 'dtype' argument; add one or set compute_dtype=float32")
    return modeling.call_factory(factory, config.model, config, {**sources.factory_args, **extra})
  return task.build_zoo_model(config.model, sources, factorized=config.factorized, rngs=nnx.Rngs(config.seed),
                              kwargs={**extra, **config.model_kwargs})


def build_view(config: config_lib.Config, sources, *, module: Any = None) -> tuple[Any, dict, dict]:
  """``(view, params, model_state)`` of the configured model, NNX or Linen (see :mod:`maestro_train.modeling`)."""
  sources = _as_sources(config, sources)
  module = build_model(config, sources) if module is None else module
  return modeling.view_of(module, config.model, tasks.get(config.task), sources, config)


def layer_positions(config: config_lib.Config, sources, view, params, model_state) -> dict[str, int]:
  """Output positions of every weight layer per example, or per token for a language model (MACs per token)."""
  task = tasks.get(config.task)
  shape, dtype = task.example(sources, config)
  positions = view.layer_positions(params, model_state, shape, dtype=dtype)
  if task.per_token:
    return {k: v // int(config.seq_len) for k, v in positions.items()}
  return positions


# A reslice recompiles the train step (1.5-4 s on a 2-core CPU), so it must free more multiply-adds over the
# rest of the run than that time computes: 2e10 is about 1.5 s of LeNet's train step on 2 CPU cores. The
# quick start's digits MLP, whose epochs take 0.03-0.1 s, frees far less and keeps its shapes (two compiles saved).
RESLICE_MIN_SAVED_MACS = 2e10


def reslice_saved_macs(params, ranks: Mapping[str, int], quantum: int, costs: Mapping[str, int],
                       examples_left: int) -> float:
  """Multiply-adds that cutting the capacities to ``ranks`` saves over ``examples_left`` training examples
  (forward and backward, 3x the forward's; ``costs`` from :func:`component_macs`)."""
  caps = maestro_jax.capacities(params)
  new = maestro_jax.new_capacities(params, ranks, quantum)
  return 3.0 * examples_left * sum(costs[name] * (caps[name] - new[name]) for name in caps)


def component_macs(params, positions: Mapping[str, int]) -> dict[str, int]:
  """Multiply-adds per example of one rank component of each factorized layer, ``positions * (d_in + d_out)``.

  What a shrink weighs pending cuts by (``reslice_min_saving``): a reslice
  costs a compile and pays back in compute, and a convolution's component costs
  far more compute than its parameters say.
  """
  return {name: positions[name] * sum(maestro_jax.matrix_dims(layer))
          for name, layer in maestro_jax.factorized_layers(params).items()}


class Shards:
  """Where a run's arrays live: a 1-D ``data`` mesh over every device of every process.

  Batches are split along it (data parallelism; each process hands over its own
  share). The train state is replicated, or with ``fsdp`` split by
  :mod:`maestro_jax.sharding`'s rule (each large array along one axis, small
  ones replicated), which holds 1/N of the parameters and optimizer state on
  each of N devices at the cost of gathering each parameter where it is used.

  Args:
    devices: the devices (default: all, of every process).
    fsdp: shard the train state instead of replicating it.
    min_size: with ``fsdp``, arrays with fewer elements stay replicated.
  """

  def __init__(self, devices=None, *, fsdp: bool = False, min_size: int = sharding.DEFAULT_MIN_SIZE):
    self.mesh = sharding.data_mesh(devices)
    self.fsdp, self.min_size = fsdp, min_size
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch = NamedSharding(self.mesh, PartitionSpec("data"))

  @classmethod
  def for_config(cls, config: config_lib.Config, devices=None) -> Shards:
    """The placement ``config.shard_state`` asks for ('auto': sharded on more than one device)."""
    count = len(devices) if devices is not None else jax.device_count()
    fsdp = config.shard_state == "fsdp" or (config.shard_state == "auto" and count > 1)
    return cls(devices, fsdp=fsdp, min_size=config.shard_min_size)

  @property
  def size(self) -> int:
    return self.mesh.size

  @property
  def step_mesh(self) -> Mesh | None:
    """The mesh the train step keeps its new state sharded over (None: replicated, placed by XLA)."""
    return self.mesh if self.fsdp else None

  def state_shardings(self, state):
    """A sharding for every leaf of ``state`` (arrays or ``ShapeDtypeStruct``); the rule reads shapes only."""
    if self.fsdp:
      return sharding.state_shardings(state, self.mesh, min_size=self.min_size)
    return jax.tree.map(lambda _: self.replicated, state)

  def put_state(self, state):
    """``state`` placed on the mesh; also after a shrink changed its shapes (the same rule places them).

    With several processes, a host value (the same in every process) is cut into this process's pieces by
    ``jax.make_array_from_callback``: ``jax.device_put`` of a host value onto devices of several processes
    gives replicated arrays whose shards cannot be listed, which Orbax needs to save them.
    """
    shardings = self.state_shardings(state)
    if jax.process_count() == 1:
      return jax.device_put(state, shardings)

    def put(x, where):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: only (re)placed
        return jax.device_put(x, where)
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return jax.tree.map(put, state, shardings)

  def put_batch(self, batch: Mapping[str, np.ndarray]):
    """This process's share of a global batch, assembled into global arrays split over the mesh.

    On one device the numpy arrays go as they are: the jitted step copies them itself, on its fast
    path, where assembling global arrays cost 1.4 ms a LeNet step (about a tenth of the step).
    """
    if self.size == 1 and jax.process_count() == 1:
      return dict(batch)
    return {k: jax.make_array_from_process_local_data(self.batch, v) for k, v in batch.items()}

  def put_stacked(self, images: np.ndarray):
    """``(count, b, ...)`` stacked batches (this process's share of each), split over the mesh on axis 1."""
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, PartitionSpec(None, "data")), images)


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(workdir: Path, config: config_lib.Config, *, read_only: bool = False
                        ) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut short by a kill leaves a temporary folder; it is ours to remove.
  # A reader (sweep, export) neither creates nor cleans anything (Orbax's read_only option would log warnings).
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                               item_names=("state", "meta"))


def _has_checkpoints(workdir: Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _check_resume(workdir: Path, config: config_lib.Config, allow_changes: bool) -> dict[str, list]:
  """Compares ``config`` with the one the workdir's checkpoints were written with.

  Returns:
    The trajectory fields that change, ``{field: [saved, new]}`` (empty when
    nothing is resumed or nothing changes).

  Raises:
    ValueError: an identity field differs (the checkpoints cannot be used), or a
      trajectory field differs and ``allow_changes`` is False.
  """
  saved_path = workdir / "config.json"
  if not saved_path.exists() or not _has_checkpoints(workdir):
    return {}
  saved = json.loads(config_lib.Config.from_json(saved_path.read_text(), saved_path).to_json())
  mine = json.loads(config.to_json())
  diffs = [f"{k}: {saved.get(k)!r} != {mine.get(k)!r}" for k in config_lib.IDENTITY_FIELDS
           if saved.get(k) != mine.get(k)]
  if diffs:
    raise ValueError(f"workdir {workdir} holds checkpoints of another config ({'; '.join(diffs)}); "
                     "use another workdir or pass --fresh to delete this run's checkpoints and records")
  changes = {k: [saved.get(k), mine.get(k)] for k in config_lib.TRAJECTORY_FIELDS if saved.get(k) != mine.get(k)}
  if changes and not allow_changes:
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    raise ValueError(f"resuming {workdir} with a changed trajectory ({listed}); pass --allow-changes to resume "
                     "with it anyway (recorded in config_changes.jsonl), or --fresh to start over")
  return changes


_all_finite = jax.jit(lambda tree: jnp.all(jnp.asarray(
    [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)] or [True])))


def state_is_finite(state: Mapping[str, Any]) -> bool:
  """Whether every floating-point leaf of the parameters, model state and optimizer state is finite."""
  return bool(_all_finite({k: state[k] for k in ("params", "model_state", "opt_state") if k in state}))


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _reason(error: BaseException) -> str:
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def _restore_step(manager, step: int, fresh_state: dict, optimizer, parts, place) -> tuple[dict, dict]:
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  with_opt = "opt_state" in parts
  params, opt_state, _ = maestro_jax.shrink(fresh_state["params"], meta["capacities"],
                                            opt_state=fresh_state["opt_state"] if with_opt else None,
                                            optimizer=optimizer if with_opt else None)
  target = dict(fresh_state, params=params, opt_state=opt_state,
                ranks={k: jnp.asarray(v, jnp.int32) for k, v in meta["ranks"].items()})
  target = {k: v for k, v in target.items() if k in parts}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  if place is not None:  # Orbax reads each array straight into its target sharding, whatever wrote it.
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            place(abstract))
  if with_opt:
    args = ocp.args.StandardRestore(abstract)
  else:  # Only what is asked for is read: a damaged optimizer file cannot block an export.
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=True)
  state = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
  if not state_is_finite(state):
    raise FloatingPointError("its state is not finite")
  return state, meta


TRAIN_PARTS = ("params", "model_state", "opt_state", "step", "ranks")
MODEL_PARTS = ("params", "model_state", "step", "ranks")


def restore(manager: ocp.CheckpointManager, fresh_state: dict, optimizer, *, parts=TRAIN_PARTS,
            set_aside_in: Path | None = None, place=None) -> tuple[dict, dict] | None:
  """The newest checkpoint that restores, as ``(state, meta)``; None when there is none.

  The saved capacities are read first and a fresh state is shrunk to them, so a
  checkpoint written after shrinking restores into the right shapes. A step
  that does not restore (damaged, partial, not finite, a stray folder) is
  skipped with a one-line warning that names it and why; with
  ``set_aside_in`` (a workdir) it is moved to ``skipped_checkpoints/`` so the
  resumed run can save that step again.

  Args:
    manager: the run's checkpoint manager.
    fresh_state: a freshly initialized state (shapes, dtypes and shardings).
    optimizer: the optimizer of ``fresh_state['opt_state']``.
    parts: the state entries to read; without ``opt_state`` the optimizer state is not read.
    set_aside_in: the workdir whose ``skipped_checkpoints/`` receives steps that do not restore.
    place: ``abstract state -> shardings`` to restore onto (e.g. :meth:`Shards.state_shardings`; a
      checkpoint written on any device count restores onto these); None: ``fresh_state``'s own placement.

  Raises:
    ValueError: there are checkpoints but none of them restores.
  """
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = Path(manager.directory) / str(step)
    try:
      if not (step_dir / "_CHECKPOINT_METADATA").exists():
        raise FileNotFoundError("not a complete checkpoint (no _CHECKPOINT_METADATA)")
      restored = _restore_step(manager, step, fresh_state, optimizer, parts, place)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with one step, an older one may be fine.
      skipped.append((step, step_dir, e))
      continue
    for bad_step, bad_dir, error in skipped:
      where = ""
      if set_aside_in is not None:
        where = f"; moved to {workdir_lib.set_aside(set_aside_in, bad_dir)}"
      _warn(f"skipped checkpoint step {bad_step} ({_reason(error)}); using step {step}{where}")
    if skipped and set_aside_in is not None:
      manager.reload()
    return restored
  complete = [(s, e) for s, d, e in skipped if (d / "_CHECKPOINT_METADATA").exists()]
  if complete:
    listed = "; ".join(f"step {s}: {_reason(e)}" for s, e in complete[:3])
    raise ValueError(f"no checkpoint in {manager.directory} restores ({listed}); pass --fresh to start over")
  for bad_step, bad_dir, error in skipped:  # Only stray folders: nothing was saved, start from scratch.
    where = f"; moved to {workdir_lib.set_aside(set_aside_in, bad_dir)}" if set_aside_in is not None else ""
    _warn(f"skipped checkpoint step {bad_step} ({_reason(error)}){where}")
  if skipped and set_aside_in is not None:
    manager.reload()
  return None


def _save(manager, state, meta):
  manager.save(int(meta["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)


@dataclasses.dataclass
class Run:
  """A trained run loaded back from its workdir (see :func:`load_run`).

  ``model`` is the functional view (NNX or Linen); ``sources`` the task's data;
  ``positions`` the layer positions per example (per token for a language model).
  """
  config: config_lib.Config
  model: Any
  state: dict
  sources: tasks.Sources
  positions: dict[str, int]
  initial_capacities: dict[str, int]
  module: Any = None

  @property
  def ranks(self) -> dict[str, int]:
    return _host_ranks(self.state)

  @property
  def task(self):
    return tasks.get(self.config.task)

  @property
  def train_source(self):
    return self.sources.train

  @property
  def test_source(self):
    """The held-out source every epoch was scored on (the validation works of a language model)."""
    return self.sources.evaluation


def load_run(workdir: str | Path, *, optimizer_state: bool = False) -> Run:
  """Loads the newest checkpoint of a run that restores, with its config, model and data.

  Args:
    workdir: a maestro-train workdir.
    optimizer_state: also read the optimizer state (``state['opt_state']``);
      evaluation, sweeps and export need only parameters and model state.

  Raises:
    FileNotFoundError: ``workdir`` holds no config or no checkpoint.
    ValueError: its ``config.json`` is not valid, or no checkpoint restores.
  """
  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a maestro-train workdir (no config.json)")
  config = config_lib.Config.from_json((workdir / "config.json").read_text(), workdir / "config.json")
  if not _has_checkpoints(workdir):  # Checked first: the manager would create the folder.
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  sources = load_sources(config, workdir)
  module = build_model(config, sources)
  fmodel, params, model_state = build_view(config, sources, module=module)
  steps = tasks.get(config.task).steps_per_epoch(sources, config) * config.epochs
  optimizer = make_optimizer(config, steps)
  manager = _checkpoint_manager(workdir, config, read_only=True)
  try:
    restored = restore(manager, training.init_state(params, model_state, optimizer), optimizer,
                       parts=TRAIN_PARTS if optimizer_state else MODEL_PARTS)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  return Run(config, fmodel, restored[0], sources, layer_positions(config, sources, fmodel, params, model_state),
             maestro_jax.capacities(params), module)


# ----------------------------------------------------------------------------- the run


def _host_ranks(state) -> dict[str, int]:
  return {k: int(v) for k, v in state["ranks"].items()}


def calibration_images(source, config: config_lib.Config, count: int) -> np.ndarray:
  """``count`` unaugmented training batches of model inputs stacked as ``(count, B, ...)`` (BatchNorm recalibration).

  The same batches the runner recalibrates with before every evaluation, so a
  sweep or an export of a run scores its models as training did.

  Args:
    source: the training source, or the task's :class:`~maestro_train.tasks.Sources`.
    config: the run's config (task, batch size, seed).
    count: how many batches.

  Returns:
    A numpy array; with several processes, this process's share of each batch.
  """
  sources = source if isinstance(source, tasks.Sources) else tasks.Sources(source, None, None, {})
  return tasks.get(config.task).calibration_inputs(sources, config, count)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  try:
    return ctypes.CDLL(None).malloc_trim  # glibc
  except (OSError, AttributeError):
    return None


def release_freed_memory() -> None:
  """Hands the C heap's free pages back to the system (glibc; elsewhere nothing to do).

  XLA's compiler frees its working memory (about 150 MB for LeNet's train step)
  into glibc's heap, which keeps it; the process's resident size then grew with
  every compile of a run. After a trim it is one compile above the working set.
  """
  if trim := _malloc_trim():
    trim(0)


@contextlib.contextmanager
def single_threaded_blas():
  """Limits OpenBLAS/MKL to one thread while training runs.

  XLA on CPU calls LAPACK (through SciPy's OpenBLAS) for the SVDs and QRs that
  Decomposable-Net's sampler computes every step; OpenBLAS's own threads then
  fight XLA's thread pool, which on 2 cores made a LeNet step about 15x slower
  (0.65 s instead of 0.04 s). Nothing else in a run needs BLAS threads.
  """
  try:
    from threadpoolctl import threadpool_limits  # scikit-learn brings it
  except ImportError:
    yield
    return
  jax.block_until_ready(jnp.linalg.qr(jnp.ones((4, 2))))  # load the LAPACK library first so it is limited
  with threadpool_limits(limits=1, user_api="blas"):
    yield


def train_and_evaluate(config: config_lib.Config, workdir: str | Path, *, devices=None, progress: bool = True,
                       fresh: bool = False, allow_changes: bool = False) -> dict[str, Any]:
  """Trains and evaluates; resumes from the newest checkpoint in ``workdir`` that restores.

  SIGTERM and SIGINT (in the main thread) stop the run after the current step:
  the state is saved once and :class:`Interrupted` is raised, whose message says
  where the run resumes from.

  Args:
    config: the run configuration.
    workdir: where checkpoints, ``metrics.jsonl``, plots and the summary go. A
      non-empty folder that maestro-train did not write is refused.
    devices: devices to shard batches (and with ``config.shard_state``, the state) over (default: all, of
      every process). With several processes (:func:`initialize_distributed`) every process calls this
      with the same arguments; process 0 alone writes the workdir's records, plots and summary.
    progress: show a progress bar.
    fresh: first remove what maestro-train wrote in ``workdir`` (see :mod:`maestro_train.workdir`).
    allow_changes: resume even though a trajectory field (epochs, learning rate,
      schedule, ...; ``config.TRAJECTORY_FIELDS``) changed; the change is recorded.

  Returns:
    The summary dict (also written to ``workdir/summary.json``).

  Raises:
    ValueError: a bad config, a workdir of another run, or a refused change.
    maestro_train.workdir.WorkdirError: the workdir cannot be used or is in use.
    NonFiniteLossError: the loss or the state became NaN or infinite.
    Interrupted: SIGTERM or SIGINT.
  """
  config.validate()
  primary = is_primary()
  if fresh and primary:  # Before anything is written: --fresh on a folder of one's own is refused as such.
    workdir_lib.check_clearable(Path(workdir))
  # Process 0 owns the workdir (marker, lock, --fresh); the others only read it and write checkpoint shards.
  workdir = workdir_lib.prepare(workdir) if primary else Path(workdir)
  with (workdir_lib.lock(workdir) if primary else contextlib.nullcontext()), interrupt.handling(), \
      single_threaded_blas():
    if fresh and primary:
      removed = workdir_lib.clear(workdir)
      if removed:
        print(f"--fresh: removed {', '.join(removed)} from {workdir}")
      workdir_lib.prepare(workdir)
    _sync("maestro-train: workdir ready")
    return _train_and_evaluate(config, workdir, devices, progress, allow_changes)


def _train_and_evaluate(config, workdir, devices, progress, allow_changes) -> dict[str, Any]:
  primary = is_primary()
  changes = _check_resume(workdir, config, allow_changes)
  _sync("maestro-train: config checked")  # every process compared with the saved config before it is replaced
  if primary:
    workdir_lib.atomic_write_text(workdir / "config.json", config.to_json())

  task = tasks.get(config.task)
  sources = load_sources(config, workdir)  # a resumed language model reads its saved vocabulary
  if primary:
    task.save(sources, workdir)
  steps_per_epoch = task.steps_per_epoch(sources, config)
  total_steps = steps_per_epoch * config.epochs
  shards = Shards.for_config(config, devices)
  if primary and (shards.size > 1 or compute_dtype(config) != jnp.float32):
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    print(f"{shards.size} device(s){processes}, state {'sharded (fsdp)' if shards.fsdp else 'replicated'}, "
          f"compute {compute_dtype(config).name}")
  if config.batch_size % shards.size:
    raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {shards.size} devices")
  # Evaluation batches are padded and masked, so rounding their size up to the device count changes nothing.
  eval_batch_size = -(-config.eval_batch_size // shards.size) * shards.size

  fmodel, params, model_state = build_view(config, sources)
  optimizer = make_optimizer(config, total_steps)
  state = training.init_state(params, model_state, optimizer)
  initial_caps = maestro_jax.capacities(params)
  positions = layer_positions(config, sources, fmodel, params, model_state)
  full_size = report.sizes(params, None, positions)
  reslice_costs = component_macs(params, positions)
  examples_per_step = config.batch_size * (config.seq_len if task.per_token else 1)  # positions are per token
  manager = _checkpoint_manager(workdir, config)

  history: list[dict] = []
  config_changes: list[dict] = []
  earlier_seconds = 0.0  # wall time of the earlier sessions of this run
  restored = restore(manager, state, optimizer, set_aside_in=workdir if primary else None,
                     place=shards.state_shardings)
  if restored is not None:
    state, meta = restored
    history = meta["history"]
    config_changes = meta.get("config_changes", [])
    earlier_seconds = meta.get("wall_seconds", 0.0)
    if primary:
      print(f"resumed from step {meta['step']} (epoch {meta['step'] / steps_per_epoch:.2f}) in {workdir}")
    if changes:
      config_changes.append({"step": meta["step"], "changes": changes})
      if primary:
        with (workdir / "config_changes.jsonl").open("a") as f:
          f.write(json.dumps(config_changes[-1]) + "\n")
        print(f"resumed with changed {', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changes.items())} "
              f"(recorded in {workdir / 'config_changes.jsonl'})")
  # The record of every epoch lives in its checkpoint; metrics.jsonl is rewritten to match the restored one.
  if primary:
    workdir_lib.write_records(workdir, history)
  state = shards.put_state(state)
  lasso = config.lasso if not config.lasso_epochs else optax.piecewise_constant_schedule(
      config.lasso, {config.lasso_epochs * steps_per_epoch: 0.0})
  train_step = training.make_train_step(fmodel, optimizer, sampler=make_sampler(config), lasso=lasso,
                                        loss=config.loss, alpha=config.alpha,
                                        distill_weight=config.distill_weight,
                                        frobenius_decay=config.frobenius_decay,
                                        lasso_decoupled=config.lasso_decoupled, mesh=shards.step_mesh,
                                        min_shard_size=shards.min_size, fold_in_step=True)
  eval_step = training.make_eval_step(fmodel)
  recalibrate = jax.jit(fmodel.recalibrate)
  key = jax.random.key(config.seed)
  step = int(state["step"])
  saved_step = step if restored is not None else None
  tensorboard = report.tensorboard_writer(workdir) if primary else None
  start_time = time.perf_counter()

  def wall_seconds():
    return earlier_seconds + time.perf_counter() - start_time

  def recalibrated(state):
    if config.recalibrate_batches and jax.tree.leaves(state["model_state"]):
      calib = task.calibration_inputs(sources, config, config.recalibrate_batches)
      return recalibrate(state["params"], state["model_state"], shards.put_stacked(calib), state["ranks"])
    return state["model_state"]

  def evaluate(state, eval_state, *, periodic: bool) -> dict[str, float]:
    """The task's metrics on the held-out source, named ``<split>_<metric>``."""
    batches = task.eval_batches(sources.evaluation, config, eval_batch_size, periodic=periodic)
    result = training.evaluate(eval_step, state["params"], eval_state, (shards.put_batch(b) for b in batches),
                               state["ranks"])
    return task.metrics(task.eval_split, result["loss"], result["accuracy"])

  def newest_finite():
    manager.wait_until_finished()
    newest = manager.latest_step()
    if newest is None:
      return "No checkpoint was saved; start over with a lower learning_rate or lasso (add --fresh)"
    return (f"The newest finite checkpoint, step {newest}, is kept in {workdir / 'checkpoints'}; "
            "start over with a lower learning_rate or lasso (add --fresh)")

  def save(step):
    """Saves the state at ``step`` once; a state that is not finite is never saved."""
    nonlocal saved_step
    if step == saved_step:
      return
    if not state_is_finite(state):
      raise NonFiniteLossError(f"the train state is not finite at step {step}; stopped. {newest_finite()}")
    _save(manager, state, {"step": step, "capacities": maestro_jax.capacities(state["params"]),
                           "ranks": _host_ranks(state), "history": history, "config_changes": config_changes,
                           "wall_seconds": round(wall_seconds(), 3)})
    saved_step = step

  def check_finite(metrics, step):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(f"loss is {loss} at step {step}; stopped. {newest_finite()}")
    return loss

  def poll_signal():
    """A signal to stop on: checked every step with one process; with several, every ``log_every_steps``
    steps, since agreeing on it waits for the step to finish on every host."""
    if jax.process_count() > 1 and step % config.log_every_steps:
      return None
    return _agreed_signal()

  def stop(signum):
    """Saves (once) and raises Interrupted with where to resume from."""
    name = interrupt.signal.Signals(signum).name
    if saved_step is None and step == 0:
      raise Interrupted(signum, f"stopped by {name} before the first step; nothing to save")
    save(step)
    manager.wait_until_finished()
    raise Interrupted(signum, f"stopped by {name} at step {step}; saved, rerun the same command to resume from "
                              f"step {saved_step} ({workdir / 'checkpoints'})")

  # From here on a signal only stops the run at the next step boundary, after saving.
  with interrupt.deferred():
    try:
      last_plot = -PLOT_EVERY_SECONDS
      for epoch in range(step // steps_per_epoch, config.epochs):
        if signum := _agreed_signal():
          stop(signum)
        epoch_start = time.perf_counter()
        start_batch = step % steps_per_epoch
        stream = task.train_batches(sources, config, epoch, start_batch)
        bar = tqdm(stream, total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress or not primary, leave=False, dynamic_ncols=True)
        metrics = None
        for batch in bar:
          state, metrics = train_step(state, shards.put_batch(batch), key)  # draws with fold_in(key, step)
          if step % steps_per_epoch == start_batch:  # After the epoch's first step, the one that may compile.
            release_freed_memory()
          step += 1
          if step % config.log_every_steps == 0:
            loss = check_finite(metrics, step)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{float(metrics['accuracy']):.3f}")  # token accuracy for an LM
          if step % steps_per_epoch == 0:
            continue  # The epoch's end saves, with its record.
          if step % config.checkpoint_every_steps == 0:
            check_finite(metrics, step)
            save(step)
          if signum := poll_signal():
            bar.close()
            check_finite(metrics, step)
            stop(signum)
        bar.close()
        jax.block_until_ready(state)
        if metrics is not None:
          check_finite(metrics, step)
        train_seconds = time.perf_counter() - epoch_start

        old_ranks = _host_ranks(state)
        if config.shrink and config.factorized:
          ranks = maestro_jax.ranks_from_importance(host_copy(state["params"]), config.shrink_threshold,
                                                    old_ranks)
          if ranks != old_ranks:  # Only then is the whole state (optimizer included) brought to the host.
            host = host_copy(state)
            min_saving = config.reslice_min_saving
            examples_left = (config.epochs - epoch - 1) * steps_per_epoch * examples_per_step
            if min_saving and reslice_saved_macs(host["params"], ranks, config.rank_quantum, reslice_costs,
                                                 examples_left) < RESLICE_MIN_SAVED_MACS:
              min_saving = 1.0  # Too little compute left to pay for a recompile: zero the cut components only.
            params, opt_state, _ = maestro_jax.shrink(host["params"], ranks, quantum=config.rank_quantum,
                                                      opt_state=host["opt_state"], optimizer=optimizer,
                                                      min_saving=min_saving, component_costs=reslice_costs)
            state = shards.put_state(dict(host, params=params, opt_state=opt_state,
                                          ranks={k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()}))

        evaluated = evaluate(state, recalibrated(state), periodic=True)
        size = report.sizes(host_copy(state["params"]), _host_ranks(state), positions)
        record = {"epoch": epoch + 1, "step": step, "train_loss": float(metrics["loss"]),
                  "train_task_loss": float(metrics["task_loss"]), "penalty": float(metrics["penalty"]),
                  **evaluated, "ranks": _host_ranks(state), "params": size.params_merged, "macs": size.macs_merged,
                  "epoch_seconds": round(train_seconds, 3)}
        history.append(record)
        # The record is part of the checkpoint; metrics.jsonl gets it once the checkpoint is on disk, and a
        # resume rewrites metrics.jsonl from the restored checkpoint, so neither exists without the other.
        save(step)
        manager.wait_until_finished()
        if primary:
          workdir_lib.append_record(workdir, record)
          report.log_record(tensorboard, record)
          if epoch + 1 == config.epochs or time.monotonic() - last_plot >= PLOT_EVERY_SECONDS:
            report.plot_history(history, initial_caps, workdir, task.headline)
            last_plot = time.monotonic()
          print(f"epoch {epoch + 1}: {task.describe(evaluated, task.eval_split)}, "
                f"params {size.params_merged:,}, MACs {size.macs_merged:,}, {train_seconds:.1f}s")
        release_freed_memory()

      ranks = _host_ranks(state)
      final = dict(history[-1]) if history else {}
      if config.task == "language_modeling" and config.eval_max_windows and history:
        # Epochs scored a prefix of the held-out text; the run's result is the whole of it.
        final.update(evaluate(state, recalibrated(state), periodic=False))
        if primary:
          print(f"full {task.describe(final, task.eval_split)}")
      summary = report.summary(config, report.sizes(host_copy(state["params"]), ranks, positions), full_size,
                               history, initial_caps, ranks, wall_seconds=wall_seconds(), final_metrics=final)
      if primary:
        report.write_summary(summary, workdir)
    finally:
      if tensorboard is not None:
        tensorboard.close()
      manager.wait_until_finished()
      manager.close()
    if interrupt.requested():  # Arrived after the last epoch's checkpoint: nothing is lost.
      signum = interrupt.requested()
      raise Interrupted(signum, f"stopped by {interrupt.signal.Signals(signum).name} after the run finished "
                                f"(step {step} is saved)")
  return summary
