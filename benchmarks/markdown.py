"""The markdown report (``RESULTS.md``) and one-line headlines of the benchmark sections."""

from __future__ import annotations

import datetime
from typing import Any


def _x(value: float) -> str:
  return f"{value:.2f}x"


def headline(name: str, section: dict[str, Any]) -> str:
  """A one-line summary of a section's key ratios."""
  r = section.get("ratios", {})
  if name == "train_step_vs_dense":
    models = list(dict.fromkeys(k.split("/")[0] for k in r))
    return "; ".join(f"{m} time vs dense {_x(r[f'{m}/maestro_full_rank/time_vs_dense'])} full rank, "
                     f"{_x(r[f'{m}/maestro_shrunk_25/time_vs_dense'])} at 25% "
                     f"(FLOPs {_x(r[f'{m}/maestro_full_rank/flops_vs_dense'])}, "
                     f"{_x(r[f'{m}/maestro_shrunk_25/flops_vs_dense'])}; factors path "
                     f"{_x(r[f'{m}/factors_full_rank/time_vs_dense'])}, "
                     f"{_x(r[f'{m}/factors_shrunk_25/time_vs_dense'])})" for m in models)
  if name == "ordered_dropout_overhead":
    return "; ".join(f"{k.split('/')[0]} sampled vs keep=capacity {_x(v)}" for k, v in r.items())
  if name == "compile_count":
    return "; ".join(f"quantum {run['quantum']}: {run['compiles']} compiles, expected {run['expected']} "
                     f"({run['rank_change_events']} rank changes, "
                     f"{run['capacity_change_events_before_last_epoch']} capacity changes before the last epoch)"
                     for run in section.get("runs", []))
  if name == "sweep_vs_loop":
    sizes = list(dict.fromkeys(k.split("/")[0] for k in r))
    return "; ".join(f"{n[1:]} images: sweep vs as many full-rank evals "
                     f"{_x(r[f'{n}/sweep_vs_full_rank_evals_steady'])} steady, "
                     f"{_x(r[f'{n}/sweep_vs_full_rank_evals_cold'])} cold; naive loop vs sweep "
                     f"{_x(r[f'{n}/naive_loop_vs_sweep_cold'])} cold, {_x(r[f'{n}/naive_loop_vs_sweep_steady'])} "
                     "steady" for n in sizes)
  if name == "export_latency":
    keys = [k for k in r if k.endswith("time_vs_dense") and ("fraction_0.25" in k or "fraction_1.0" in k)]
    return "; ".join(f"{k.replace('/time_vs_dense', '')} {_x(r[k])}" for k in keys)
  if name == "freezing":
    return "; ".join(f"{k.replace('/time_vs_none', '')} {_x(v)}" for k, v in r.items() if k.endswith("time_vs_none"))
  if name == "end_to_end":
    parts = []
    for label, run in section.get("runs", {}).items():
      text = (f"{label}: {run['total_seconds']:.1f} s for 2 epochs ({run['seconds_per_epoch']:.1f} s/epoch, "
              f"accuracy {100 * run['test_accuracy']:.2f}%)")
      key = f"{label}/total_2_epochs_vs_pytorch_reference"
      if key in r:
        text += f", {_x(r[key])} the PyTorch reference's 44 s"
      parts.append(text)
    return "; ".join(parts)
  return "; ".join(f"{k} {_x(v)}" for k, v in list(r.items())[:4])


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value).replace("|", "\\|")


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return lines


def render(results: dict[str, Any]) -> str:
  """The markdown report of a results dict (see :func:`benchmarks.suite.run`)."""
  m = results["machine"]
  v = m["versions"]
  lines = [
      f"# maestro_jax benchmarks ({results['mode']} run)", "",
      f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `python -m benchmarks"
      f"{' --small' if results['mode'] == 'small' else ''}` in {results['total_seconds']:.0f} s.", "",
      "## Machine", "",
      f"- platform: {m['platform']} ({m['processor']})",
      f"- CPUs: {m['cpu_count']} ({m['cpus_usable']} usable by this process)",
      f"- JAX {v['jax']} (jaxlib {v['jaxlib']}), Flax {v['flax']}, optax {v['optax']}, numpy {v['numpy']}, "
      f"Python {v['python']}",
      f"- backend `{m['backend']}`, devices `{', '.join(m['devices'])}` (no GPU/TPU in this run)",
      f"- XLA_FLAGS: `{m['xla_flags'] or '(none)'}`",
      f"- load average at start {m.get('load_average_start')}, at end {m.get('load_average_end')}", "",
      "**The CPU may have been shared** with other processes during this run (see the load average), so "
      "absolute times are only indicative. Every figure is therefore a *ratio* against a baseline measured in "
      "the same process, with baseline and candidates interleaved round by round (order rotated) and the "
      "median taken over the per-round ratios (`benchmarks/timing.py`). Times are medians of "
      "`time.perf_counter` around calls blocked with `jax.block_until_ready`, after warm-up.", "",
      "## Key ratios", "",
  ]
  lines += _table(["benchmark", "baseline", "result"],
                  [[s["title"], s["baseline"], headline(name, s)] for name, s in results["benchmarks"].items()])
  for name, s in results["benchmarks"].items():
    lines += ["", f"## {s['title']}", "", f"`{name}`, {s['seconds']:.0f} s. Baseline: {s['baseline']}.", ""]
    lines += _table(s["columns"], s["rows"])
    if s.get("notes"):
      lines += [""] + [f"- {note}" for note in s["notes"]]
  lines += ["", "All ratios, per benchmark, are in `results.json` next to this file.", ""]
  return "\n".join(lines)
