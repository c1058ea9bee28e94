"""``maestro-sweep`` and ``maestro-export``: one trained run, a whole family of deployable models.

``maestro-sweep --checkpoint WORKDIR`` evaluates rank truncations of a trained
run on its test set in vmapped calls (a fraction grid of the trained ranks and
Decomposable-Net's global singular-value budget), beside post-hoc truncated SVD,
and writes a table, ``sweep.json`` and ``sweep.png`` (accuracy vs MACs and vs
parameters).

``maestro-export --checkpoint WORKDIR --budget-macs N`` (or ``--budget-params``,
or ``--ranks layer=r,...``) finds ranks by the greedy search on a calibration
batch of training data, exports the model (factors sliced, layers that are not
smaller as factors merged into one kernel), saves it with Orbax and writes a
report: ranks, parameters/MACs before and after, test accuracy, and measured
inference latency against the dense model.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import maestro_jax
from maestro_jax import accounting
from maestro_jax import data as data_lib
from maestro_jax import export as export_lib
from maestro_jax import models
from maestro_jax import sweep as sweep_lib
from maestro_jax import training
from . import workdir as workdir_lib

DEFAULT_FRACTIONS = "0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"


class DeployError(Exception):
  """A user-facing error: reported as one line and a non-zero exit."""


def _fail(prog: str, message: Any) -> None:
  from .main import one_line

  text = one_line(message) if isinstance(message, BaseException) else str(message)
  sys.exit(f"{prog}: error: {text}")


def _run_cli(prog: str, work: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
  """Runs ``work(args)``; any failure is one line on stderr and exit status 1 (``--debug``: the traceback)."""
  try:
    return work(args)
  except Exception as e:  # noqa: BLE001 - every failure is one line; --debug shows where it came from.
    if args.debug:
      traceback.print_exc()
    _fail(prog, e)


def _load_run(workdir: str | Path, what: str = "checkpoint"):
  from . import train as train_lib  # Heavy imports only once the arguments are known to be good.

  path = Path(workdir)
  if not path.exists():
    raise DeployError(f"{what} {str(workdir)!r} does not exist")
  try:
    return train_lib.load_run(path)  # parameters and model state only: the optimizer state is not read
  except (FileNotFoundError, ValueError) as e:
    raise DeployError(f"{what} {str(workdir)!r}: {e}") from None


def _has_state(model_state: Any) -> bool:
  return bool(jax.tree.leaves(model_state))


def _calibration_images(run, count: int) -> np.ndarray | None:
  """``(count, B, ...)`` unaugmented training images for BatchNorm, or None when the model has no statistics."""
  from . import train as train_lib

  if count < 1 or not _has_state(run.state["model_state"]):
    return None
  return train_lib._calibration_images(run.train_source, run.config, count)


def _test_batches(run, batch_size: int) -> Callable:
  return lambda: data_lib.batches(run.test_source, batch_size, train=False)


def _parse_fractions(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise DeployError(f"--fractions must be comma-separated numbers, got {text!r}") from None
  if not values or any(not 0 < v <= 1 for v in values):
    raise DeployError(f"--fractions must be in (0, 1], got {text!r}")
  return sorted(set(values))


def parse_ranks(text: str, base: Mapping[str, int], capacities: Mapping[str, int]) -> dict[str, int]:
  """``'layer=r,layer=r'`` on top of ``base``; unknown layers and ranks above capacity raise DeployError."""
  ranks = dict(base)
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    name, sep, value = item.partition("=")
    if not sep:
      raise DeployError(f"--ranks entries must be layer=rank, got {item!r}")
    name = name.strip()
    if name not in capacities:
      raise DeployError(f"unknown layer {name!r} in --ranks; the model's factorized layers are "
                        f"{', '.join(capacities)}")
    try:
      rank = int(value)
    except ValueError:
      raise DeployError(f"--ranks: rank of {name!r} must be an integer, got {value!r}") from None
    if not 0 <= rank <= capacities[name]:
      raise DeployError(f"--ranks: rank {rank} of layer {name!r} is above its capacity {capacities[name]}"
                        if rank > capacities[name] else f"--ranks: rank of {name!r} must be >= 0, got {rank}")
    ranks[name] = rank
  return ranks


# ------------------------------------------------------------------------------------------------ sweep


def _sweep_family(model, params, model_state, stacked, positions, batches, calib, chunk_size) -> dict[str, Any]:
  result = sweep_lib.sweep(model, params, model_state, batches(), stacked, chunk_size=chunk_size,
                           calibration_images=calib)
  cost = sweep_lib.costs(params, stacked, positions)
  return {"accuracy": result["accuracy"].tolist(), "loss": result["loss"].tolist(),
          "params": cost["params"].tolist(), "macs": None if cost["macs"] is None else cost["macs"].tolist(),
          "keeps": [dict(k) for k in sweep_lib.unstack(stacked)]}


def _evaluate(model, params, model_state, batches, keeps=None) -> float:
  step = training.make_eval_step(model)
  return training.evaluate(step, params, model_state, batches(), keeps)["accuracy"]


def _plot(families: Mapping[str, Mapping[str, Any]], dense: Mapping[str, Any] | None, path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, what, label in ((axes[0], "macs", "MACs per example"), (axes[1], "params", "parameters")):
    for name, fam in families.items():
      if fam.get(what) is None:
        continue
      order = np.lexsort((fam["fractions"], fam[what]))  # by cost, then fraction (merged layers tie costs)
      ax.plot(np.asarray(fam[what])[order], 100 * np.asarray(fam["accuracy"])[order], marker="o", markersize=3,
              label=fam["label"])
    if dense is not None and dense.get(what) is not None:
      ax.scatter([dense[what]], [100 * dense["accuracy"]], marker="*", s=120, color="black", zorder=5,
                 label=dense["label"])
      ax.axhline(100 * dense["accuracy"], color="black", linewidth=0.8, linestyle=":")
    ax.set(xlabel=label, ylabel="test accuracy (%)", xscale="log")
    # Engineering labels (150k, 1.2M) on major ticks only: log-scale minor labels overlap.
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize="small", loc="lower center", ncol=2, frameon=False)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.1 + 0.04 * ((len(labels) + 1) // 2), 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt(v: Any) -> str:
  return "-" if v is None else f"{v:,}"


def format_sweep_table(families: Mapping[str, Mapping[str, Any]], dense: Mapping[str, Any] | None) -> str:
  """One row per configuration: family, fraction, parameters, MACs, accuracy."""
  rows = [("family", "fraction", "params", "MACs", "accuracy")]
  for fam in families.values():
    macs = fam["macs"] or [None] * len(fam["params"])
    for p, params, m, acc in zip(fam["fractions"], fam["params"], macs, fam["accuracy"]):
      rows.append((fam["label"], f"{p:.3f}", _fmt(params), _fmt(m), f"{100 * acc:.2f}%"))
  if dense is not None:
    rows.append((dense["label"], "-", _fmt(dense["params"]), _fmt(dense["macs"]), f"{100 * dense['accuracy']:.2f}%"))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
  """The work of ``maestro-sweep``; returns what it writes to ``sweep.json``."""
  fractions = _parse_fractions(args.fractions)
  run = _load_run(args.checkpoint)
  dense_run = _load_run(args.dense_checkpoint, "dense checkpoint") if args.dense_checkpoint else None
  if dense_run is not None:
    kwargs = lambda r: json.loads(json.dumps(r.config.model_kwargs))  # tuples and lists compare equal
    same = (dense_run.config.model == run.config.model and dense_run.config.dataset == run.config.dataset
            and kwargs(dense_run) == kwargs(run))
    if not same or dense_run.config.factorized:
      raise DeployError("--dense-checkpoint must be a run with factorized=False of the same dataset, model and "
                        "model_kwargs")
  out = Path(args.out or Path(args.checkpoint) / "sweep")
  out.mkdir(parents=True, exist_ok=True)
  batch_size = args.batch_size or run.config.eval_batch_size
  batches = _test_batches(run, batch_size)
  recal = run.config.recalibrate_batches if args.recalibrate_batches is None else args.recalibrate_batches
  calib = _calibration_images(run, recal)
  params, model_state, ranks = run.state["params"], run.state["model_state"], run.ranks

  families: dict[str, dict[str, Any]] = {}
  stacked = sweep_lib.fraction_grid(ranks, fractions)
  families["fraction"] = {"label": "Maestro, fraction of every rank", "fractions": fractions,
                          **_sweep_family(run.model, params, model_state, stacked, run.positions, batches, calib,
                                          args.chunk_size)}
  stacked = sweep_lib.global_budget(params, ranks, fractions)
  families["global"] = {"label": "Maestro, global singular-value budget", "fractions": fractions,
                        **_sweep_family(run.model, params, model_state, stacked, run.positions, batches, calib,
                                        args.chunk_size)}
  dense = None
  if dense_run is not None:
    dense_params, dense_state = dense_run.state["params"], dense_run.state["model_state"]
    dense_calib = _calibration_images(dense_run, recal)
    dense_eval_state = dense_state
    if dense_calib is not None:
      dense_eval_state = jax.jit(dense_run.model.recalibrate)(dense_params, dense_state, jnp.asarray(dense_calib))
    size = accounting.count(jax.device_get(dense_params), None, dense_run.positions)
    dense = {"label": "dense baseline", "accuracy": _evaluate(dense_run.model, dense_params, dense_eval_state, batches),
             "params": size.params_dense, "macs": size.macs_dense}
    # Factorized by SVD at full rank: keeping k components is the rank-k truncated SVD of each trained kernel.
    svd_params = maestro_jax.factorize_dense_params(jax.device_get(dense_params), 1.0)
    svd_ranks = maestro_jax.capacities(svd_params)
    svd_label = "post-hoc truncated SVD of the dense baseline"
    svd_state, svd_calib = dense_state, dense_calib
  else:
    # No dense baseline: the SVD of the Maestro model's own product at its trained ranks, truncated.
    svd_params = maestro_jax.svd_reorthogonalize(params, ranks)
    svd_ranks = ranks
    svd_label = "post-hoc truncated SVD of the Maestro product (no dense baseline given)"
    svd_state, svd_calib = model_state, calib
  stacked = sweep_lib.fraction_grid(svd_ranks, fractions)
  families["svd"] = {"label": svd_label, "fractions": fractions,
                     **_sweep_family(run.model, svd_params, svd_state, stacked, run.positions, batches, svd_calib,
                                     args.chunk_size)}

  result = {"checkpoint": str(args.checkpoint), "dense_checkpoint": args.dense_checkpoint, "ranks": ranks,
            "capacities": maestro_jax.capacities(params), "batch_size": batch_size,
            "recalibrate_batches": recal if calib is not None else 0, "families": families, "dense": dense}
  table = format_sweep_table(families, dense)
  print(table)
  (out / "sweep.txt").write_text(table + "\n")
  (out / "sweep.json").write_text(json.dumps(result, indent=2, default=export_lib.json_default))
  _plot(families, dense, out / "sweep.png", f"{run.config.dataset} / {run.config.model}: rank truncations")
  print(f"wrote {out / 'sweep.json'}, {out / 'sweep.png'}")
  return result


def sweep_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="maestro-sweep",
                              description="Evaluate many rank truncations of a trained run in vmapped calls.")
  p.add_argument("--checkpoint", required=True, help="workdir of a maestro-train run")
  p.add_argument("--fractions", default=DEFAULT_FRACTIONS, help="comma-separated shares in (0, 1]")
  p.add_argument("--out", help="output folder (default: WORKDIR/sweep)")
  p.add_argument("--dense-checkpoint", help="workdir of the same run trained with factorized=False, for the dense "
                                            "accuracy and post-hoc SVD of the dense weights")
  p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's eval_batch_size)")
  p.add_argument("--chunk-size", type=int, help="evaluate configurations in chunks of this size (less memory)")
  p.add_argument("--recalibrate-batches", type=int,
                 help="training batches for per-configuration BatchNorm recalibration (default: the run's)")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  return p


def sweep_cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Entry point of ``maestro-sweep``."""
  args = sweep_parser().parse_args(argv)
  return _run_cli("maestro-sweep", run_sweep, args)


# ----------------------------------------------------------------------------------------------- export


def _model_spec(run) -> dict[str, Any]:
  return {"name": run.config.model, "kwargs": json.loads(json.dumps(run.config.model_kwargs)),
          "num_classes": int(run.train_source.num_classes),
          "image_shape": [int(d) for d in run.train_source.image_shape]}


def load_model(path: str | Path) -> tuple[training.FunctionalModel, dict, dict, dict]:
  """Loads a ``maestro-export`` output folder (or its ``model`` subfolder) as a runnable model.

  Returns:
    ``(model, params, model_state, report)``: ``model.apply(params, model_state, x)`` runs it.
  """
  path = Path(path)
  if (path / "model" / "exported.json").exists():
    path = path / "model"
  params, model_state, report = export_lib.load_exported(path)
  spec = report["model"]
  module = models.make_model(spec["name"], num_classes=spec["num_classes"], image_shape=spec["image_shape"],
                             rngs=nnx.Rngs(0), **spec["kwargs"])
  module = export_lib.module_from_exported(module, params, model_state)
  model, params, model_state = training.FunctionalModel.from_module(module)
  return model, params, model_state, report


def _latency(model, params, model_state, x, runs: int) -> float:
  fn = jax.jit(lambda p, s, x: model.apply(p, s, x)[0])
  return export_lib.time_fn(fn, params, model_state, x, repeats=runs, warmup=2)


def _report_md(r: Mapping[str, Any]) -> str:
  b, a, d = r["before"], r["after"], r["dense"]
  lat = r["latency"]
  lines = [f"# Exported model: {r['model']['name']} on {r['dataset']}", "",
           f"Checkpoint: `{r['checkpoint']}`; ranks from {r['ranks_from']}.", "",
           "| model | parameters | MACs / example | test accuracy |", "|---|---:|---:|---:|",
           f"| trained, every layer one dense kernel | {_fmt(d['params'])} | {_fmt(d['macs'])} | "
           f"{100 * d['accuracy']:.2f}% |",
           f"| trained (ranks {'/'.join(str(v) for v in r['trained_ranks'].values())}) | {_fmt(b['params'])} | "
           f"{_fmt(b['macs'])} | {100 * b['accuracy']:.2f}% |",
           f"| exported | {_fmt(a['params'])} | {_fmt(a['macs'])} | {100 * a['accuracy']:.2f}% |", "",
           "| layer | rank / capacity | deployed as |", "|---|---:|---|"]
  for name, rank in r["ranks"].items():
    form = r["layers"][name]["form"]
    deployed = "one dense kernel" if form == "dense" else "factors"
    lines.append(f"| {name} | {rank}/{r['capacities'][name]} | {deployed} |")
  lines += ["", f"Inference latency on {lat['backend']} ({lat['device']}), batch of {lat['batch_size']}, median of "
            f"{lat['runs']} runs after warm-up: exported {1e3 * lat['exported_s']:.3f} ms, all-dense "
            f"{1e3 * lat['dense_s']:.3f} ms, speed-up {lat['speedup']:.2f}x (dense / exported)."]
  if r.get("greedy"):
    g = r["greedy"]
    lines += ["", f"Greedy search: {len(g['path']) - 1} steps of {g['step']} to a {g['metric']} budget of "
              f"{g['budget']:,} (calibration batch of {g['calibration_size']} training examples)."]
  return "\n".join(lines) + "\n"


def run_export(args: argparse.Namespace) -> dict[str, Any]:
  """The work of ``maestro-export``; returns the report it writes."""
  for flag, value, least in (("--quantum", args.quantum, 1), ("--step", args.step, 1), ("--min-rank", args.min_rank, 0),
                             ("--calibration-size", args.calibration_size, 1), ("--latency-batch", args.latency_batch, 1),
                             ("--latency-runs", args.latency_runs, 1), ("--budget-macs", args.budget_macs, 1),
                             ("--budget-params", args.budget_params, 1), ("--chunk-size", args.chunk_size, 1)):
    if value is not None and value < least:  # Refused before any work.
      raise DeployError(f"{flag} must be >= {least}, got {value}")
  out = Path(args.out or Path(args.checkpoint) / "export")
  if out.exists() and not out.is_dir():
    raise DeployError(f"--out {out} is a file, not a folder")
  run = _load_run(args.checkpoint)
  params, model_state = run.state["params"], run.state["model_state"]
  caps = maestro_jax.capacities(params)
  trained = run.ranks
  calib_size = min(args.calibration_size, len(run.train_source))
  calib_batch = next(iter(data_lib.batches(run.train_source, calib_size, seed=run.config.seed + 2, train=True,
                                           augment=False)))
  calib_batch = {k: calib_batch[k] for k in ("image", "label", "mask")}
  bn_calib = _calibration_images(run, max(1, run.config.recalibrate_batches))
  greedy = None
  if args.ranks is not None:
    ranks = parse_ranks(args.ranks, trained, caps)
    ranks_from = "--ranks"
  else:
    try:
      result = sweep_lib.greedy_search(
          run.model, params, model_state, calib_batch, trained, run.positions, budget_macs=args.budget_macs,
          budget_params=args.budget_params, step=args.step, min_rank=args.min_rank, chunk_size=args.chunk_size,
          calibration_images=None if bn_calib is None else calib_batch["image"][None])
    except ValueError as e:
      raise DeployError(str(e)) from None
    ranks = result.ranks
    greedy = {"metric": result.metric, "budget": result.budget, "step": args.step, "min_rank": args.min_rank,
              "calibration_size": calib_size,
              "path": [{k: v for k, v in p.items() if k != "ranks"} for p in result.path]}
    ranks_from = f"the greedy search ({result.metric} budget {result.budget:,})"
  if args.quantum > 1:
    ranks = export_lib.quantize_ranks(ranks, args.quantum, caps)
    ranks_from += f", snapped up to multiples of {args.quantum}"

  def recalibrated(model, p, s, keeps=None):
    if bn_calib is None:
      return s
    return jax.jit(model.recalibrate)(p, s, jnp.asarray(bn_calib), keeps)

  batches = _test_batches(run, run.config.eval_batch_size)
  trained_keeps = {k: jnp.asarray(v, jnp.int32) for k, v in trained.items()}
  before_state = recalibrated(run.model, params, model_state, trained_keeps)
  before_acc = _evaluate(run.model, params, before_state, batches, trained)
  efm, eparams, estate = export_lib.export_functional(run.model, params, model_state, ranks)
  estate = recalibrated(efm, eparams, estate)
  after_acc = _evaluate(efm, eparams, estate, batches)
  dfm, dparams, dstate = export_lib.export_functional(run.model, params, model_state, trained, merge="all")
  dstate = recalibrated(dfm, dparams, dstate)
  dense_acc = _evaluate(dfm, dparams, dstate, batches)

  host = jax.device_get(params)
  before = accounting.count(host, trained, run.positions)
  after = accounting.count(jax.device_get(eparams), None, run.positions)
  x = next(iter(data_lib.batches(run.test_source, args.latency_batch, train=False, drop_remainder=False)))["image"]
  x = jnp.asarray(x)
  exported_s = _latency(efm, eparams, estate, x, args.latency_runs)
  dense_s = _latency(dfm, dparams, dstate, x, args.latency_runs)
  device = jax.devices()[0]
  report = {
      "checkpoint": str(args.checkpoint), "dataset": run.config.dataset, "model": _model_spec(run),
      "ranks_from": ranks_from, "ranks": ranks, "trained_ranks": trained, "capacities": caps,
      "layers": export_lib.layer_forms(jax.device_get(eparams)),
      "before": {"params": before.params_merged, "macs": before.macs_merged, "accuracy": before_acc},
      "after": {"params": after.params_merged, "macs": after.macs_merged, "accuracy": after_acc},
      "dense": {"params": before.params_dense, "macs": before.macs_dense, "accuracy": dense_acc},
      "latency": {"backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
                  "batch_size": int(x.shape[0]), "runs": args.latency_runs, "exported_s": exported_s,
                  "dense_s": dense_s, "speedup": dense_s / exported_s if exported_s > 0 else None},
      "greedy": greedy,
  }
  # The model folder is replaced atomically, then each report file: a failure leaves the previous export whole.
  export_lib.save_exported(out / "model", eparams, estate, report)
  workdir_lib.atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=export_lib.json_default))
  md = _report_md(report)
  workdir_lib.atomic_write_text(out / "report.md", md)
  print(md)
  print(f"wrote {out / 'model'}, {out / 'report.md'}")
  return report


def export_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="maestro-export",
                              description="Choose ranks for a budget, export a compact model and report on it.")
  p.add_argument("--checkpoint", required=True, help="workdir of a maestro-train run")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--budget-macs", type=int, help="MACs per example to reach (greedy search)")
  group.add_argument("--budget-params", type=int, help="deployed parameters to reach (greedy search)")
  group.add_argument("--ranks", help="explicit ranks, e.g. layers.0=12,layers.1=8 (others keep the trained rank)")
  p.add_argument("--out", help="output folder (default: WORKDIR/export)")
  p.add_argument("--step", type=int, default=1, help="rank quantum of one greedy step (default 1)")
  p.add_argument("--min-rank", type=int, default=1, help="smallest rank the search may give a layer (default 1)")
  p.add_argument("--quantum", type=int, default=1, help="snap ranks up to multiples of this (8 GPU, 128 TPU)")
  p.add_argument("--calibration-size", type=int, default=512, help="training examples in the calibration batch")
  p.add_argument("--chunk-size", type=int, help="evaluate greedy candidates in chunks of this size")
  p.add_argument("--latency-batch", type=int, default=64, help="batch size of the latency measurement")
  p.add_argument("--latency-runs", type=int, default=20, help="timed runs (the median is reported)")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error")
  return p


def export_cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Entry point of ``maestro-export``."""
  args = export_parser().parse_args(argv)
  return _run_cli("maestro-export", run_export, args)


def sweep_main() -> None:
  """Console script ``maestro-sweep`` (returns nothing, so the exit status is 0 on success)."""
  sweep_cli()


def export_main() -> None:
  """Console script ``maestro-export``."""
  export_cli()
