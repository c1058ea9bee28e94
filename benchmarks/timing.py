"""Timing helpers: interleaved rounds, paired ratios, XLA cost analysis.

The machine may be shared (other processes loading its cores), so absolute
times drift. Every benchmark therefore times a baseline and its candidates in
the same process, *interleaved*: each round runs every function once (``inner``
calls, each blocked on), in an order rotated from round to round, and a
candidate's figure is the median over rounds of its time divided by the
baseline's time in that same round. Slow drift then cancels out of the ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def block(x: Any) -> Any:
  """Waits for every array in ``x``."""
  return jax.block_until_ready(x)


def wall(fn: Callable[[], Any]) -> float:
  """Seconds of one call of ``fn`` (its outputs blocked on)."""
  start = time.perf_counter()
  block(fn())
  return time.perf_counter() - start


def interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int, inner: int = 1,
                warmup: int = 1) -> dict[str, list[float]]:
  """Times several functions in alternation.

  Args:
    fns: ``{name: fn}``; each ``fn()`` does one unit of work and returns
      arrays to block on.
    rounds: timed rounds; each runs every function ``inner`` times.
    inner: calls per function per round (each call blocked on).
    warmup: untimed calls of each function first.

  Returns:
    ``{name: [seconds per call, one entry per round]}``.
  """
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      block(fns[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      fn = fns[name]
      start = time.perf_counter()
      for _ in range(inner):
        block(fn())
      times[name].append((time.perf_counter() - start) / inner)
  return times


def median(values: Sequence[float]) -> float:
  """The median of ``values``."""
  return float(statistics.median(values))


def paired_ratio(times: Mapping[str, Sequence[float]], candidate: str, baseline: str) -> float:
  """Median over rounds of ``candidate / baseline`` time in the same round."""
  return median([c / b for c, b in zip(times[candidate], times[baseline])])


def spread(times: Mapping[str, Sequence[float]], candidate: str, baseline: str) -> tuple[float, float]:
  """The smallest and largest per-round ratio (how noisy the median is)."""
  ratios = [c / b for c, b in zip(times[candidate], times[baseline])]
  return float(min(ratios)), float(max(ratios))


def cost_flops(compiled: Any) -> float:
  """FLOPs of a compiled computation from XLA's cost analysis (NaN when unavailable).

  ``Compiled.cost_analysis()`` returns a dict in current JAX and a list with one
  dict per computation in older versions; both are handled.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return math.nan
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return math.nan
  return float(analysis["flops"])


def compile_stats(jitted: Any, *args: Any) -> tuple[float, float]:
  """Lowers and compiles ``jitted`` for ``args``: ``(flops, compile seconds)``.

  The executable lands in JAX's compilation cache, so the first real call of
  ``jitted`` with arguments of the same shapes does not compile again.
  """
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return cost_flops(compiled), time.perf_counter() - start


class Stepper:
  """Calls a donated train step repeatedly, threading its state.

  Each call runs one step with the next of a fixed set of PRNG keys and returns
  the new state (to block on).
  """

  def __init__(self, step: Callable, state: Any, batch: Any, key: jax.Array, num_keys: int = 16):
    self.step, self.state, self.batch = step, state, batch
    self.keys = list(jax.random.split(key, num_keys))
    self.count = 0

  def __call__(self) -> Any:
    key = self.keys[self.count % len(self.keys)]
    self.count += 1
    self.state, _ = self.step(self.state, self.batch, key)
    return self.state


def finite_positive(x: float) -> bool:
  """Whether ``x`` is a finite number above zero."""
  return isinstance(x, (int, float, np.floating)) and math.isfinite(x) and x > 0
