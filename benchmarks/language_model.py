"""The Shakespeare language-model report: one Maestro run against its dense twin, on the held-out validation text.

``python -m benchmarks.language_model --maestro MAESTRO_WORKDIR --dense DENSE_WORKDIR [--out docs]``

Both workdirs are finished ``maestro-train`` runs of the same config, the second
with ``factorized=False`` (``maestro-train shakespeare_char factorized=False``).
On the whole validation text (Julius Caesar and Twelfth Night) it scores:

* the dense twin;
* Maestro at its trained ranks ("full rank": nothing truncated);
* Maestro truncated by the greedy search (``maestro_jax.sweep.greedy_search``,
  the search ``maestro-export`` runs; no fine-tuning) to parameter budgets that
  are fractions of the model's size at full rank (deployed, that is the dense
  twin's size: every layer at full rank deploys as its kernel), 50% among them,
  and to 50% of Maestro's trained size;
* post-hoc truncated SVD of the dense twin at the same budgets, two ways: every
  layer keeping the same share of its rank (the largest share that fits), and
  the same greedy search run on the SVD factors;

and writes ``OUT/language_model.md`` (table, targets, the commands, wall times
and generated text at three sizes) and ``OUT/language_model.png`` (validation
loss against deployed parameters), each through a temporary file and a rename.
Parameters are deployed counts (``maestro_jax.accounting``: a layer whose
factors are not smaller than its kernel counts as the kernel), embeddings and
LayerNorms included. The greedy search runs once per model down to the smallest
budget; each budget's ranks are the first point on that path within it, which is
exactly what a search stopped at that budget returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_FRACTIONS = (1.0, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2)
SAMPLE_FRACTIONS = (1.0, 0.5, 0.25)
HEADLINE_FRACTION = 0.5
TARGET_FULL_VS_DENSE = 0.03   # Maestro at full rank within 3% of the dense twin's loss
TARGET_HALF_VS_FULL = 0.05    # at 50% of the full-rank size within 5% of its own full rank (and below post-hoc SVD)
TARGET_TRAIN_SECONDS = 600.0
TARGET_TRAIN_LOSS = 2.0
# The workdirs the report's commands name.
MAESTRO_DIR, DENSE_DIR = "workdirs/shakespeare_char", "workdirs/shakespeare_char_dense"


# ------------------------------------------------------------------------------------------ pure parts


def first_within(path: Sequence[Mapping[str, Any]], budget: int) -> Mapping[str, Any]:
  """The first point of a greedy path whose parameters are within ``budget`` (what a search to it returns)."""
  for point in path:
    if point["params"] <= budget:
      return point
  raise ValueError(f"the greedy path never reaches {budget:,} parameters (it ends at {path[-1]['params']:,})")


def largest_uniform_fraction(capacities: Mapping[str, int], budget: int, params_of) -> tuple[float, dict[str, int]]:
  """The largest share ``i / max(capacities)`` of every layer's rank whose ``params_of(ranks)`` fits ``budget``.

  ``params_of`` maps ``{layer: rank}`` to deployed parameters (non-increasing as ranks fall).
  Returns ``(fraction, ranks)``; raises ValueError when even rank 1 everywhere does not fit.
  """
  import maestro_jax

  steps = max(capacities.values())
  for i in range(steps, 0, -1):
    ranks = {k: maestro_jax.fraction_to_rank(i / steps, c) for k, c in capacities.items()}
    if params_of(ranks) <= budget:
      return i / steps, ranks
  raise ValueError(f"no uniform truncation fits {budget:,} parameters")


def relative(value: float, reference: float) -> float:
  """``value / reference - 1``: the relative gap (0.03 is 3% above)."""
  return value / reference - 1.0


def targets(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each ``{'name', 'measured', 'met'}`` from the figures the report computed."""
  dense, full = figures["dense"]["loss"], figures["maestro_full"]["loss"]
  half, svd_g, svd_u = (figures[k]["loss"] for k in ("maestro_half", "svd_greedy_half", "svd_uniform_half"))
  at_half = f"at {100 * HEADLINE_FRACTION:.0f}% of the full-rank size"
  train = figures["training"]["maestro"]
  shrunk = figures["maestro_factorized_params"] < figures["maestro_capacity_params"]
  return [
      {"name": f"full-rank loss within {100 * TARGET_FULL_VS_DENSE:.0f}% of the dense twin",
       "measured": f"{100 * relative(full, dense):+.2f}%", "met": relative(full, dense) <= TARGET_FULL_VS_DENSE},
      {"name": f"{at_half}, below post-hoc SVD (greedy ranks) at that size",
       "measured": f"{half:.4f} vs {svd_g:.4f}", "met": half < svd_g},
      {"name": f"{at_half}, below post-hoc SVD (uniform share) at that size",
       "measured": f"{half:.4f} vs {svd_u:.4f}", "met": half < svd_u},
      {"name": f"{at_half}, within {100 * TARGET_HALF_VS_FULL:.0f}% of its own full rank",
       "measured": f"{100 * relative(half, full):+.2f}%", "met": relative(half, full) <= TARGET_HALF_VS_FULL},
      {"name": f"training within {TARGET_TRAIN_SECONDS / 60:.0f} minutes",
       "measured": f"{train['wall_seconds']:.0f} s", "met": train["wall_seconds"] <= TARGET_TRAIN_SECONDS},
      {"name": f"validation loss at most {TARGET_TRAIN_LOSS} nats/char",
       "measured": f"{train['validation_loss']:.4f}", "met": train["validation_loss"] <= TARGET_TRAIN_LOSS},
      {"name": "the layers shrink during training",
       "measured": f"factors of {figures['maestro_factorized_params']:,} parameters, from "
                   f"{figures['maestro_capacity_params']:,} at full rank",
       "met": bool(shrunk)},
  ]


def _n(v: int) -> str:
  return f"{v:,}"


def render(figures: Mapping[str, Any]) -> str:
  """The markdown report from the figures (``main`` computes them; the test feeds made-up ones)."""
  f = figures
  dense, full = f["dense"], f["maestro_full"]
  lines = ["# A character-level Transformer on Shakespeare: Maestro against its dense twin", "",
           "Written by `python -m benchmarks.language_model` from two runs of the `shakespeare_char` config "
           f"(`train/configs/shakespeare_char.py`: {f['model_description']}): Maestro (factorized layers, ordered "
           "dropout, group lasso, progressive shrinking) and its dense twin (`factorized=False`, the same data, "
           "steps, optimizer and seed). Every loss below is the mean cross-entropy in nats per character over "
           f"the whole held-out validation text ({_n(f['validation_tokens'])} characters of Julius Caesar and Twelfth "
           "Night, plays the training text does not contain). Parameters are deployed counts, embeddings and "
           "LayerNorms included; a layer whose factors would not be smaller than its kernel counts as the kernel. "
           "Nothing below is fine-tuned after training.", "",
           "## Headline figures", "",
           "| model | parameters | validation loss (nats/char) | bits/char | vs dense | vs Maestro full rank |",
           "|---|---:|---:|---:|---:|---:|"]

  def row(label, r):
    return (f"| {label} | {_n(r['params'])} | {r['loss']:.4f} | {r['loss'] / math.log(2):.4f} | "
            f"{100 * relative(r['loss'], dense['loss']):+.2f}% | {100 * relative(r['loss'], full['loss']):+.2f}% |")

  pct = f"{100 * HEADLINE_FRACTION:.0f}%"
  lines += [row("dense twin", dense), row("Maestro, trained ranks (full rank)", full),
            row(f"Maestro, greedy search to {pct} of the full-rank size", f["maestro_half"]),
            row("post-hoc SVD of the dense twin, greedy ranks, same budget", f["svd_greedy_half"]),
            row(f"post-hoc SVD of the dense twin, every layer the same share "
                f"({100 * f['svd_uniform_half']['fraction']:.1f}% of its rank), same budget", f["svd_uniform_half"]),
            row(f"Maestro, greedy search to {pct} of its trained size", f["maestro_half_trained"]),
            "", f"The {pct} budget is {_n(f['half_budget'])} parameters, {pct} of the model at full rank: deployed, "
            "a layer whose factors are not smaller than its kernel counts as the kernel, so at full rank the "
            f"factorized model is the dense twin's {_n(dense['params'])}. Training shrank the factors from "
            f"{_n(f['maestro_capacity_params'])} parameters at full rank to {_n(f['maestro_factorized_params'])}, "
            f"{_n(full['params'])} deployed; the last row halves that trained size "
            f"({_n(f['half_trained_budget'])} parameters).", "",
            "## Targets", "", "| target | measured | met |", "|---|---|---|"]
  lines += [f"| {t['name']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in targets(f)]
  lines += ["", "## Loss against parameters", "", "![validation loss against parameters](language_model.png)", "",
            "Budgets are shares of the full-rank size (the dense twin's). Maestro and post-hoc SVD (greedy) use the "
            f"same greedy search (steps of {f['greedy_step']} ranks, a calibration batch of "
            f"{_n(f['calibration_tokens'])} training characters); the SVD curve starts from the dense twin's full "
            "rank.", "",
            "| budget | Maestro, greedy: params | loss | SVD, greedy: params | loss | SVD, uniform share: params "
            "| loss |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for c in f["curve"]:
    m, g, u = c["maestro"], c["svd_greedy"], c["svd_uniform"]
    lines.append(f"| {100 * c['fraction']:.0f}% ({_n(c['budget'])}) | {_n(m['params'])} | {m['loss']:.4f} | "
                 f"{_n(g['params'])} | {g['loss']:.4f} | {_n(u['params'])} | {u['loss']:.4f} |")
  lines += [f"| dense twin | | | {_n(f['svd_full']['params'])} | {f['svd_full']['loss']:.4f} | | |", "",
            "Maestro's trained ranks (each layer's full rank in brackets): "
            + ", ".join(f"{k} {v} ({f['full_ranks'][k]})" for k, v in f["trained_ranks"].items()) + ".", ""]
  s = f["samples"]
  lines += ["## Generated text", "",
            f"Maestro truncated by the greedy search to three sizes, each continuing the prompt {s['prompt']!r} with "
            f"{s['chars']} characters (seed {s['seed']}, temperature {s['temperature']}, context cropped to the "
            f"last {f['seq_len']} characters; `maestro-export --sample` draws the same way).", ""]
  for item in s["items"]:
    lines += [f"**{item['label']}** ({_n(item['params'])} parameters, validation loss {item['loss']:.4f}):", "",
              "```", s["prompt"] + item["text"], "```", ""]
  t = f["training"]
  lines += ["## Reproducing", "", "```bash",
            f"maestro-train shakespeare_char --workdir {MAESTRO_DIR}",
            f"maestro-train shakespeare_char factorized=False --workdir {DENSE_DIR}",
            f"python -m benchmarks.language_model --maestro {MAESTRO_DIR} --dense {DENSE_DIR}",
            "```", "",
            f"Wall times on {f['machine']} (JAX {f['jax_version']}; the machine was shared with other work, so "
            "these are upper bounds): training Maestro "
            f"{t['maestro']['wall_seconds']:.0f} s, the dense twin {t['dense']['wall_seconds']:.0f} s (each run's "
            f"own measure, `summary.json`); this report {f['report_seconds']:.0f} s (the greedy searches "
            f"{f['timings']['greedy_s']:.0f} s, scoring {f['timings']['score_s']:.0f} s, the samples "
            f"{f['timings']['sample_s']:.0f} s). Training is deterministic given the config's seed.", ""]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- work


def _plot(figures: Mapping[str, Any], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  f = figures
  fig, ax = plt.subplots(figsize=(7.5, 4.6))
  curve = f["curve"]
  for key, label, marker in (("maestro", "Maestro, greedy search (no fine-tuning)", "o"),
                             ("svd_greedy", "post-hoc SVD of the dense twin, greedy ranks", "s"),
                             ("svd_uniform", "post-hoc SVD of the dense twin, uniform share", "^")):
    pts = sorted((c[key]["params"], c[key]["loss"]) for c in curve)
    if key != "maestro":
      pts.append((f["svd_full"]["params"], f["svd_full"]["loss"]))
    ax.plot(*zip(*pts), marker=marker, markersize=4, label=label)
  ax.scatter([f["dense"]["params"]], [f["dense"]["loss"]], marker="*", s=160, color="black", zorder=5,
             label="dense twin")
  ax.axhline(f["dense"]["loss"], color="black", linewidth=0.8, linestyle=":")
  ax.axvline(f["half_budget"], color="grey", linewidth=0.8, linestyle="--",
             label=f"{100 * HEADLINE_FRACTION:.0f}% of the full-rank size")
  # The greedy curves whole; the uniform share may leave the top (its figures are in the table).
  worst = max(max(c["maestro"]["loss"], c["svd_greedy"]["loss"]) for c in curve)
  ax.set_ylim(f["dense"]["loss"] - 0.05, max(worst + 0.1, f["dense"]["loss"] + 0.5))
  ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
  ax.set(xlabel="deployed parameters", ylabel="validation loss (nats/char)",
         title="Shakespeare, character-level Transformer: loss against parameters")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
  fig.savefig(temporary, dpi=110)
  plt.close(fig)
  os.replace(temporary, path)


def compute(args: argparse.Namespace) -> dict[str, Any]:
  """Every figure of the report (loads both runs, searches, scores, samples)."""
  import jax
  import numpy as np

  import maestro_jax
  from maestro_jax import accounting
  from maestro_jax import sweep as sweep_lib
  from train import deploy

  start = time.perf_counter()
  run = deploy._load_run(args.maestro)  # pylint: disable=protected-access
  dense_run = deploy._load_run(args.dense, "dense checkpoint")  # pylint: disable=protected-access
  if run.config.task != "language_modeling" or not run.config.factorized:
    raise SystemExit(f"--maestro {args.maestro}: not a factorized language_modeling run")
  kwargs = lambda r: json.loads(json.dumps(r.config.model_kwargs))
  if (dense_run.config.factorized or dense_run.config.model != run.config.model or kwargs(dense_run) != kwargs(run)
      or dense_run.config.dataset != run.config.dataset or dense_run.config.seq_len != run.config.seq_len
      or dense_run.sources.vocab != run.sources.vocab):
    raise SystemExit(f"--dense {args.dense}: not the factorized=False twin of {args.maestro}")
  params = jax.device_get(run.state["params"])
  state = run.state["model_state"]
  ranks, positions = run.ranks, run.positions
  dense_params = jax.device_get(dense_run.state["params"])
  svd_params = maestro_jax.factorize_dense_params(dense_params, 1.0)
  svd_caps = maestro_jax.capacities(svd_params)
  params_of = lambda p, r: accounting.count(p, r, positions).params_merged
  full_params = params_of(params, ranks)
  dense_size = int(accounting.count(dense_params, None, positions).params_dense)
  budgets = {fr: int(fr * dense_size) for fr in args.fractions}
  half_trained_budget = int(HEADLINE_FRACTION * full_params)
  smallest = min(min(budgets.values()), half_trained_budget)

  # Greedy searches, once each down to the smallest budget.
  t = time.perf_counter()
  calib = run.task.calibration_batch(run.sources, run.config, args.calibration_size)
  greedy = lambda p, s, r: sweep_lib.greedy_search(run.model, p, s, calib, r, positions, budget_params=smallest,
                                                   step=args.step)
  maestro_path = greedy(params, state, ranks).path
  svd_path = greedy(svd_params, dense_run.state["model_state"], svd_caps).path
  greedy_s = time.perf_counter() - t
  print(f"greedy searches: {len(maestro_path)} and {len(svd_path)} points, {greedy_s:.0f} s", flush=True)

  maestro_configs = [dict(ranks)] + [dict(first_within(maestro_path, b)["ranks"]) for b in budgets.values()] + [
      dict(first_within(maestro_path, half_trained_budget)["ranks"])]
  svd_greedy = [dict(first_within(svd_path, b)["ranks"]) for b in budgets.values()]
  svd_uniform = [largest_uniform_fraction(svd_caps, b, lambda r: params_of(svd_params, r)) for b in budgets.values()]
  svd_configs = [dict(svd_caps)] + svd_greedy + [r for _, r in svd_uniform]

  # Scores on the whole validation text.
  t = time.perf_counter()
  batches = lambda: run.task.eval_batches(run.sources.evaluation, run.config, args.batch_size,
                                          max_windows=args.max_windows)
  score = lambda p, s, configs: sweep_lib.sweep(run.model, p, s, batches(), sweep_lib.stack(configs),
                                                chunk_size=args.chunk_size)
  m_scores = score(params, state, maestro_configs)
  s_scores = score(svd_params, dense_run.state["model_state"], svd_configs)
  dense_eval = deploy._evaluate(dense_run.model, dense_run.state["params"],  # pylint: disable=protected-access
                                dense_run.state["model_state"], batches)
  score_s = time.perf_counter() - t
  print(f"scored {len(maestro_configs) + len(svd_configs) + 1} models, {score_s:.0f} s", flush=True)

  point = lambda p, r, loss, **extra: {"params": int(params_of(p, r)), "loss": float(loss), "ranks": dict(r),
                                       **extra}
  n = len(budgets)
  maestro_pts = [point(params, c, l) for c, l in zip(maestro_configs, m_scores["loss"])]
  svd_pts = [point(svd_params, c, l) for c, l in zip(svd_configs, s_scores["loss"])]
  for (fraction, _), pt in zip(svd_uniform, svd_pts[1 + n:]):
    pt["fraction"] = fraction
  curve = [{"fraction": fr, "budget": b, "maestro": maestro_pts[1 + i], "svd_greedy": svd_pts[1 + i],
            "svd_uniform": svd_pts[1 + n + i]} for i, (fr, b) in enumerate(budgets.items())]
  by_fraction = {c["fraction"]: c for c in curve}
  if HEADLINE_FRACTION not in by_fraction:
    raise SystemExit(f"--fractions must include {HEADLINE_FRACTION}")
  half = by_fraction[HEADLINE_FRACTION]

  # Samples at three sizes.
  t = time.perf_counter()
  items = []
  for fr in SAMPLE_FRACTIONS:
    pt = maestro_pts[0] if fr == 1.0 else by_fraction[fr]["maestro"]
    keeps = {k: np.int32(v) for k, v in pt["ranks"].items()}
    text = deploy.sample_text(run.model, run.state["params"], state, run.sources.vocab, args.prompt, args.sample,
                              seed=args.seed, temperature=args.temperature, max_len=run.config.seq_len, keeps=keeps)
    label = "Maestro, trained ranks" if fr == 1.0 else f"Maestro at {100 * fr:.0f}% of the full-rank size"
    items.append({"label": label, "fraction": fr, "params": pt["params"], "loss": pt["loss"], "text": text})
  sample_s = time.perf_counter() - t

  summaries = {name: json.loads((Path(d) / "summary.json").read_text()) for name, d in
               (("maestro", args.maestro), ("dense", args.dense))}
  mk = run.config.model_kwargs
  return {
      "model_description": f"{mk['num_layers']} pre-LN blocks, d_model {mk['d_model']}, {mk['num_heads']} heads, "
                           f"MLP {mk['mlp_dim']}, windows of {run.config.seq_len} characters, "
                           f"{run.config.epochs * run.config.steps_per_epoch} steps of {run.config.batch_size}, "
                           f"{run.config.sampler} sampler, loss {run.config.loss}"
                           + (f" (weight {run.config.distill_weight:g})" if run.config.loss == "distill" else "")
                           + f", {'decoupled ' if run.config.lasso_decoupled else ''}lasso {run.config.lasso:g}"
                           + (f" for the first {run.config.lasso_epochs} of {run.config.epochs} epochs"
                              if run.config.lasso_epochs else ""),
      "seq_len": run.config.seq_len,
      "validation_tokens": int(m_scores["count"]),
      "dense": {"params": int(accounting.count(dense_params, None, positions).params_dense),
                "loss": float(dense_eval["loss"])},
      "maestro_full": maestro_pts[0],
      # The factorized model as training starts: every layer at its full rank (the SVD tree has that shape).
      "maestro_capacity_params": int(accounting.count(svd_params, None, positions).params_factorized),
      "maestro_factorized_params": int(accounting.count(params, ranks, positions).params_factorized),
      "half_budget": half["budget"], "maestro_half": half["maestro"],
      "half_trained_budget": half_trained_budget, "maestro_half_trained": maestro_pts[-1],
      "svd_greedy_half": half["svd_greedy"], "svd_uniform_half": half["svd_uniform"], "svd_full": svd_pts[0],
      "curve": curve,
      "trained_ranks": dict(ranks), "full_ranks": dict(svd_caps), "greedy_step": args.step,
      "calibration_tokens": int(np.sum(calib["mask"])),
      "samples": {"prompt": args.prompt, "chars": args.sample, "seed": args.seed, "temperature": args.temperature,
                  "items": items},
      "training": {k: {"wall_seconds": float(v["wall_seconds"]), "validation_loss": float(v["validation_loss"])}
                   for k, v in summaries.items()},
      "timings": {"greedy_s": greedy_s, "score_s": score_s, "sample_s": sample_s},
      "report_seconds": time.perf_counter() - start,
      "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
      "jax_version": jax.__version__,
  }


def _fractions(text: str) -> tuple[float, ...]:
  values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}, reverse=True))
  if not values or any(not 0 < v <= 1 for v in values):
    raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
  return values


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.language_model", description=__doc__.split("\n\n")[0])
  p.add_argument("--maestro", required=True, help="workdir of a finished maestro-train shakespeare_char run")
  p.add_argument("--dense", required=True, help="workdir of the same config trained with factorized=False")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"),
                 help="folder of language_model.md and language_model.png (default: the repository's docs/)")
  p.add_argument("--fractions", type=_fractions, default=DEFAULT_FRACTIONS,
                 help="parameter budgets as shares of the full-rank (dense twin's) size (must include 0.5, 0.25 and 1)")
  p.add_argument("--step", type=int, default=8,
                 help="ranks removed per greedy step (default 8, the config's rank quantum)")
  p.add_argument("--calibration-size", type=int, default=512,
                 help="training characters the greedy search scores (maestro-export's default)")
  p.add_argument("--batch-size", type=int, default=64, help="validation windows per batch")
  p.add_argument("--chunk-size", type=int, help="score configurations in chunks of this size (less memory)")
  p.add_argument("--max-windows", type=int, help="score only the first N validation windows (a quick check; "
                                                 "the report is meant for the whole text)")
  p.add_argument("--prompt", default="ROMEO:", help="prompt of the samples")
  p.add_argument("--sample", type=int, default=300, help="characters per sample")
  p.add_argument("--seed", type=int, default=0, help="seed of the samples")
  p.add_argument("--temperature", type=float, default=0.8, help="temperature of the samples")
  p.add_argument("--json", help="also write the figures as JSON to this file")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  missing = [f for f in SAMPLE_FRACTIONS + (HEADLINE_FRACTION,) if f not in args.fractions]
  if missing:
    raise SystemExit(f"--fractions must include {', '.join(map(str, sorted(set(missing))))}")
  figures = compute(args)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  _plot(figures, out / "language_model.png")
  if args.json:
    Path(args.json).write_text(json.dumps(figures, indent=2, default=float))
  md = render(figures)
  temporary = out / f".language_model.md.{os.getpid()}.tmp"
  temporary.write_text(md)
  os.replace(temporary, out / "language_model.md")
  print(md)
  print(f"wrote {out / 'language_model.md'}, {out / 'language_model.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
