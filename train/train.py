"""``train_and_evaluate(config, workdir)``: train once with Maestro, come out with ranks and a family of models.

Per step: keep counts are sampled from the step's key and the jitted, donated
train step runs data-parallel over all devices. Per epoch: progressive
shrinking (params and optimizer state sliced), BatchNorm recalibration on
training batches, evaluation, a JSON-lines record, plots and a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Mapping
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
from maestro_jax import accounting
from maestro_jax import data as data_lib
from maestro_jax import models
from maestro_jax import nnx as mnx
from maestro_jax import training
from . import config as config_lib
from . import report

REPO_ROOT = Path(__file__).resolve().parents[1]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


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


def make_sampler(config: config_lib.Config) -> maestro_jax.Sampler:
  if config.sampler == "decomposable":
    return maestro_jax.decomposable_sampler(**config.sampler_kwargs)
  return maestro_jax.make_sampler(config.sampler, **config.sampler_kwargs)


def load_data(config: config_lib.Config):
  """The train and test sources of the configured dataset."""
  idx_dir = config.idx_dir
  if idx_dir == "auto":
    idx_dir = data_lib.default_idx_dir(config.dataset)
  kw = dict(data_dir=config.data_dir, download=config.download, idx_dir=idx_dir)
  return data_lib.load(config.dataset, "train", **kw), data_lib.load(config.dataset, "test", **kw)


def build_model(config: config_lib.Config, source) -> nnx.Module:
  """The configured model; with ``init_from``, a trained dense run's model factorized by SVD."""
  if config.init_from:
    run = load_run(config.init_from)
    if run.config.factorized:
      raise ValueError(f"init_from={config.init_from!r} must be a dense run (factorized=False)")
    model = run.model.to_module(jax.device_get(run.state["params"]), jax.device_get(run.state["model_state"]))
    # At rank_fraction None the function is unchanged (Pufferfish's switch from dense warm-up).
    return mnx.factorize(model, rank_fraction=config.rank_fraction, skip=tuple(config.dense_layers))
  return models.make_model(config.model, num_classes=source.num_classes, image_shape=source.image_shape,
                           factorized=config.factorized, rngs=nnx.Rngs(config.seed), **config.model_kwargs)


class Shards:
  """Data parallelism from JAX itself: batches split over a 1-D ``data`` mesh, the state replicated."""

  def __init__(self, devices=None):
    self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch = NamedSharding(self.mesh, PartitionSpec("data"))

  @property
  def size(self) -> int:
    return self.mesh.size

  def put_state(self, state):
    return jax.device_put(state, self.replicated)

  def put_batch(self, batch: Mapping[str, np.ndarray]):
    return {k: jax.make_array_from_process_local_data(self.batch, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(workdir: Path, config: config_lib.Config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                               item_names=("state", "meta"))


def _check_identity(workdir: Path, config: config_lib.Config) -> None:
  """Refuses a workdir whose checkpoints come from a different run configuration."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  saved = json.loads(saved_path.read_text())
  mine = json.loads(config.to_json())
  diffs = [f"{k}: {saved.get(k)!r} != {mine.get(k)!r}" for k in config_lib.IDENTITY_FIELDS
           if saved.get(k) != mine.get(k)]
  if diffs and (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise ValueError(f"workdir {workdir} holds checkpoints of another config ({'; '.join(diffs)}); "
                     "use another workdir or pass --fresh to start over")


def restore(manager: ocp.CheckpointManager, fresh_state: dict, optimizer) -> tuple[dict, dict] | None:
  """The latest checkpoint as ``(state, meta)``, or None when there is none.

  The saved capacities are read first and a fresh state is shrunk to them, so a
  checkpoint written after shrinking restores into the right shapes.
  """
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  params, opt_state, _ = maestro_jax.shrink(fresh_state["params"], meta["capacities"],
                                            opt_state=fresh_state["opt_state"], optimizer=optimizer)
  target = dict(fresh_state, params=params, opt_state=opt_state,
                ranks={k: jnp.asarray(v, jnp.int32) for k, v in meta["ranks"].items()})
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  return state, meta


def _save(manager, state, meta, *, force: bool = False):
  manager.save(int(meta["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=force)


@dataclasses.dataclass
class Run:
  """A trained run loaded back from its workdir (see :func:`load_run`)."""
  config: config_lib.Config
  model: training.FunctionalModel
  state: dict
  train_source: Any
  test_source: Any
  positions: dict[str, int]
  initial_capacities: dict[str, int]

  @property
  def ranks(self) -> dict[str, int]:
    return _host_ranks(self.state)


def load_run(workdir: str | Path) -> Run:
  """Loads the latest checkpoint of a run, with its config, model and data.

  Raises:
    FileNotFoundError: ``workdir`` holds no config or no checkpoint.
  """
  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a maestro-train workdir (no config.json)")
  config = config_lib.Config(**json.loads((workdir / "config.json").read_text())).validate()
  if not (workdir / "checkpoints").is_dir():  # Checked first: the manager would create the folder.
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  train_src, test_src = load_data(config)
  model = build_model(config, train_src)
  fmodel, params, model_state = training.FunctionalModel.from_module(model)
  steps = data_lib.num_batches(len(train_src), config.batch_size, drop_remainder=True) * config.epochs
  optimizer = make_optimizer(config, steps)
  manager = _checkpoint_manager(workdir, config)
  try:
    restored = restore(manager, training.init_state(params, model_state, optimizer), optimizer)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  return Run(config, fmodel, restored[0], train_src, test_src,
             accounting.layer_positions(model, train_src.image_shape), maestro_jax.capacities(params))


# ----------------------------------------------------------------------------- the run


def _host_ranks(state) -> dict[str, int]:
  return {k: int(v) for k, v in state["ranks"].items()}


def _calibration_images(source, config, count: int):
  """``count`` unaugmented training batches stacked as ``(count, B, H, W, C)`` for BatchNorm recalibration."""
  it = data_lib.batches(source, config.batch_size, seed=config.seed + 1, epoch=0, train=True, augment=False)
  images = [b["image"] for _, b in zip(range(count), it)]
  return np.stack(images)


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


def train_and_evaluate(config: config_lib.Config, workdir: str | Path, *, devices=None,
                       progress: bool = True) -> dict[str, Any]:
  """Trains and evaluates; resumes from the latest checkpoint in ``workdir`` when there is one.

  Args:
    config: the run configuration.
    workdir: where checkpoints, ``metrics.jsonl``, plots and the summary go.
    devices: devices to shard batches over (default: all).
    progress: show a progress bar.

  Returns:
    The summary dict (also written to ``workdir/summary.json``).
  """
  with single_threaded_blas():
    return _train_and_evaluate(config, workdir, devices, progress)


def _train_and_evaluate(config, workdir, devices, progress) -> dict[str, Any]:
  config.validate()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _check_identity(workdir, config)
  (workdir / "config.json").write_text(config.to_json())

  train_src, test_src = load_data(config)
  steps_per_epoch = data_lib.num_batches(len(train_src), config.batch_size, drop_remainder=True)
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={config.batch_size} is larger than the {len(train_src)} training examples")
  total_steps = steps_per_epoch * config.epochs
  shards = Shards(devices)
  if config.batch_size % shards.size:
    raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {shards.size} devices")
  # Evaluation batches are padded and masked, so rounding their size up to the device count changes nothing.
  eval_batch_size = -(-config.eval_batch_size // shards.size) * shards.size

  model = build_model(config, train_src)
  fmodel, params, model_state = training.FunctionalModel.from_module(model)
  optimizer = make_optimizer(config, total_steps)
  state = training.init_state(params, model_state, optimizer)
  initial_caps = maestro_jax.capacities(params)
  positions = accounting.layer_positions(model, train_src.image_shape)
  full_size = report.sizes(params, None, positions)
  manager = _checkpoint_manager(workdir, config)

  history: list[dict] = []
  restored = restore(manager, state, optimizer)
  if restored is not None:
    state, meta = restored
    history = meta["history"]
    print(f"resumed from step {meta['step']} (epoch {meta['step'] / steps_per_epoch:.2f}) in {workdir}")
  state = shards.put_state(state)
  train_step = training.make_train_step(fmodel, optimizer, sampler=make_sampler(config), lasso=config.lasso,
                                        loss=config.loss, alpha=config.alpha,
                                        frobenius_decay=config.frobenius_decay)
  eval_step = training.make_eval_step(fmodel)
  recalibrate = jax.jit(fmodel.recalibrate)
  key = jax.random.key(config.seed)
  step = int(state["step"])
  metrics_file = (workdir / "metrics.jsonl").open("a")
  tensorboard = report.tensorboard_writer(workdir)

  def meta_for(step):
    return {"step": step, "capacities": maestro_jax.capacities(state["params"]), "ranks": _host_ranks(state),
            "history": history}

  def check_finite(metrics, step):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      manager.wait_until_finished()
      raise NonFiniteLossError(f"loss is {loss} at step {step}; stopped. The last good checkpoint "
                               f"(step {manager.latest_step()}) is kept in {workdir / 'checkpoints'}. "
                               "Try a lower learning_rate or lasso.")
    return loss

  start_time = time.perf_counter()
  try:
    for epoch in range(step // steps_per_epoch, config.epochs):
      epoch_start = time.perf_counter()
      start_batch = step % steps_per_epoch
      stream = data_lib.batches(train_src, config.batch_size, seed=config.seed, epoch=epoch,
                                start_batch=start_batch, train=True)
      bar = tqdm(stream, total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{config.epochs}",
                 disable=not progress, leave=False, dynamic_ncols=True)
      metrics = None
      for batch in bar:
        state, metrics = train_step(state, shards.put_batch(batch), jax.random.fold_in(key, step))
        step += 1
        if step % config.log_every_steps == 0:
          loss = check_finite(metrics, step)
          bar.set_postfix(loss=f"{loss:.4f}", acc=f"{float(metrics['accuracy']):.3f}")
        if step % config.checkpoint_every_steps == 0 and step % steps_per_epoch:
          check_finite(metrics, step)
          _save(manager, state, meta_for(step))
      bar.close()
      jax.block_until_ready(state)
      if metrics is not None:
        check_finite(metrics, step)
      train_seconds = time.perf_counter() - epoch_start

      old_ranks = _host_ranks(state)
      if config.shrink and config.factorized:
        ranks = maestro_jax.ranks_from_importance(jax.device_get(state["params"]), config.shrink_threshold,
                                                  old_ranks)
        if ranks != old_ranks:  # Only then is the whole state (optimizer included) brought to the host.
          host = jax.device_get(state)
          params, opt_state, _ = maestro_jax.shrink(host["params"], ranks, quantum=config.rank_quantum,
                                                    opt_state=host["opt_state"], optimizer=optimizer)
          state = shards.put_state(dict(host, params=params, opt_state=opt_state,
                                        ranks={k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()}))

      eval_state = state["model_state"]
      if config.recalibrate_batches and jax.tree.leaves(eval_state):
        calib = _calibration_images(train_src, config, config.recalibrate_batches)
        eval_state = recalibrate(state["params"], state["model_state"], jnp.asarray(calib), state["ranks"])
      test = training.evaluate(eval_step, state["params"], eval_state,
                               (shards.put_batch(b) for b in data_lib.batches(
                                   test_src, eval_batch_size, train=False)), state["ranks"])
      size = report.sizes(state["params"], _host_ranks(state), positions)
      record = {"epoch": epoch + 1, "step": step, "train_loss": float(metrics["loss"]),
                "train_task_loss": float(metrics["task_loss"]), "penalty": float(metrics["penalty"]),
                "test_accuracy": test["accuracy"], "test_loss": test["loss"], "ranks": _host_ranks(state),
                "params": size.params_merged, "macs": size.macs_merged, "epoch_seconds": round(train_seconds, 3)}
      history.append(record)
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()
      report.log_record(tensorboard, record)
      _save(manager, state, meta_for(step), force=True)
      report.plot_history(history, initial_caps, workdir)
      print(f"epoch {epoch + 1}: test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}, "
            f"params {size.params_merged:,}, MACs {size.macs_merged:,}, {train_seconds:.1f}s")
  except KeyboardInterrupt:
    _save(manager, state, meta_for(step), force=True)
    manager.wait_until_finished()
    print(f"\ninterrupted at step {step}; saved a checkpoint to resume from")
    raise
  finally:
    metrics_file.close()
    if tensorboard is not None:
      tensorboard.close()
    manager.wait_until_finished()

  ranks = _host_ranks(state)
  summary = report.summary(config, report.sizes(state["params"], ranks, positions), full_size, history,
                           initial_caps, ranks, wall_seconds=time.perf_counter() - start_time)
  report.write_summary(summary, workdir)
  manager.close()
  return summary
