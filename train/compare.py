"""One command that compares Maestro with the related low-rank methods and baselines.

``maestro-compare`` (or ``python -m train.compare``) trains LeNet-5 on MNIST and
on Fashion-MNIST with six methods, each a :class:`~maestro_train.config.Config`
variation run by :func:`maestro_train.train.train_and_evaluate` in its own workdir
``OUT/<dataset>/<method>``:

1. ``dense``: the plain LeNet-5 (``factorized=False``).
2. ``maestro``: ordered dropout (``sampler='single_layer'``) with the paper's
   loss (``loss='maestro'``: the sampled model on the labels, one forward pass),
   hierarchical group lasso and progressive shrinking.
3. ``decomposable``: Decomposable-Net, a global share ``Z ~ U(0.01, 1)`` of all
   components kept per step by singular value, loss
   ``(1 - alpha) L_full + alpha L_low`` with ``alpha = 0.5``; no lasso, no shrinking.
4. ``pufferfish``: a dense warm-up run (constant learning rate), then its model
   factorized by truncated SVD at ``rank_fraction`` (0.25) of every layer's rank,
   the first layer left dense, and trained at that fixed rank for the remaining epochs.
5. ``svd``: post-hoc truncated SVD of the trained dense model
   (:func:`maestro_jax.truncate_dense_params` at several fractions); no training.
6. ``spectral``: spectral init (factorized layers start as the SVD of a dense
   init) plus Frobenius decay ``1e-4 * sum ||A B||_F^2`` instead of weight decay.

All training runs share the optimizer (SGD, momentum 0.9, batch 128, learning
rate 0.02 with a cosine schedule, coupled weight decay 1e-4) and the number of
epochs; Pufferfish's warm-up plus fixed-rank phase add up to the same number.
Every method sets its own ``loss`` (``'decomposable'`` for Decomposable-Net,
``'maestro'`` for all others, which without a sampler is plain cross-entropy of
the full model), so a base config's loss (``mnist_lenet`` distills) never leaks
into a method. The exact config of every run is stated: in
``comparison.json`` (``config`` per method, every field), in the console
(the fields that differ from the base when a run starts) and in
``comparison.md`` (the fields shared by all runs, then each run's own).

Per method it reports the final test accuracy, the parameters and MACs of the
deployable model (:mod:`maestro_jax.accounting`'s merged form: per layer, the
smaller of the dense kernel and the kept factors) and the training wall time.
Methods that yield a family of models are swept: Maestro at fractions of its
trained ranks, Decomposable-Net at global budgets
(:func:`maestro_jax.global_budget_keeps`), post-hoc SVD at its truncation
fractions. It writes ``comparison.md`` (one table), ``comparison.png``
(accuracy vs MACs, a panel per dataset) and ``comparison.json`` into ``--out``.

``--small`` is the CI setting: scikit-learn's 8x8 digits and an MLP instead of
LeNet-5 on MNIST (always offline, about a minute on 2 CPU cores); with
``--small --datasets mnist`` it is LeNet-5 on the first 4,096 training and
1,000 test images instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")  # Files only; no display is assumed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import maestro_jax  # noqa: E402
from maestro_jax import data as data_lib  # noqa: E402
from maestro_jax import nnx as mnx  # noqa: E402
from maestro_jax import sweep as sweep_lib  # noqa: E402
from maestro_jax import training  # noqa: E402
from . import config as config_lib  # noqa: E402
from . import layout  # noqa: E402
from . import report  # noqa: E402
from . import train as train_lib  # noqa: E402

METHODS = ("dense", "maestro", "decomposable", "pufferfish", "svd", "spectral")
LABELS = {
    "dense": "Dense",
    "maestro": "Maestro",
    "decomposable": "Decomposable-Net",
    "pufferfish": "Pufferfish",
    "svd": "Post-hoc SVD",
    "spectral": "Spectral init + Frobenius decay",
}
FULL_DATASETS = ("mnist", "fashion_mnist")
SMALL_DATASETS = ("digits", "mnist", "fashion_mnist")
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1)
RANK_FRACTION = 0.25  # Pufferfish's fixed rank: a quarter of every factorized layer's full rank.
FROBENIUS_DECAY = 1e-4
SMALL_SUBSET = (4096, 1000)  # --small with MNIST/Fashion-MNIST: first training and test images.
_DONE_FILE = "compare_run.json"


class DataMissingError(FileNotFoundError):
  """A dataset's offline files (or a prepared tfds copy) were not found."""


@dataclasses.dataclass(frozen=True)
class Setting:
  """What one dataset's comparison trains.

  Attributes:
    dataset: the dataset name (a panel and a table section).
    base: the config every method varies (optimizer, epochs, model, data).
    maestro_lasso: Maestro's group-lasso weight.
    first_layer: the layer Pufferfish keeps dense.
    description: one line for the table header.
  """

  dataset: str
  base: config_lib.Config
  maestro_lasso: float
  first_layer: str
  description: str


# ----------------------------------------------------------------------------- settings and configs


def _subset_idx(source_dir: Path, target: Path, sizes: tuple[int, int]) -> Path:
  """Writes the first ``sizes`` training/test images of an IDX dataset to ``target`` (reused if present)."""
  if data_lib.has_idx_files(target):
    return target
  target.mkdir(parents=True, exist_ok=True)
  for split, n in zip(("train", "test"), sizes):
    images, labels = data_lib.load_idx_split(source_dir, split)
    stem_images, stem_labels = data_lib.IDX_FILES[split]
    data_lib.write_idx(target / stem_images, images[:n, ..., 0])
    data_lib.write_idx(target / stem_labels, labels[:n].astype(np.uint8))
  return target


def _missing_data_message(dataset: str, detail: str) -> str:
  return (f"{dataset}: the offline data is missing ({detail}). Put the original IDX files "
          f"(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
          f"t10k-labels-idx1-ubyte[.gz]) in shared/data/{dataset}/ beside the repository or pass "
          f"--idx-root DIR with them in DIR/{dataset}/; or prepare tfds's copy once with network access "
          f"(`tfds build {dataset} --file_format=array_record --data_dir=DIR`) and pass --tfds-dir DIR. "
          "--small runs on scikit-learn's digits, which need no files.")


def _idx_source(dataset: str, idx_root: str | None) -> Path | None:
  if idx_root is not None:
    return Path(idx_root) / dataset
  return layout.find_idx_dir(dataset)


def make_settings(datasets: Sequence[str], *, epochs: int, small: bool, out: Path, idx_root: str | None = None,
                  tfds_dir: str | None = None) -> list[Setting]:
  """The base config of every dataset.

  Args:
    datasets: dataset names; ``mnist``/``fashion_mnist``, and with ``small`` also ``digits``.
    epochs: training epochs of every method.
    small: the CI setting (digits and an MLP; MNIST-type datasets on a subset).
    out: the output folder (``--small`` MNIST subsets are written to ``out/data``).
    idx_root: a folder holding ``<dataset>/`` folders of IDX files (default:
      ``shared/data`` beside the repository).
    tfds_dir: read tfds's prepared copy from this data dir instead of IDX files.

  Returns:
    One :class:`Setting` per dataset.

  Raises:
    ValueError: an unknown dataset or too few epochs.
    DataMissingError: a dataset's files are not found.
  """
  allowed = SMALL_DATASETS if small else FULL_DATASETS
  for name in datasets:
    if name not in allowed:
      raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(allowed)}"
                       + ("" if small else " (digits only with --small)"))
  if not datasets:
    raise ValueError("no datasets given")
  if epochs < 2:
    raise ValueError(f"--epochs must be >= 2 (Pufferfish needs a warm-up and a low-rank phase), got {epochs}")
  common = dict(epochs=epochs, learning_rate=0.02, schedule="cosine", lasso=0.0, checkpoint_every_steps=10**9,
                log_every_steps=50)
  settings = []
  for name in datasets:
    if name == "digits":
      base = dataclasses.replace(config_lib.load("digits_mlp"), **common)
      settings.append(Setting(name, base, maestro_lasso=3e-3, first_layer="layers.0", description=(
          f"scikit-learn 8x8 digits (1,438 train / 359 test), MLP 64-256-256-10, {epochs} epochs, batch 64 "
          "(CI smoke setting, not LeNet-5 on MNIST)")))
      continue
    base = dataclasses.replace(config_lib.load(f"{name}_lenet"), **common)
    if tfds_dir is not None:
      base = dataclasses.replace(base, idx_dir=None, data_dir=tfds_dir)
      where = f"tfds copy in {tfds_dir}"
    else:
      source = _idx_source(name, idx_root)
      if source is None or not data_lib.has_idx_files(source):
        detail = (f"no IDX files in {source}" if source is not None else
                  "no IDX files in shared/data/" + name + " beside the repository")
        raise DataMissingError(_missing_data_message(name, detail))
      base = dataclasses.replace(base, idx_dir=str(source))
      where = f"IDX files in {repo_relative(source)}"
    description = f"LeNet-5, {epochs} epochs, batch 128 ({where})"
    if small:
      if base.idx_dir is None:
        raise ValueError("--small with mnist/fashion_mnist reads a subset of the IDX files; drop --tfds-dir")
      n_train, n_test = SMALL_SUBSET
      subset = _subset_idx(Path(base.idx_dir), out / "data" / name, SMALL_SUBSET)
      base = dataclasses.replace(base, idx_dir=str(subset.resolve()))
      description = (f"LeNet-5 on the first {n_train:,} training / {n_test:,} test images only, {epochs} epochs, "
                     "batch 128 (CI smoke setting)")
    settings.append(Setting(name, base, maestro_lasso=3e-4, first_layer="conv1", description=description))
  return settings


def warmup_epochs(epochs: int) -> int:
  """Pufferfish's dense warm-up: a fifth of the epochs, at least 1, leaving at least 1 for the low-rank phase."""
  return min(max(1, round(0.2 * epochs)), epochs - 1)


def method_configs(setting: Setting, workdirs: dict[str, Path], *,
                   rank_fraction: float | None = RANK_FRACTION) -> dict[str, config_lib.Config]:
  """The config of every training run of one dataset.

  Keys are the method names that train plus ``pufferfish_warmup`` (post-hoc
  SVD trains nothing: it truncates the ``dense`` run).

  Args:
    setting: the dataset's setting.
    workdirs: the workdir of every run (``pufferfish`` starts from ``pufferfish_warmup``'s).
    rank_fraction: Pufferfish's share of every layer's rank (None: full rank).

  Returns:
    ``{run name: Config}``, validated.
  """
  base = setting.base
  warm = warmup_epochs(base.epochs)
  # Every run names its loss and sampler settings: the base's (a config's own recipe) must not decide any method's.
  base = dataclasses.replace(base, sampler_kwargs={}, lasso_epochs=0)
  plain = dict(lasso=0.0, shrink=False, loss="maestro")
  configs = {
      "dense": dataclasses.replace(base, factorized=False, sampler="none", **plain),
      "maestro": dataclasses.replace(base, sampler="single_layer", loss="maestro", lasso=setting.maestro_lasso,
                                     shrink=True),
      "decomposable": dataclasses.replace(base, sampler="decomposable", **dict(plain, loss="decomposable"),
                                          alpha=0.5),
      "pufferfish_warmup": dataclasses.replace(base, factorized=False, sampler="none", epochs=warm,
                                               schedule="constant", **plain),
      "pufferfish": dataclasses.replace(base, init_from=str(Path(workdirs["pufferfish_warmup"]).resolve()),
                                        rank_fraction=rank_fraction, dense_layers=(setting.first_layer,),
                                        sampler="none", epochs=base.epochs - warm, **plain),
      "spectral": dataclasses.replace(base, sampler="none", weight_decay=0.0, frobenius_decay=FROBENIUS_DECAY,
                                      **plain),
  }
  return {name: config.validate() for name, config in configs.items()}


# ----------------------------------------------------------------------------- running


def epoch_records(workdir: Path) -> list[dict[str, Any]]:
  """The run's own record of every epoch, as the runner wrote it to ``workdir/metrics.jsonl`` (empty if none)."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_epoch(record: dict[str, Any], epochs: int) -> str:
  """One console line for one epoch's record (test accuracy and loss, deployed size, seconds)."""
  return (f"epoch {record['epoch']}/{epochs}: test accuracy {100 * record['test_accuracy']:.2f}%, "
          f"loss {record['test_loss']:.4f}, params {record['params']:,}, MACs {record['macs']:,}, "
          f"{record['epoch_seconds']:.1f} s")


def _config_dict(config: config_lib.Config) -> dict:
  return json.loads(config.to_json())


# Fields that change no result (how often to log and checkpoint); left out of the tables, kept in the JSON.
BOOKKEEPING_FIELDS = ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "download")


def repo_relative(path: str | Path) -> str:
  """An absolute path as seen from the repository root (its last two parts when far outside), so that committed
  reports name no machine's folders."""
  if not os.path.isabs(path):
    return str(path)
  relative = os.path.relpath(path, layout.REPO)
  return relative if not relative.startswith(os.path.join("..", "..")) else os.path.join("…", *Path(path).parts[-2:])


def _format_value(value: Any) -> str:
  """As a ``maestro-train`` override would spell it (Python literals, bare strings; paths from the repository)."""
  if isinstance(value, str):
    return repo_relative(value) if os.path.isabs(value) else value
  return f"{value:g}" if isinstance(value, float) else repr(value)


def config_changes(config: dict, base: dict) -> str:
  """``key=value`` for every field of ``config`` (a config dict) that differs from ``base``, in field order."""
  return " ".join(f"{k}={_format_value(v)}" for k, v in config.items()
                  if k not in BOOKKEEPING_FIELDS and base.get(k) != v) or "(the base config)"


def config_table(runs: dict[str, dict]) -> list[str]:
  """Markdown lines stating every run's exact config: the fields all runs share, then each run's own.

  Args:
    runs: ``{run label: config dict}`` (as stored in ``comparison.json``).
  """
  fields = [k for k in next(iter(runs.values())) if k not in BOOKKEEPING_FIELDS]
  shared = {k: v for k, v in next(iter(runs.values())).items()
            if k in fields and all(c.get(k) == v for c in runs.values())}
  lines = ["Shared by every run: " + " ".join(f"`{k}={_format_value(v)}`" for k, v in shared.items()), "",
           "| run | its own config fields |", "|---|---|"]
  for label, config in runs.items():
    own = " ".join(f"`{k}={_format_value(config[k])}`" for k in fields if k not in shared)
    lines.append(f"| {label} | {own} |")
  return lines


def train_run(config: config_lib.Config, workdir: Path, *, log: Callable[[str], None] = print,
              verbose: bool = False) -> dict[str, Any]:
  """Trains one run (or reuses a finished one with the same config); returns its summary and train seconds.

  A workdir without a finished record of the same config is cleared first,
  so that the wall time covers one whole, uninterrupted training run. The
  run's console output goes to ``<workdir>.log`` beside the workdir, which
  holds only what the runner writes (it refuses a folder with other files)
  plus, once finished, this command's record. Once the run ends, one line per
  epoch is logged from its ``metrics.jsonl``.
  """
  done = workdir / _DONE_FILE
  if done.exists():
    record = json.loads(done.read_text())
    if record.get("config") == _config_dict(config):
      log(f"      reusing the finished run in {workdir}")
      return dict(record, reused=True)
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  start, cpu_start = time.perf_counter(), time.process_time()
  with open(workdir.parent / f"{workdir.name}.log", "w") as log_file:
    # The runner's console text is kept whole in the log; what this command reports comes from the run's own
    # records (the returned summary, metrics.jsonl), never from parsing that text.
    with contextlib.redirect_stdout(sys.stdout if verbose else log_file):
      summary = train_lib.train_and_evaluate(config, workdir, progress=verbose)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  if not verbose:  # verbose runs printed their own epoch lines as they went
    for epoch in epoch_records(workdir):
      log(f"      {format_epoch(epoch, config.epochs)}")
  # CPU seconds (all of the process's threads) depend far less than wall time on what else the machine runs.
  record = {"config": _config_dict(config), "summary": summary, "train_seconds": round(seconds, 2),
            "train_cpu_seconds": round(cpu_seconds, 2)}
  done.write_text(json.dumps(record, indent=2))
  return record


def _calibration(run: train_lib.Run):
  """Calibration images for BatchNorm recalibration of every swept model, or None without model state."""
  if not jax.tree.leaves(run.state["model_state"]) or not run.config.recalibrate_batches:
    return None
  calibration_images = train_lib.calibration_images
  return calibration_images(run.train_source, run.config, run.config.recalibrate_batches)


def _test_batches(run: train_lib.Run):
  return data_lib.batches(run.test_source, run.config.eval_batch_size, train=False)


def _family_sweep(run: train_lib.Run, stacked: dict, settings: list[str], fractions: Sequence[float]) -> list[dict]:
  params, state = run.state["params"], run.state["model_state"]
  result = sweep_lib.sweep(run.model, params, state, _test_batches(run), stacked,
                           calibration_images=_calibration(run))
  cost = sweep_lib.costs(params, stacked, run.positions)
  keeps = sweep_lib.unstack(stacked)
  return [{"setting": s, "fraction": float(f), "accuracy": float(result["accuracy"][i]),
           "params": int(cost["params"][i]), "macs": int(cost["macs"][i]), "keeps": keeps[i]}
          for i, (s, f) in enumerate(zip(settings, fractions))]


def maestro_family(run: train_lib.Run, fractions: Sequence[float]) -> list[dict]:
  """Every layer at ``ceil(p * trained rank)`` for each fraction ``p``."""
  stacked = sweep_lib.fraction_grid(run.ranks, fractions)
  names = ["trained ranks" if p == 1.0 else f"{100 * p:g}% of each trained rank" for p in fractions]
  return _family_sweep(run, stacked, names, fractions)


def decomposable_family(run: train_lib.Run, fractions: Sequence[float]) -> list[dict]:
  """Decomposable-Net's global budgets: the ``ceil(p * sum(ranks))`` largest singular values network-wide."""
  stacked = sweep_lib.global_budget(run.state["params"], run.ranks, fractions)
  names = ["full rank" if p == 1.0 else f"global budget {100 * p:g}% of components" for p in fractions]
  return _family_sweep(run, stacked, names, fractions)


def svd_family(dense: train_lib.Run, fractions: Sequence[float]) -> tuple[list[dict], float]:
  """Post-hoc truncated SVD of a trained dense run at every fraction; returns the points and the SVD seconds."""
  params, state = jax.device_get(dense.state["params"]), jax.device_get(dense.state["model_state"])
  module = mnx.factorize(dense.model.to_module(params, state))  # full rank: the factorized model's structure
  fmodel, _, _ = training.FunctionalModel.from_module(module)
  eval_step = training.make_eval_step(fmodel)
  points, svd_seconds = [], 0.0
  for p in fractions:
    start = time.perf_counter()
    truncated = jax.block_until_ready(maestro_jax.truncate_dense_params(params, p))
    svd_seconds += time.perf_counter() - start
    test = training.evaluate(eval_step, truncated, state, _test_batches(dense))
    size = report.sizes(truncated, None, dense.positions)
    caps = {name: int(v) for name, v in maestro_jax.capacities(truncated).items()}
    points.append({"setting": f"rank {100 * p:g}% of each layer", "fraction": float(p), "accuracy": test["accuracy"],
                   "params": size.params_merged, "macs": size.macs_merged, "keeps": caps})
  return points, svd_seconds


def _point(record: dict, run: train_lib.Run, setting: str) -> dict:
  size = report.sizes(run.state["params"], run.ranks or None, run.positions)
  return {"setting": setting, "fraction": 1.0, "accuracy": float(record["summary"]["test_accuracy"]),
          "params": size.params_merged, "macs": size.macs_merged, "keeps": run.ranks}


def compare_dataset(setting: Setting, out: Path, *, fractions: Sequence[float] = FRACTIONS,
                    rank_fraction: float | None = RANK_FRACTION, log: Callable[[str], None] = print,
                    verbose: bool = False) -> dict[str, Any]:
  """Trains and evaluates every method on one dataset; returns its JSON-ready results."""
  root = out / setting.dataset
  runs = ("dense", "maestro", "decomposable", "pufferfish_warmup", "pufferfish", "spectral")
  workdirs = {name: root / name for name in runs}
  configs = method_configs(setting, workdirs, rank_fraction=rank_fraction)
  results: dict[str, Any] = {}
  order = list(METHODS)

  def header(method: str, what: str):
    log(f"[{setting.dataset}] ({order.index(method) + 1}/{len(order)}) {LABELS[method]}: {what}")

  base = _config_dict(setting.base)

  def trained(name: str, method: str) -> tuple[dict, train_lib.Run]:
    config = configs[name]
    header(method, f"training {config.epochs} epochs{' (dense warm-up)' if name == 'pufferfish_warmup' else ''} "
                   f"in {workdirs[name]}")
    log(f"      config: {config_changes(_config_dict(config), base)}")
    record = train_run(config, workdirs[name], log=log, verbose=verbose)
    return record, train_lib.load_run(workdirs[name])

  def finish(method: str, entry: dict):
    entry["label"] = LABELS[method]
    results[method] = entry
    p = entry["point"]
    log(f"      -> {100 * p['accuracy']:.2f}% test accuracy, {p['params']:,} params, {p['macs']:,} MACs, "
        f"{entry['train_seconds']:.1f} s training" + (f"; family of {len(entry['family'])} models"
                                                      if len(entry["family"]) > 1 else ""))

  def entry(record: dict, name: str, **fields) -> dict:
    return {**fields, "train_seconds": record["train_seconds"], "train_cpu_seconds": record.get("train_cpu_seconds"),
            "reused": record.get("reused", False),
            "workdir": str(workdirs[name]), "config": record["config"]}

  record, dense = trained("dense", "dense")
  point = _point(record, dense, "trained")
  finish("dense", entry(record, "dense", point=point, family=[point]))

  record, run = trained("maestro", "maestro")
  finish("maestro", entry(record, "maestro", point=_point(record, run, "trained ranks"),
                          family=maestro_family(run, fractions), ranks=run.ranks))

  record, run = trained("decomposable", "decomposable")
  finish("decomposable", entry(record, "decomposable", point=_point(record, run, "full rank"),
                               family=decomposable_family(run, fractions)))

  warm_record, _ = trained("pufferfish_warmup", "pufferfish")
  record, run = trained("pufferfish", "pufferfish")
  share = "full rank" if rank_fraction is None else f"rank {100 * rank_fraction:g}%"
  point = _point(record, run, f"{share}, {setting.first_layer} dense")
  puff = entry(record, "pufferfish", point=point, family=[point], ranks=run.ranks,
               warmup_epochs=configs["pufferfish_warmup"].epochs, warmup_seconds=warm_record["train_seconds"],
               warmup_config=warm_record["config"])
  puff["train_seconds"] = round(warm_record["train_seconds"] + record["train_seconds"], 2)
  if puff["train_cpu_seconds"] is not None and warm_record.get("train_cpu_seconds") is not None:
    puff["train_cpu_seconds"] = round(warm_record["train_cpu_seconds"] + puff["train_cpu_seconds"], 2)
  puff["reused"] = puff["reused"] or warm_record.get("reused", False)
  finish("pufferfish", puff)

  header("svd", f"truncating the dense model at fractions {', '.join(f'{p:g}' for p in fractions)}")
  family, svd_seconds = svd_family(dense, fractions)
  headline = min(family, key=lambda q: abs(q["fraction"] - (rank_fraction or 1.0)))
  finish("svd", {"point": headline, "family": family, "svd_seconds": round(svd_seconds, 3),
                 "train_seconds": round(results["dense"]["train_seconds"] + svd_seconds, 2),
                 "train_cpu_seconds": results["dense"]["train_cpu_seconds"],
                 "reused": results["dense"]["reused"], "workdir": str(workdirs["dense"]),
                 "config": results["dense"]["config"], "truncates": "dense"})

  record, run = trained("spectral", "spectral")
  point = _point(record, run, "full rank")
  finish("spectral", entry(record, "spectral", point=point, family=[point]))
  return {"description": setting.description, "base_config": base, "methods": {m: results[m] for m in METHODS}}


# ----------------------------------------------------------------------------- outputs


def _rows(results: dict[str, Any]):
  """``(dataset, method label, model, point, (wall, CPU) train seconds)`` of every point, families by decreasing
  fraction."""
  for dataset, entry in results["datasets"].items():
    for r in entry["methods"].values():
      for q in sorted(r["family"], key=lambda q: -q["fraction"]):
        setting = q["setting"]
        if r.get("ranks") and q["fraction"] == 1.0:  # a trained factorized model: show its ranks
          setting += f" ({', '.join(f'{name} {rank}' for name, rank in r['ranks'].items())})"
        yield dataset, r["label"], setting, q, (r["train_seconds"], r.get("train_cpu_seconds"))


def method_runs(methods: dict[str, Any]) -> dict[str, dict]:
  """``{run label: config dict}`` of every training run of one dataset (Pufferfish's warm-up included)."""
  runs = {}
  for method, r in methods.items():
    if method == "svd":
      continue
    if "warmup_config" in r:
      runs[f"{r['label']} (dense warm-up)"] = r["warmup_config"]
    runs[r["label"]] = r["config"]
  return runs


def format_markdown(results: dict[str, Any]) -> str:
  """``comparison.md``: a header per dataset setting and one table of every method's models."""
  lines = ["# Maestro vs related low-rank methods", ""]
  if results["small"]:
    lines += ["**Small CI setting** (`--small`): a smoke test of the pipeline on a tiny problem; the numbers do "
              "not compare the methods.", ""]
  for dataset, entry in results["datasets"].items():
    lines.append(f"- **{dataset}**: {entry['description']}; Maestro lambda {results['maestro_lasso'][dataset]:g}")
  lines += [
      "",
      "All training runs: SGD momentum 0.9, learning rate 0.02 with cosine decay, weight decay 1e-4, seed 0 (every run's "
      "exact config is listed below the table). "
      "Maestro: single-layer ordered dropout, the paper's loss (the sampled model on the labels), group lasso, "
      "shrinking every epoch. Decomposable-Net: "
      f"global ratio Z ~ U(0.01, 1) per step, alpha 0.5. Pufferfish: {results['warmup_epochs']} dense warm-up "
      f"epoch(s) at a constant learning rate, then rank fraction {results['rank_fraction']} with the first layer "
      "dense. Spectral: factors from the SVD of a dense init, Frobenius decay "
      f"{FROBENIUS_DECAY:g} instead of weight decay. Post-hoc SVD: the dense model truncated, no training.",
      "",
      "Accuracy: test set. Params and MACs (per example): the deployable model, each layer as the smaller of its "
      "dense kernel and its kept factors. Wall s and CPU s: wall time and CPU time (all threads) of the "
      "training run(s), including per-epoch evaluation and checkpoints (Pufferfish: warm-up + low-rank phase; "
      "post-hoc SVD: the dense run + the SVDs); wall time grows with whatever else the machine runs, CPU time "
      "much less, so compare methods by CPU time. A method with several rows: its family of models, all from the "
      "one training run. In brackets: "
      "the trained rank of every factorized layer.",
      "",
      "| dataset | method | model | accuracy % | params | MACs | wall s | CPU s |",
      "|---|---|---|---:|---:|---:|---:|---:|",
  ]
  for dataset, label, setting, q, (wall, cpu) in _rows(results):
    lines.append(f"| {dataset} | {label} | {setting} | {100 * q['accuracy']:.2f} | {q['params']:,} | "
                 f"{q['macs']:,} | {wall:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} |")
  for dataset, entry in results["datasets"].items():
    lines += ["", f"### Configs run on {dataset}", "",
              "Every config field of every training run (post-hoc SVD trains nothing: it truncates the Dense "
              "run); logging and checkpoint intervals left out, `comparison.json` has those too.", ""]
    lines += config_table(method_runs(entry["methods"]))
  reused = sum(r.get("reused", False) for e in results["datasets"].values() for r in e["methods"].values())
  lines += ["", f"Wall time of this invocation of the command: {results['wall_seconds']:.0f} s"
            + (f" ({reused} method(s) reused finished runs from an earlier invocation)." if reused else ".")]
  return "\n".join(lines) + "\n"


_STYLES = {"dense": ("k", "s"), "maestro": ("tab:red", "o"), "decomposable": ("tab:blue", "^"),
           "pufferfish": ("tab:green", "D"), "svd": ("tab:gray", "v"), "spectral": ("tab:purple", "P")}


def plot(results: dict[str, Any], path: Path) -> None:
  """``comparison.png``: accuracy vs MACs, one panel per dataset, each method's family as a line."""
  datasets = list(results["datasets"])
  fig, axes = plt.subplots(1, len(datasets), figsize=(max(6.5 * len(datasets), 10), 5.2), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    methods_ = results["datasets"][dataset]["methods"]
    floor = 100 * methods_["dense"]["point"]["accuracy"] - 30
    hidden = 0
    for method, r in methods_.items():
      color, marker = _STYLES[method]
      pts = sorted(r["family"], key=lambda q: q["macs"])
      xs, ys = [q["macs"] for q in pts], [100 * q["accuracy"] for q in pts]
      hidden += sum(y < floor for y in ys)
      ax.plot(xs, ys, color=color, marker=marker, linestyle="-" if len(pts) > 1 else "none", label=r["label"],
              markersize=7 if len(pts) == 1 else 5)
    ax.set_xscale("log")
    ax.set_ylim(bottom=max(0.0, floor))
    title = f"{dataset}" + (f" ({hidden} point(s) below {max(0.0, floor):.0f}% not shown)" if hidden else "")
    ax.set(xlabel="MACs per example (deployable model)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3, which="both")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small", frameon=False)
  fig.suptitle("accuracy vs MACs" + (" (small CI setting)" if results["small"] else ""))
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- entry points


def run_comparison(datasets: Sequence[str] = FULL_DATASETS, *, epochs: int = 10, out: str | Path = "workdirs/compare",
                   small: bool = False, fractions: Sequence[float] = FRACTIONS,
                   rank_fraction: float | None = RANK_FRACTION, idx_root: str | None = None,
                   tfds_dir: str | None = None, fresh: bool = False, verbose: bool = False,
                   log: Callable[[str], None] = print,
                   base_changes: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs the whole comparison and writes ``comparison.{md,png,json}`` into ``out``.

  Finished runs in ``out`` with the same config are reused (pass ``fresh`` to retrain).

  Args:
    datasets: dataset names (see :func:`make_settings`).
    epochs: training epochs of every method.
    out: the output folder.
    small: the CI setting.
    fractions: the fractions at which families are swept (1.0 is added if missing).
    rank_fraction: Pufferfish's share of each layer's rank (None: full rank).
    idx_root: folder of ``<dataset>/`` IDX folders (default: ``shared/data`` beside the repository).
    tfds_dir: use tfds's prepared copies from this data dir instead.
    fresh: delete ``out``'s runs first.
    verbose: show the runs' full output and progress bars.
    log: where progress lines go.
    base_changes: config fields changed in every setting's base (e.g. a smaller model for tests).

  Returns:
    The results written to ``comparison.json``.
  """
  total = time.perf_counter()
  out = Path(out)
  fractions = sorted({1.0, *(float(p) for p in fractions)}, reverse=True)
  settings = make_settings(list(datasets), epochs=epochs, small=small, out=out, idx_root=idx_root,
                           tfds_dir=tfds_dir)
  if base_changes:
    settings = [dataclasses.replace(s, base=dataclasses.replace(s.base, **base_changes).validate())
                for s in settings]
  for s in settings:  # fail before any training when data is missing
    try:
      train_lib.load_data(s.base)
    except (FileNotFoundError, ImportError) as e:
      raise DataMissingError(_missing_data_message(s.dataset, f"{type(e).__name__}: {e}")) from e
  out.mkdir(parents=True, exist_ok=True)
  if fresh:
    for s in settings:
      shutil.rmtree(out / s.dataset, ignore_errors=True)
  results: dict[str, Any] = {"small": small, "epochs": epochs, "fractions": fractions,
                             "rank_fraction": rank_fraction, "warmup_epochs": warmup_epochs(epochs),
                             "maestro_lasso": {s.dataset: s.maestro_lasso for s in settings}, "datasets": {}}
  with train_lib.single_threaded_blas():
    for s in settings:
      results["datasets"][s.dataset] = compare_dataset(s, out, fractions=fractions, rank_fraction=rank_fraction,
                                                       log=log, verbose=verbose)
  results["wall_seconds"] = round(time.perf_counter() - total, 1)
  (out / "comparison.json").write_text(json.dumps(results, indent=2))
  (out / "comparison.md").write_text(format_markdown(results))
  plot(results, out / "comparison.png")
  log(f"wrote {out / 'comparison.md'}, {out / 'comparison.png'} and {out / 'comparison.json'} "
      f"({results['wall_seconds']:.0f} s)")
  return results


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="maestro-compare",
      description="Train LeNet-5 on MNIST and Fashion-MNIST with dense, Maestro, Decomposable-Net, Pufferfish, "
                  "post-hoc SVD and spectral init + Frobenius decay; write comparison.md, comparison.png and "
                  "comparison.json (accuracy, params, MACs, train time; families as accuracy vs MACs).")
  parser.add_argument("--epochs", type=int, default=None,
                      help="training epochs of every method (default 10; 5 with --small)")
  parser.add_argument("--datasets", default=None,
                      help="comma-separated: mnist,fashion_mnist (default both; with --small: digits, or mnist / "
                           "fashion_mnist on a subset)")
  parser.add_argument("--small", action="store_true",
                      help="CI setting, about a minute on 2 CPU cores: scikit-learn digits and an MLP")
  parser.add_argument("--out", default="workdirs/compare", help="output folder (default workdirs/compare)")
  parser.add_argument("--fractions", default=",".join(f"{p:g}" for p in FRACTIONS),
                      help="fractions at which the families are swept (default %(default)s)")
  parser.add_argument("--rank-fraction", type=float, default=RANK_FRACTION,
                      help="Pufferfish's share of each layer's rank (default %(default)s)")
  parser.add_argument("--idx-root", default=None,
                      help="folder with mnist/ and fashion_mnist/ subfolders of IDX files "
                           "(default: shared/data beside the repository)")
  parser.add_argument("--tfds-dir", default=None, help="read tfds's prepared datasets from this data dir instead")
  parser.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing finished ones")
  parser.add_argument("--verbose", action="store_true", help="show every run's full output and progress bars")
  return parser


def compare_cli(argv: Sequence[str] | None = None) -> None:
  """The ``maestro-compare`` command."""
  parser = _parser()
  args = parser.parse_args(argv)
  epochs = args.epochs if args.epochs is not None else (5 if args.small else 10)
  default = "digits" if args.small else ",".join(FULL_DATASETS)
  datasets = [d.strip() for d in (args.datasets or default).split(",") if d.strip()]
  try:
    fractions = [float(p) for p in args.fractions.split(",") if p.strip()]
    if not fractions or any(not 0 < p <= 1 for p in fractions):
      raise ValueError(f"--fractions must be in (0, 1], got {args.fractions!r}")
    if not 0 < args.rank_fraction <= 1:
      raise ValueError(f"--rank-fraction must be in (0, 1], got {args.rank_fraction}")
    run_comparison(datasets, epochs=epochs, out=args.out, small=args.small, fractions=fractions,
                   rank_fraction=args.rank_fraction, idx_root=args.idx_root, tfds_dir=args.tfds_dir,
                   fresh=args.fresh, verbose=args.verbose, log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))


if __name__ == "__main__":
  compare_cli()
