"""SIGTERM and SIGINT: stop at a safe point, save once, say where to resume from.

SIGTERM is the preemption signal of SLURM, Kubernetes and TPU VMs; SIGINT is
Ctrl-C. Outside :func:`deferred` a signal stops the program at once (nothing is
at stake: setup, loading, restoring). Inside it, the signal is only recorded;
the training loop asks :func:`requested` after every step, saves, and raises
:class:`Interrupted`. A second signal while stopping exits at once: checkpoints
are written to a temporary folder and renamed, so none is left half-written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal; ``exit_code`` is 128 + the signal number, ``args[0]`` one line for the user."""

  def __init__(self, signum: int, message: str | None = None):
    name = signal.Signals(signum).name
    super().__init__(message or f"stopped by {name} before training started; nothing to save")
    self.signum = signum
    self.exit_code = 128 + signum


_state = {"signum": None, "defer": 0}


def _handler(signum, frame):
  if _state["defer"]:
    if _state["signum"] is not None:  # Asked twice: stop now, without waiting for the save.
      sys.stderr.write(f"\nstopped at once by a second {signal.Signals(signum).name}; "
                       "resume from the newest checkpoint\n")
      os._exit(128 + signum)
    _state["signum"] = signum
    return
  _state["signum"] = signum
  raise Interrupted(signum)


def requested() -> int | None:
  """The signal received since :func:`handling` began, or None."""
  return _state["signum"]


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """Installs the handlers (main thread only; elsewhere signals keep their default behaviour)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _handler) for s in SIGNALS}
  outer = dict(_state)
  _state.update(signum=None, defer=0)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _state.update(outer)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Within this block a signal is recorded for :func:`requested` instead of stopping the program."""
  _state["defer"] += 1
  try:
    yield
  finally:
    _state["defer"] -= 1
