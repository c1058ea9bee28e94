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

import maestro_jax
from maestro_jax import accounting
from maestro_jax import export as export_lib
from maestro_jax import functional
from maestro_jax import sweep as sweep_lib
from maestro_jax import training
from . import modeling
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
  if count < 1 or not _has_state(run.state["model_state"]):
    return None
  return run.task.calibration_inputs(run.sources, run.config, count)


def _test_batches(run, batch_size: int, max_windows: int | None = None) -> Callable:
  """Batches of the held-out source every epoch was scored on (test images; a language model's validation text).

  ``max_windows``: a language model's first windows only (a quicker estimate).
  """
  return lambda: run.task.eval_batches(run.sources.evaluation, run.config, batch_size, max_windows=max_windows)


def _is_lm(run) -> bool:
  return run.config.task == "language_modeling"


def _scores(run, loss: float, accuracy: float) -> dict[str, float]:
  """``{'loss', 'accuracy'}`` plus, for a language model, ``bits_per_char`` and ``perplexity``."""
  named = run.task.metrics("x", float(loss), float(accuracy))
  return {k[2:]: v for k, v in named.items()}


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


def _sweep_family(model, params, model_state, stacked, positions, batches, calib, chunk_size, lm=False
                  ) -> dict[str, Any]:
  result = sweep_lib.sweep(model, params, model_state, batches(), stacked, chunk_size=chunk_size,
                           calibration_images=calib)
  cost = sweep_lib.costs(params, stacked, positions)
  family = {"accuracy": result["accuracy"].tolist(), "loss": result["loss"].tolist()}
  if lm:
    family["bits_per_char"] = (np.asarray(result["loss"]) / np.log(2.0)).tolist()
    family["perplexity"] = np.exp(np.minimum(np.asarray(result["loss"]), 700.0)).tolist()
  return {**family, "params": cost["params"].tolist(), "macs": None if cost["macs"] is None else cost["macs"].tolist(),
          "keeps": [dict(k) for k in sweep_lib.unstack(stacked)]}


def _evaluate(model, params, model_state, batches, keeps=None) -> dict[str, float]:
  """Mean loss and accuracy (per token for a language model) over the batches."""
  step = training.make_eval_step(model)
  return training.evaluate(step, params, model_state, batches(), keeps)


def _plot(families: Mapping[str, Mapping[str, Any]], dense: Mapping[str, Any] | None, path: Path, title: str,
          lm: bool = False) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  # A classifier is judged by accuracy (higher is better), a language model by loss in nats per token.
  metric, scale, ylabel = ("loss", 1.0, "validation loss (nats/token)") if lm else ("accuracy", 100.0,
                                                                                    "test accuracy (%)")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  macs_label = "MACs per token" if lm else "MACs per example"
  for ax, what, label in ((axes[0], "macs", macs_label), (axes[1], "params", "parameters")):
    for name, fam in families.items():
      if fam.get(what) is None:
        continue
      order = np.lexsort((fam["fractions"], fam[what]))  # by cost, then fraction (merged layers tie costs)
      ax.plot(np.asarray(fam[what])[order], scale * np.asarray(fam[metric])[order], marker="o", markersize=3,
              label=fam["label"])
    if dense is not None and dense.get(what) is not None:
      ax.scatter([dense[what]], [scale * dense[metric]], marker="*", s=120, color="black", zorder=5,
                 label=dense["label"])
      ax.axhline(scale * dense[metric], color="black", linewidth=0.8, linestyle=":")
    ax.set(xlabel=label, ylabel=ylabel, xscale="log")
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


def format_sweep_table(families: Mapping[str, Mapping[str, Any]], dense: Mapping[str, Any] | None,
                       lm: bool = False) -> str:
  """One row per configuration: family, fraction, parameters, MACs, and accuracy (or a language model's loss)."""
  if lm:
    header = ("family", "fraction", "params", "MACs/token", "loss (nats)", "bits/char", "perplexity")
    scores = lambda d, i: (f"{d['loss'][i]:.4f}", f"{d['bits_per_char'][i]:.4f}", f"{d['perplexity'][i]:.3f}")
    dense_scores = lambda d: (f"{d['loss']:.4f}", f"{d['bits_per_char']:.4f}", f"{d['perplexity']:.3f}")
  else:
    header = ("family", "fraction", "params", "MACs", "accuracy")
    scores = lambda d, i: (f"{100 * d['accuracy'][i]:.2f}%",)
    dense_scores = lambda d: (f"{100 * d['accuracy']:.2f}%",)
  rows = [header]
  for fam in families.values():
    macs = fam["macs"] or [None] * len(fam["params"])
    for i, (p, params, m) in enumerate(zip(fam["fractions"], fam["params"], macs)):
      rows.append((fam["label"], f"{p:.3f}", _fmt(params), _fmt(m), *scores(fam, i)))
  if dense is not None:
    rows.append((dense["label"], "-", _fmt(dense["params"]), _fmt(dense["macs"]), *dense_scores(dense)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
  """The work of ``maestro-sweep``; returns what it writes to ``sweep.json``."""
  fractions = _parse_fractions(args.fractions)
  if args.max_windows is not None and args.max_windows < 1:
    raise DeployError(f"--max-windows must be >= 1, got {args.max_windows}")
  run = _load_run(args.checkpoint)
  lm = _is_lm(run)
  dense_run = _load_run(args.dense_checkpoint, "dense checkpoint") if args.dense_checkpoint else None
  if dense_run is not None:
    kwargs = lambda r: json.loads(json.dumps(r.config.model_kwargs))  # tuples and lists compare equal
    same = (dense_run.config.model == run.config.model and dense_run.config.dataset == run.config.dataset
            and dense_run.config.task == run.config.task and dense_run.config.seq_len == run.config.seq_len
            and kwargs(dense_run) == kwargs(run))
    if not same or dense_run.config.factorized:
      raise DeployError("--dense-checkpoint must be a run with factorized=False of the same task, dataset, model and "
                        "model_kwargs")
    if lm and dense_run.sources.vocab != run.sources.vocab:
      raise DeployError("--dense-checkpoint was trained with another vocabulary")
  out = Path(args.out or Path(args.checkpoint) / "sweep")
  out.mkdir(parents=True, exist_ok=True)
  batch_size = args.batch_size or run.config.eval_batch_size
  if args.max_windows is not None and not lm:
    raise DeployError("--max-windows is for language_modeling runs")
  batches = _test_batches(run, batch_size, args.max_windows)
  recal = run.config.recalibrate_batches if args.recalibrate_batches is None else args.recalibrate_batches
  calib = _calibration_images(run, recal)
  params, model_state, ranks = run.state["params"], run.state["model_state"], run.ranks

  def family(label, model, p, s, stacked, c):
    return {"label": label, "fractions": fractions,
            **_sweep_family(model, p, s, stacked, run.positions, batches, c, args.chunk_size, lm)}

  families: dict[str, dict[str, Any]] = {}
  families["fraction"] = family("Maestro, fraction of every rank", run.model, params, model_state,
                                sweep_lib.fraction_grid(ranks, fractions), calib)
  families["global"] = family("Maestro, global singular-value budget", run.model, params, model_state,
                              sweep_lib.global_budget(params, ranks, fractions), calib)
  dense = None
  if dense_run is not None:
    dense_params, dense_state = dense_run.state["params"], dense_run.state["model_state"]
    dense_calib = _calibration_images(dense_run, recal)
    dense_eval_state = dense_state
    if dense_calib is not None:
      dense_eval_state = jax.jit(dense_run.model.recalibrate)(dense_params, dense_state, jnp.asarray(dense_calib))
    size = accounting.count(jax.device_get(dense_params), None, dense_run.positions)
    scored = _evaluate(dense_run.model, dense_params, dense_eval_state, batches)
    dense = {"label": "dense baseline", **_scores(run, scored["loss"], scored["accuracy"]),
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
  families["svd"] = family(svd_label, run.model, svd_params, svd_state, sweep_lib.fraction_grid(svd_ranks, fractions),
                           svd_calib)

  result = {"checkpoint": str(args.checkpoint), "dense_checkpoint": args.dense_checkpoint, "task": run.config.task,
            "split": run.task.eval_split, "ranks": ranks,
            "capacities": maestro_jax.capacities(params), "batch_size": batch_size,
            "macs_per": "token" if lm else "example",
            "max_windows": args.max_windows,
            "recalibrate_batches": recal if calib is not None else 0, "families": families, "dense": dense}
  table = format_sweep_table(families, dense, lm)
  print(table)
  (out / "sweep.txt").write_text(table + "\n")
  (out / "sweep.json").write_text(json.dumps(result, indent=2, default=export_lib.json_default))
  _plot(families, dense, out / "sweep.png", f"{run.config.dataset} / {run.config.model}: rank truncations", lm)
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
  p.add_argument("--max-windows", type=int, help="language models: score only the first N validation windows")
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
  """What rebuilds the model of an export: the run's config and the factory's data arguments."""
  args = run.sources.factory_args
  spec = {"name": run.config.model, "kwargs": json.loads(json.dumps(run.config.model_kwargs)),
          "task": run.config.task, "factory_args": json.loads(json.dumps(args)),
          "config": json.loads(run.config.to_json())}
  if "num_classes" in args:  # the fields a classification export has always had
    spec.update(num_classes=int(args["num_classes"]), image_shape=[int(d) for d in args["image_shape"]])
  return spec


def load_model(path: str | Path) -> tuple[Any, dict, dict, dict]:
  """Loads a ``maestro-export`` output folder (or its ``model`` subfolder) as a runnable model, NNX or Linen.

  Returns:
    ``(model, params, model_state, report)``: ``model.apply(params, model_state, x)`` runs it.
  """
  import dataclasses

  from . import config as config_lib
  from . import tasks
  from . import train as train_lib

  path = Path(path)
  if (path / "model" / "exported.json").exists():
    path = path / "model"
  params, model_state, report = export_lib.load_exported(path)
  spec = report["model"]
  if "config" in spec:
    config = config_lib.Config.from_json(json.dumps(spec["config"]), path / "exported.json")
    factory_args = dict(spec["factory_args"])
  else:  # an export written before the config was stored: a zoo classifier
    config = config_lib.Config(model=spec["name"], model_kwargs=spec["kwargs"])
    factory_args = {"num_classes": spec["num_classes"], "image_shape": tuple(spec["image_shape"])}
  if "image_shape" in factory_args:
    factory_args["image_shape"] = tuple(factory_args["image_shape"])
  # The factorized architecture (no dense run to read, no data to load); exported params then replace its own.
  config = dataclasses.replace(config, init_from=None, factorized=True)
  module = train_lib.build_model(config, tasks.Sources(None, None, None, factory_args))
  model, params, model_state = modeling.exported_view(module, params, model_state)
  return model, params, model_state, report


def generate_tokens(model, params, model_state, prompt_ids: Any, num_tokens: int, *, key: jax.Array,
                    temperature: float, max_len: int, keeps: Mapping[str, Any] | None = None) -> np.ndarray:
  """Samples ``num_tokens`` ids after ``prompt_ids`` from any language model's view, one compiled loop.

  Token ``i`` is drawn with ``jax.random.fold_in(key, i)`` from ``softmax(logits / temperature)`` (the argmax
  at temperature 0), the context cropped to the last ``max_len`` tokens: the result is a pure function of
  the model, the prompt, ``key`` and ``temperature``.
  """
  prompt = jnp.asarray(prompt_ids, jnp.int32).reshape(1, -1)
  if prompt.shape[1] < 1:
    raise DeployError("--prompt must hold at least one character")
  window = min(int(max_len), prompt.shape[1] + num_tokens)
  prompt_len = prompt.shape[1]

  @jax.jit
  def run(params, model_state, prompt, key, temperature):
    tokens = jnp.zeros((1, prompt_len + num_tokens), jnp.int32).at[:, :prompt_len].set(prompt)

    def step(i, tokens):
      position = prompt_len + i
      start = jnp.maximum(position - window, 0)
      context = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)
      logits, _ = model.apply(params, model_state, context, keeps, train=False)
      logits = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, axis=1, keepdims=False)
      logits = logits.astype(jnp.float32)
      sampled = jax.random.categorical(jax.random.fold_in(key, i), logits / jnp.maximum(temperature, 1e-6), axis=-1)
      token = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
      return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, axis=1)

    return jax.lax.fori_loop(0, num_tokens, step, tokens)[0, prompt_len:]

  return np.asarray(run(params, model_state, prompt, key, jnp.asarray(temperature, jnp.float32)))


def sample_text(model, params, model_state, vocab, prompt: str, num_chars: int, *, seed: int, temperature: float,
                max_len: int, keeps: Mapping[str, Any] | None = None) -> str:
  """:func:`generate_tokens` from a text prompt, decoded with the run's vocabulary (the continuation only)."""
  ids = vocab.encode(prompt)
  return vocab.decode(generate_tokens(model, params, model_state, ids, num_chars, key=jax.random.key(seed),
                                      temperature=temperature, max_len=max_len, keeps=keeps))


def _latency(model, params, model_state, x, runs: int) -> float:
  fn = jax.jit(lambda p, s, x: model.apply(p, s, x)[0])
  return export_lib.time_fn(fn, params, model_state, x, repeats=runs, warmup=2)


def _score_cells(r: Mapping[str, Any], row: Mapping[str, Any]) -> str:
  if r["model"].get("task") == "language_modeling":
    return f"{row['loss']:.4f} | {row['bits_per_char']:.4f} | {row['perplexity']:.3f}"
  return f"{100 * row['accuracy']:.2f}%"


def _report_md(r: Mapping[str, Any]) -> str:
  b, a, d = r["before"], r["after"], r["dense"]
  lat = r["latency"]
  lm = r["model"].get("task") == "language_modeling"
  head = ("| model | parameters | MACs / token | validation loss (nats) | bits/char | perplexity |\n"
          "|---|---:|---:|---:|---:|---:|") if lm else (
              "| model | parameters | MACs / example | test accuracy |\n|---|---:|---:|---:|")
  lines = [f"# Exported model: {r['model']['name']} on {r['dataset']}", "",
           f"Checkpoint: `{r['checkpoint']}`; ranks from {r['ranks_from']}.", "", head,
           f"| trained, every layer one dense kernel | {_fmt(d['params'])} | {_fmt(d['macs'])} | {_score_cells(r, d)} |",
           f"| trained (ranks {'/'.join(str(v) for v in r['trained_ranks'].values())}) | {_fmt(b['params'])} | "
           f"{_fmt(b['macs'])} | {_score_cells(r, b)} |",
           f"| exported | {_fmt(a['params'])} | {_fmt(a['macs'])} | {_score_cells(r, a)} |", "",
           "| layer | rank / capacity | deployed as |", "|---|---:|---|"]
  for name, rank in r["ranks"].items():
    form = r["layers"][name]["form"]
    deployed = "one dense kernel" if form == "dense" else "factors"
    lines.append(f"| {name} | {rank}/{r['capacities'][name]} | {deployed} |")
  lines += ["", f"Layers kept factorized or merged by the {r.get('merge_rule', 'size')} rule."]
  lines += ["", f"Inference latency on {lat['backend']} ({lat['device']}), batch of {lat['batch_size']}, median of "
            f"{lat['runs']} runs after warm-up: exported {1e3 * lat['exported_s']:.3f} ms, all-dense "
            f"{1e3 * lat['dense_s']:.3f} ms, speed-up {lat['speedup']:.2f}x (dense / exported)."]
  if r.get("greedy"):
    g = r["greedy"]
    lines += ["", f"Greedy search: {len(g['path']) - 1} steps of {g['step']} to a {g['metric']} budget of "
              f"{g['budget']:,} (calibration batch of {g['calibration_size']} training "
              f"{'tokens' if lm else 'examples'})."]
  if r.get("sample"):
    smp = r["sample"]
    lines += ["", f"Sample of {len(smp['text'])} characters from the exported model (seed {smp['seed']}, temperature "
              f"{smp['temperature']}, prompt {smp['prompt']!r}):", "", "```", smp["prompt"] + smp["text"], "```"]
  return "\n".join(lines) + "\n"


def _merge_decision(merge: str, budgeted: bool, run, params, model_state, ranks, x) -> tuple[str, dict[str, Any]]:
  """``(rule applied, export keyword arguments)`` for ``--merge``.

  ``latency`` times each layer's factors against its merged kernel on this backend
  (:func:`maestro_jax.export.dense_by_latency`, at the latency batch size; the
  size rule where the times are too close to tell); it needs an NNX model and a
  float input. A parameter or MAC budget is a size contract, so a budgeted
  export keeps the size rule, as do models that cannot be timed.
  """
  if merge == "latency":
    if budgeted:
      return "size (a parameter or MAC budget is met by the size rule)", {"merge": "auto"}
    nnx_model = isinstance(run.model, functional.FunctionalModel)
    if nnx_model and jnp.issubdtype(x.dtype, jnp.floating):
      module = run.model.to_module(params, model_state)
      dense = export_lib.dense_by_latency(module, x.shape[1:], ranks, batch_size=int(x.shape[0]))
      return "latency", {"merge": "none", "dense": dense}
    reason = "token inputs" if nnx_model else "a Linen model"
    return f"size (latency timing does not apply to {reason})", {"merge": "auto"}
  return "size", {"merge": "auto"}


def run_export(args: argparse.Namespace) -> dict[str, Any]:
  """The work of ``maestro-export``; returns the report it writes."""
  for flag, value, least in (("--quantum", args.quantum, 1), ("--step", args.step, 1), ("--min-rank", args.min_rank, 0),
                             ("--calibration-size", args.calibration_size, 1), ("--latency-batch", args.latency_batch, 1),
                             ("--latency-runs", args.latency_runs, 1), ("--budget-macs", args.budget_macs, 1),
                             ("--budget-params", args.budget_params, 1), ("--chunk-size", args.chunk_size, 1),
                             ("--sample", args.sample, 0)):
    if value is not None and value < least:  # Refused before any work.
      raise DeployError(f"{flag} must be >= {least}, got {value}")
  if args.fraction is not None and not 0 < args.fraction <= 1:
    raise DeployError(f"--fraction must be in (0, 1], got {args.fraction}")
  if args.temperature < 0:
    raise DeployError(f"--temperature must be >= 0, got {args.temperature}")
  out = Path(args.out or Path(args.checkpoint) / "export")
  if out.exists() and not out.is_dir():
    raise DeployError(f"--out {out} is a file, not a folder")
  run = _load_run(args.checkpoint)
  lm = _is_lm(run)
  if args.sample and not lm:
    raise DeployError("--sample generates text: it needs a language_modeling run")
  params, model_state = run.state["params"], run.state["model_state"]
  caps = maestro_jax.capacities(params)
  trained = run.ranks
  calib_batch = run.task.calibration_batch(run.sources, run.config, args.calibration_size)
  calib_size = int(np.asarray(calib_batch["mask"]).sum())
  bn_calib = _calibration_images(run, max(1, run.config.recalibrate_batches))
  greedy = None
  if args.ranks is not None:
    ranks = parse_ranks(args.ranks, trained, caps)
    ranks_from = "--ranks"
  elif args.fraction is not None:
    ranks = {k: maestro_jax.fraction_to_rank(args.fraction, r) for k, r in trained.items()}
    ranks_from = f"--fraction {args.fraction} of every trained rank"
  else:
    try:
      result = sweep_lib.greedy_search(
          run.model, params, model_state, calib_batch, trained, run.positions, budget_macs=args.budget_macs,
          budget_params=args.budget_params, step=args.step, min_rank=args.min_rank, chunk_size=args.chunk_size,
          calibration_images=None if bn_calib is None else np.asarray(calib_batch["image"])[None])
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

  def scored(model, p, s, keeps=None):
    result = _evaluate(model, p, s, batches, keeps)
    return _scores(run, result["loss"], result["accuracy"])

  batches = _test_batches(run, run.config.eval_batch_size)
  trained_keeps = {k: jnp.asarray(v, jnp.int32) for k, v in trained.items()}
  before_state = recalibrated(run.model, params, model_state, trained_keeps)
  before_scores = scored(run.model, params, before_state, trained)
  latency_batches = run.task.eval_batches(run.sources.evaluation, run.config, args.latency_batch)
  x = jnp.asarray(next(iter(latency_batches))["image"])
  merge_rule, merge_kwargs = _merge_decision(args.merge, greedy is not None, run, params, model_state, ranks, x)
  efm, eparams, estate = export_lib.export_functional(run.model, params, model_state, ranks, **merge_kwargs)
  estate = recalibrated(efm, eparams, estate)
  after_scores = scored(efm, eparams, estate)
  dfm, dparams, dstate = export_lib.export_functional(run.model, params, model_state, trained, merge="all")
  dstate = recalibrated(dfm, dparams, dstate)
  dense_scores = scored(dfm, dparams, dstate)

  host = jax.device_get(params)
  before = accounting.count(host, trained, run.positions)
  after = accounting.count(jax.device_get(eparams), None, run.positions)
  exported_s = _latency(efm, eparams, estate, x, args.latency_runs)
  dense_s = _latency(dfm, dparams, dstate, x, args.latency_runs)
  device = jax.devices()[0]
  report = {
      "checkpoint": str(args.checkpoint), "dataset": run.config.dataset, "model": _model_spec(run),
      "split": run.task.eval_split, "macs_per": "token" if lm else "example",
      "ranks_from": ranks_from, "ranks": ranks, "trained_ranks": trained, "capacities": caps,
      "layers": export_lib.layer_forms(jax.device_get(eparams)), "merge_rule": merge_rule,
      "before": {"params": before.params_merged, "macs": before.macs_merged, **before_scores},
      "after": {"params": after.params_merged, "macs": after.macs_merged, **after_scores},
      "dense": {"params": before.params_dense, "macs": before.macs_dense, **dense_scores},
      "latency": {"backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
                  "batch_size": int(x.shape[0]), "runs": args.latency_runs, "exported_s": exported_s,
                  "dense_s": dense_s, "speedup": dense_s / exported_s if exported_s > 0 else None},
      "greedy": greedy,
  }
  if args.sample:
    text = sample_text(efm, eparams, estate, run.sources.vocab, args.prompt, args.sample, seed=args.seed,
                       temperature=args.temperature, max_len=run.config.seq_len)
    report["sample"] = {"prompt": args.prompt, "seed": args.seed, "temperature": args.temperature, "text": text}
  # The model folder is replaced atomically, then each report file: a failure leaves the previous export whole.
  export_lib.save_exported(out / "model", eparams, estate, report)
  if lm:
    workdir_lib.atomic_write_text(out / "model" / "vocab.json", run.sources.vocab.to_json() + "\n")
  workdir_lib.atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=export_lib.json_default))
  md = _report_md(report)
  workdir_lib.atomic_write_text(out / "report.md", md)
  print(md)
  print(f"wrote {out / 'model'}, {out / 'report.md'}")
  return report


def export_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="maestro-export",
                              description="Choose ranks for a budget, export a compact model and report on it; "
                                          "for a language model, optionally write a sample of generated text.")
  p.add_argument("--checkpoint", required=True, help="workdir of a maestro-train run")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--budget-macs", type=int, help="MACs per example (per token for a language model) to reach "
                                                     "(greedy search)")
  group.add_argument("--budget-params", type=int, help="deployed parameters to reach (greedy search)")
  group.add_argument("--ranks", help="explicit ranks, e.g. layers.0=12,layers.1=8 (others keep the trained rank)")
  group.add_argument("--fraction", type=float, help="every layer keeps this share of its trained rank (0, 1]")
  p.add_argument("--out", help="output folder (default: WORKDIR/export)")
  p.add_argument("--step", type=int, default=1, help="rank quantum of one greedy step (default 1)")
  p.add_argument("--min-rank", type=int, default=1, help="smallest rank the search may give a layer (default 1)")
  p.add_argument("--quantum", type=int, default=1, help="snap ranks up to multiples of this (8 GPU, 128 TPU)")
  p.add_argument("--calibration-size", type=int, default=512,
                 help="training examples (tokens for a language model) in the calibration batch")
  p.add_argument("--chunk-size", type=int, help="evaluate greedy candidates in chunks of this size")
  p.add_argument("--latency-batch", type=int, default=64, help="batch size of the latency measurement")
  p.add_argument("--merge", choices=("latency", "size"), default="latency",
                 help="keep a layer factorized or merge it into one dense kernel by its measured latency on this "
                      "backend (default), or by the size rule (d_in + d_out) r >= d_in d_out")
  p.add_argument("--latency-runs", type=int, default=20, help="timed runs (the median is reported)")
  p.add_argument("--sample", type=int, default=0, metavar="N",
                 help="language models: generate N characters with the exported model (in report.md and report.json)")
  p.add_argument("--prompt", default="\n", help="text the sample continues (default: a newline)")
  p.add_argument("--seed", type=int, default=0, help="seed of the sample (the same seed gives the same text)")
  p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 takes the likeliest")
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
