"""What a run shows a person: parameter/MAC counts, plots of ranks and accuracy, the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")  # Files only; no display is assumed.
import matplotlib.pyplot as plt  # noqa: E402

from maestro_jax import accounting  # noqa: E402


def sizes(params, ranks: dict[str, int] | None, positions: dict[str, int]) -> accounting.Report:
  """Parameters and MACs at ``ranks`` (None: full capacity); use the ``merged`` totals for a deployable model."""
  return accounting.count(jax.device_get(params), ranks, positions)


def tensorboard_writer(workdir: Path):
  """A TensorBoard writer in ``workdir/tensorboard`` when tensorboardX is installed, else None."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter(str(workdir / "tensorboard"))


def log_record(writer, record: dict) -> None:
  """Writes an epoch's scalars (and each layer's rank) to TensorBoard."""
  if writer is None:
    return
  for key, value in record.items():
    if isinstance(value, (int, float)) and key not in ("epoch", "step"):
      writer.add_scalar(key, value, record["step"])
  for name, rank in record["ranks"].items():
    writer.add_scalar(f"rank/{name}", rank, record["step"])
  writer.flush()


def plot_history(history: list[dict], capacities: dict[str, int], workdir: Path, headline=None) -> None:
  """``ranks.png``: each layer's rank (as a fraction of its initial capacity) per epoch; the headline metric's plot.

  ``headline`` is the task's :class:`maestro_train.tasks.Metric` (default: test accuracy, ``accuracy.png``);
  a metric that is not an accuracy is drawn to ``loss.png``.
  """
  if not history:
    return
  if headline is None:
    from .tasks import Classification  # pylint: disable=import-outside-toplevel
    headline = Classification.headline
  epochs = [h["epoch"] for h in history]
  if capacities:  # A dense run has no ranks to draw.
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, cap in capacities.items():
      ax.plot(epochs, [h["ranks"][name] / cap for h in history], marker="o", label=f"{name} ({cap})")
    ax.set(xlabel="epoch", ylabel="rank / initial rank", title="rank per layer", ylim=(0, 1.05))
    ax.legend(fontsize="small", ncol=2 if len(capacities) > 8 else 1, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(workdir / "ranks.png", dpi=120)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4))
  name = headline.label.split(" (")[0]
  ax.plot(epochs, [headline.scale * h[headline.key] for h in history], marker="o", label=name)
  ax.set(xlabel="epoch", ylabel=headline.label, title=name)
  ax2 = ax.twinx()
  ax2.plot(epochs, [h["params"] for h in history], color="tab:orange", linestyle="--", label="parameters")
  ax2.set_ylabel("parameters")
  ax.grid(alpha=0.3)
  fig.legend(loc="upper right" if not headline.higher_is_better else "lower right")
  fig.tight_layout()
  fig.savefig(workdir / ("accuracy.png" if headline.key.endswith("accuracy") else "loss.png"), dpi=120)
  plt.close(fig)


# Held-out metrics a summary reports, by task; the first is the headline.
_SUMMARY_METRICS = {"classification": ("test_accuracy",),
                    "language_modeling": ("validation_loss", "validation_bits_per_char", "validation_perplexity",
                                          "validation_accuracy")}


def summary(config, final: accounting.Report, full: accounting.Report, history: list[dict],
            initial_caps: dict[str, int], ranks: dict[str, int], wall_seconds: float,
            final_metrics: dict | None = None) -> dict[str, Any]:
  """Final held-out metrics, the sizes of the dense, full-rank factorized and shrunk models, and every layer's rank.

  ``final_metrics`` are the run's closing evaluation; default the last epoch's record.
  """
  last = final_metrics or (history[-1] if history else {})
  task = getattr(config, "task", "classification")
  return {
      "config": config.dataset + "/" + config.model,
      "task": task,
      "epochs": len(history),
      **{key: last.get(key) for key in _SUMMARY_METRICS[task]},
      "wall_seconds": round(wall_seconds, 1),
      "params": {"dense": full.params_dense, "factorized_full_rank": full.params_factorized,
                 "shrunk": final.params_merged},
      "macs": {"dense": full.macs_dense, "factorized_full_rank": full.macs_factorized,
               "shrunk": final.macs_merged},
      "ranks": {name: [ranks.get(name, cap), cap] for name, cap in initial_caps.items()},
  }


def format_summary(s: dict[str, Any]) -> str:
  if s.get("task", "classification") == "language_modeling":
    loss = s["validation_loss"]
    result = "n/a" if loss is None else (f"validation loss {loss:.4f} nats/char ({s['validation_bits_per_char']:.3f} "
                                         f"bits/char, perplexity {s['validation_perplexity']:.2f})")
    macs = "MACs/token"
  else:
    acc = s["test_accuracy"]
    result = f"test accuracy {'n/a' if acc is None else f'{100 * acc:.2f}%'}"
    macs = "MACs"
  lines = [f"{s['config']}: {s['epochs']} epochs, {result}, {s['wall_seconds']} s",
           "", f"{'model':<24}{'parameters':>14}{macs:>16}"]
  for key, label in (("dense", "dense"), ("factorized_full_rank", "factorized, full rank"),
                     ("shrunk", "after shrinking")):
    lines.append(f"{label:<24}{s['params'][key]:>14,}{s['macs'][key]:>16,}")
  dense_params = s["params"]["dense"]
  if dense_params:
    lines.append(f"compression vs dense: {dense_params / max(s['params']['shrunk'], 1):.2f}x parameters, "
                 f"{s['macs']['dense'] / max(s['macs']['shrunk'], 1):.2f}x MACs")
  lines += ["", f"{'layer':<32}{'rank':>12}"]
  for name, (rank, cap) in s["ranks"].items():
    lines.append(f"{name:<32}{f'{rank}/{cap}':>12}")
  return "\n".join(lines)


def write_summary(s: dict[str, Any], workdir: Path) -> None:
  text = format_summary(s)
  print(text)
  (workdir / "summary.txt").write_text(text + "\n")
  (workdir / "summary.json").write_text(json.dumps(s, indent=2))
