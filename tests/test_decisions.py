"""Decisions made from measured numbers: the shrink threshold at equality, and rank/dense choices from layer timings.

``measure_layer_times`` is run on a stubbed timing table (``export.time_fn``
replaced), so its choices are checked exactly and no wall clock is involved.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

import maestro_jax as mj
from maestro_jax import export
from maestro_jax import models


# ----------------------------------------------------------------------------- shrink threshold


def _diagonal_layer(col_norms, row_norms):
  """A layer whose component k has column norm ``col_norms[k]`` in A and row norm ``row_norms[k]`` in B."""
  r = len(col_norms)
  return {"a": jnp.diag(jnp.asarray(col_norms, jnp.float32)), "b": jnp.diag(jnp.asarray(row_norms, jnp.float32)),
          "bias": jnp.zeros((r,))}


def test_shrink_keeps_a_component_whose_importance_equals_the_threshold():
  # Squared tail sums 1.25, 0.25, 0.25, 0 in both factors: s = (1.25, 0.25, 0.25, 0) exactly
  # (sqrt(0.25) = 0.5 is exact), so s_b == threshold for b = 1, 2.
  params = {"fc": _diagonal_layer([1.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.5, 0.0])}
  s = np.asarray(mj.importance(params)["fc"])
  np.testing.assert_array_equal(s, np.float32([1.25, 0.25, 0.25, 0.0]))
  assert mj.ranks_from_importance(params, 0.25) == {"fc": 3}  # s_b >= eps keeps both equal ones
  assert mj.ranks_from_importance(params, np.nextafter(np.float32(0.25), np.float32(1))) == {"fc": 1}
  assert mj.ranks_from_importance(params, 0.0) == {"fc": 4}  # s_3 = 0 >= 0
  assert mj.ranks_from_importance(params, 0.0, {"fc": 3}) == {"fc": 3}  # never grows past the current rank


def test_shrink_threshold_equal_to_a_computed_importance():
  # Threshold set to the importance the library computes itself, whatever its rounding.
  rng = np.random.default_rng(0)
  params = {"fc": {"a": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
                   "b": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)}}
  s = np.asarray(mj.importance(params)["fc"])
  for b in range(5):
    assert mj.ranks_from_importance(params, float(s[b])) == {"fc": b + 1}


# ----------------------------------------------------------------------------- layer timings


def _stub_times(monkeypatch, factor_times, dense_time):
  """Makes ``export.time_fn`` report ``factor_times[rank]`` for factors of that rank, ``dense_time`` for a kernel."""
  calls = []

  def fake_time_fn(fn, params, x, *, repeats=10, warmup=2):
    del fn, x, repeats, warmup
    form = "dense" if "kernel" in params else int(params["a"].shape[-1])
    calls.append(form)
    return dense_time if form == "dense" else factor_times[form]

  monkeypatch.setattr(export, "time_fn", fake_time_fn)
  return calls


def _measure(**kwargs):
  model = models.MLP(16, (24,), 3, rngs=nnx.Rngs(0))  # layers.0: capacity 16
  return export.measure_layer_times(model, (16,), {"layers.0": 4}, quantum=4, max_candidates=3,
                                    layers=["layers.0"], **kwargs)["layers.0"]


def test_picks_the_smallest_rank_within_tolerance_of_the_fastest(monkeypatch):
  calls = _stub_times(monkeypatch, {4: 1.0, 8: 0.51, 12: 0.50}, dense_time=0.9)
  timing = _measure(tolerance=0.05)
  # A warm-up call of each form, then 10 rounds alternating the forms call by call.
  assert calls == [4, 8, 12, "dense"] * 11
  assert timing.times == {4: 1.0, 8: 0.51, 12: 0.50}
  assert (timing.requested, timing.rank, timing.dense) == (4, 8, False)
  # With no tolerance only the fastest candidate qualifies.
  assert _measure(tolerance=0.0).rank == 12
  # The requested rank itself when it is as fast as any.
  _stub_times(monkeypatch, {4: 0.5, 8: 0.5, 12: 0.6}, dense_time=0.9)
  assert _measure().rank == 4


def test_recommends_dense_when_the_kernel_is_not_slower(monkeypatch):
  _stub_times(monkeypatch, {4: 0.8, 8: 0.6, 12: 0.7}, dense_time=0.3)
  timing = _measure(tolerance=0.05)
  assert (timing.rank, timing.dense, timing.dense_time) == (8, True, 0.3)
  _stub_times(monkeypatch, {4: 0.8, 8: 0.6, 12: 0.7}, dense_time=0.6)
  assert _measure(tolerance=0.05).dense  # a tie goes to the dense kernel
  _stub_times(monkeypatch, {4: 0.8, 8: 0.6, 12: 0.7}, dense_time=0.61)
  assert not _measure(tolerance=0.05).dense
