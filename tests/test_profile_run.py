"""The run profiler times every phase of the real runner (figures are measured, only their presence is tested)."""

import jax
import jax.numpy as jnp
import pytest

from maestro_train import config as config_lib

from benchmarks import profile_run


@pytest.fixture(scope="module")
def profiled():
  """The profile of two digits epochs, and whether a listener the caller registered before still fires after."""
  events = []
  listener = lambda event, seconds, **_: events.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    config = config_lib.override(config_lib.load("digits_mlp"), ["epochs=2", "shrink=false"])
    result = profile_run.profile(config)
    before = len(events)
    jax.jit(lambda x: x * 3.0)(jnp.ones(2))  # a new program: compile events
    return result, len(events) > before
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_every_phase_the_runner_goes_through_is_timed(profiled):
  (clock, records, _), _ = profiled
  assert [r["epoch"] for r in records] == [1, 2]
  setup, first, second = clock.seconds[0], clock.seconds[1], clock.seconds[2]
  assert setup["data: load"] > 0 and setup["model build"] > 0
  for phase in ("batches", "step dispatch", "evaluation", "checkpoint", "plots", "size accounting"):
    assert first[phase] > 0, phase
  for phase in ("batches", "step dispatch", "evaluation", "checkpoint"):
    assert second[phase] > 0, phase
  # Without shrinking nothing changes shape: every program compiles in the first epoch and none in the second.
  assert first["compile (trace, lower, XLA)"] > 0
  assert second["compile (trace, lower, XLA)"] == 0


def test_table_has_a_column_per_epoch_and_the_runner_s_train_time(profiled):
  (clock, records, wall), _ = profiled
  text = profile_run.table(clock, records, wall)
  assert "| phase | set-up | epoch 1 | epoch 2 |" in text
  train_row = next(line for line in text.splitlines() if "epoch train time" in line)
  assert train_row.endswith(" | ".join(f"{r['epoch_seconds']:.2f}" for r in records) + " |")



def test_profiling_leaves_the_caller_s_jax_listeners_registered(profiled):
  _, caller_listener_fires = profiled
  assert caller_listener_fires
