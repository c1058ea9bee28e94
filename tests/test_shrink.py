"""Tests for progressive shrinking of params and optimizer state (maestro_jax/_src/shrink.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest

import maestro_jax as mj


def _randn(seed, shape, scale=0.5):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _params():
  return {
      "fc1": {"a": _randn(0, (6, 5)), "b": _randn(1, (5, 5)), "bias": _randn(2, (5,))},
      "conv": {"a": _randn(3, (2, 2, 2, 6)), "b": _randn(4, (6, 7)), "bias": _randn(5, (7,))},
      "head": {"w": _randn(6, (7, 3))},  # not factorized
  }


def _scaled_layer(scales_a, scales_b, d_in=6, d_out=5):
  """A dense layer whose component k is ``scales_a[k] e_k`` (in A) and ``scales_b[k] e_k`` (in B)."""
  r = len(scales_a)
  a = jnp.zeros((d_in, r)).at[jnp.arange(r), jnp.arange(r)].set(jnp.asarray(scales_a, jnp.float32))
  b = jnp.zeros((r, d_out)).at[jnp.arange(r), jnp.arange(r)].set(jnp.asarray(scales_b, jnp.float32))
  return {"a": a, "b": b}


def _loss(params, x_fc, x_conv, keeps):
  y1 = mj.dense(params["fc1"], x_fc, keeps["fc1"])
  y2 = mj.conv(params["conv"], x_conv, keeps["conv"], padding="VALID")
  return jnp.mean(jnp.square(y1)) + jnp.mean(jnp.square(y2 @ params["head"]["w"] - 1.0))


X_FC, X_CONV = _randn(10, (4, 6)), _randn(11, (2, 3, 3, 2))
FULL = {"fc1": jnp.int32(5), "conv": jnp.int32(6)}
_grad = jax.jit(jax.grad(_loss))


def _trained_state(optimizer, steps=2):
  params = _params()
  state = optimizer.init(params)
  for _ in range(steps):
    grads = _grad(params, X_FC, X_CONV, FULL)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# ------------------------------------------------------------------------------ ranks_from_importance


def test_ranks_from_importance_counts_prefix():
  # importance s_b = ||A[:, b:]|| ||B[b:]||: about 1, 1e-2, 1e-8, 1e-12 for these scales.
  layer = _scaled_layer([1.0, 0.1, 1e-4, 1e-6], [1.0, 0.1, 1e-4, 1e-6])
  params = {"fc": layer, "other": {"a": _randn(0, (3, 2)), "b": _randn(1, (2, 4))}}
  s = np.asarray(mj.importance(params)["fc"])
  for threshold in [0.0, 1e-13, 1e-10, 1e-5, 1e-3, 0.5, 10.0]:
    ranks = mj.ranks_from_importance(params, threshold)
    assert ranks["fc"] == int(np.sum(s >= threshold)), threshold
    assert set(ranks) == {"fc", "other"}
  assert mj.ranks_from_importance(params, 1e-5)["fc"] == 2
  assert mj.ranks_from_importance(params, 1e-9)["fc"] == 3
  assert mj.ranks_from_importance(params, 0.0) == {"fc": 4, "other": 2}
  with pytest.raises(ValueError, match="threshold"):
    mj.ranks_from_importance(params, -1.0)


def test_ranks_from_importance_never_grows():
  layer = _scaled_layer([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
  params = {"fc": layer}
  assert mj.ranks_from_importance(params, 1e-5) == {"fc": 4}
  # The current rank is 2: components past it are ignored and the rank does not grow.
  assert mj.ranks_from_importance(params, 1e-5, {"fc": 2}) == {"fc": 2}
  assert mj.ranks_from_importance(params, 0.0, {"fc": 3}) == {"fc": 3}
  # The threshold can still cut below the current rank.
  small = {"fc": _scaled_layer([1.0, 1e-6, 1.0, 1.0], [1.0, 1e-6, 1.0, 1.0])}
  # s_1 includes components 2, 3, so the prefix is still 4 without ranks, but 1 with rank 2.
  assert mj.ranks_from_importance(small, 1e-5) == {"fc": 4}
  assert mj.ranks_from_importance(small, 1e-5, {"fc": 2}) == {"fc": 1}


# ----------------------------------------------------------------------------------------- shrink


def test_shrink_slices_params():
  params = _params()
  new, state, caps = mj.shrink(params, {"fc1": 3})
  assert state is None
  assert caps == {"fc1": 3, "conv": 6}
  assert new["fc1"]["a"].shape == (6, 3) and new["fc1"]["b"].shape == (3, 5)
  np.testing.assert_array_equal(np.asarray(new["fc1"]["a"]), np.asarray(params["fc1"]["a"][:, :3]))
  np.testing.assert_array_equal(np.asarray(new["fc1"]["b"]), np.asarray(params["fc1"]["b"][:3]))
  np.testing.assert_array_equal(np.asarray(new["fc1"]["bias"]), np.asarray(params["fc1"]["bias"]))
  # Layers not named and non-factorized params are untouched.
  for path in [("conv", "a"), ("conv", "b"), ("conv", "bias"), ("head", "w")]:
    np.testing.assert_array_equal(np.asarray(new[path[0]][path[1]]), np.asarray(params[path[0]][path[1]]))
  assert mj.capacities(new) == {"fc1": 3, "conv": 6}
  # The shrunk layer computes the old one's truncation.
  np.testing.assert_allclose(np.asarray(mj.dense(new["fc1"], X_FC)), np.asarray(mj.dense(params["fc1"], X_FC, 3)),
                             atol=1e-6)
  # Conv factors: rank axis is the last of A.
  new, _, caps = mj.shrink(params, {"conv": 2, "fc1": 5})
  assert new["conv"]["a"].shape == (2, 2, 2, 2) and new["conv"]["b"].shape == (2, 7)
  np.testing.assert_array_equal(np.asarray(new["conv"]["a"]), np.asarray(params["conv"]["a"][..., :2]))


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_shrink_slices_optimizer_state(opt_name):
  optimizer = optax.sgd(0.1, momentum=0.9) if opt_name == "sgd_momentum" else optax.adam(1e-3)
  moments = ["trace"] if opt_name == "sgd_momentum" else ["mu", "nu"]
  params, state = _trained_state(optimizer)
  ranks = {"fc1": 2, "conv": 4}
  new_params, new_state, caps = mj.shrink(params, ranks, opt_state=state, optimizer=optimizer)
  assert caps == ranks
  for moment in moments:
    old, new = otu.tree_get(state, moment), otu.tree_get(new_state, moment)
    # The states were really updated (non-zero), so slicing is observable.
    assert float(jnp.abs(old["fc1"]["a"]).min()) > 0 and float(jnp.abs(old["conv"]["b"]).min()) > 0
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, new_params)
    np.testing.assert_array_equal(np.asarray(new["fc1"]["a"]), np.asarray(old["fc1"]["a"][:, :2]))
    np.testing.assert_array_equal(np.asarray(new["fc1"]["b"]), np.asarray(old["fc1"]["b"][:2]))
    np.testing.assert_array_equal(np.asarray(new["conv"]["a"]), np.asarray(old["conv"]["a"][..., :4]))
    np.testing.assert_array_equal(np.asarray(new["conv"]["b"]), np.asarray(old["conv"]["b"][:4]))
    np.testing.assert_array_equal(np.asarray(new["head"]["w"]), np.asarray(old["head"]["w"]))
    np.testing.assert_array_equal(np.asarray(new["fc1"]["bias"]), np.asarray(old["fc1"]["bias"]))
  if opt_name == "adam":
    assert int(otu.tree_get(new_state, "count")) == int(otu.tree_get(state, "count")) == 2
  # The optimizer keeps working on the shrunk tree.
  grads = _grad(new_params, X_FC, X_CONV, {"fc1": jnp.int32(2), "conv": jnp.int32(4)})
  updates, _ = optimizer.update(grads, new_state, new_params)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, new_params)


def test_quantum_rounds_capacity_and_zeroes_the_gap():
  assert mj.round_up_rank(3, 4, 6) == 4 and mj.round_up_rank(5, 4, 6) == 6 and mj.round_up_rank(0, 4, 6) == 0
  assert mj.round_up_rank(8, 8, 100) == 8 and mj.round_up_rank(9, 8, 100) == 16
  with pytest.raises(ValueError, match="quantum"):
    mj.round_up_rank(3, 0, 6)
  optimizer = optax.adam(1e-2)
  params, state = _trained_state(optimizer)
  ranks = {"fc1": 3, "conv": 1}
  assert mj.new_capacities(params, ranks, quantum=4) == {"fc1": 4, "conv": 4}
  new_params, new_state, caps = mj.shrink(params, ranks, quantum=4, opt_state=state, optimizer=optimizer)
  assert caps == {"fc1": 4, "conv": 4}
  trees = [(params, new_params)] + [(otu.tree_get(state, m), otu.tree_get(new_state, m)) for m in ("mu", "nu")]
  for old, new in trees:
    for name, rank in ranks.items():
      a, b = np.asarray(new[name]["a"]), np.asarray(new[name]["b"])
      assert a.shape[-1] == 4 and b.shape[0] == 4
      # Live components are the old prefix, the gap up to the capacity is zero.
      np.testing.assert_array_equal(a[..., :rank], np.asarray(old[name]["a"][..., :rank]))
      np.testing.assert_array_equal(b[:rank], np.asarray(old[name]["b"][:rank]))
      assert np.all(a[..., rank:] == 0.0) and np.all(b[rank:] == 0.0)
  # Masked at the rank, the shrunk layer computes the old truncation.
  np.testing.assert_allclose(np.asarray(mj.dense(new_params["fc1"], X_FC, jnp.int32(4))),
                             np.asarray(mj.dense(params["fc1"], X_FC, 3)), atol=1e-6)
  # quantum larger than the capacity: capped at the capacity.
  assert mj.new_capacities(params, {"fc1": 1}, quantum=128) == {"fc1": 5, "conv": 6}


def test_jitted_step_recompiles_once_after_shrink():
  optimizer = optax.sgd(0.01, momentum=0.9)
  params = _params()
  state = optimizer.init(params)
  traces = [0]

  @jax.jit
  def step(params, state, keeps):
    traces[0] += 1
    loss, grads = jax.value_and_grad(_loss)(params, X_FC, X_CONV, keeps)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  sampler = mj.samplers.single_layer()
  key = jax.random.key(0)
  ranks = mj.capacities(params)
  for _ in range(3):
    key, sub = jax.random.split(key)
    params, state, loss = step(params, state, sampler(sub, ranks))
  assert traces[0] == 1
  params, state, caps = mj.shrink(params, {"fc1": 3, "conv": 3}, quantum=2, opt_state=state, optimizer=optimizer)
  assert caps == {"fc1": 4, "conv": 4}
  ranks = {"fc1": 3, "conv": 3}
  at_rank = {k: jnp.int32(v) for k, v in ranks.items()}
  before = float(_loss(params, X_FC, X_CONV, at_rank))
  for _ in range(4):
    key, sub = jax.random.split(key)
    params, state, loss = step(params, state, sampler(sub, ranks))
    assert np.isfinite(float(loss))
    assert traces[0] == 2
  # Training goes on after the shrink (the loss at the new ranks went down).
  after = float(_loss(params, X_FC, X_CONV, at_rank))
  assert after < before, (before, after)
  assert mj.capacities(params) == caps


def test_errors():
  params = _params()
  with pytest.raises(ValueError, match=r"layer 'fc1': rank 6 is out of range.*capacity 5"):
    mj.shrink(params, {"fc1": 6})
  with pytest.raises(ValueError, match=r"layer 'conv': rank -1 is out of range"):
    mj.shrink(params, {"conv": -1})
  with pytest.raises(ValueError, match=r"unknown layers in ranks \['fc9'\].*\['conv', 'fc1'\]"):
    mj.shrink(params, {"fc9": 2})
  optimizer = optax.adam(1e-3)
  with pytest.raises(ValueError, match="needs the optimizer"):
    mj.shrink(params, {"fc1": 2}, opt_state=optimizer.init(params))


def test_min_saving_waits_until_the_cuts_add_up():
  params = _params()
  assert mj.capacities(params) == {"fc1": 5, "conv": 6}
  small_cut = {"fc1": 4}
  # One component of fc1 is well under half of the factor parameters: the shapes stay, the component is zeroed.
  assert mj.new_capacities(params, small_cut, min_saving=0.5) == {"fc1": 5, "conv": 6}
  kept, _, caps = mj.shrink(params, small_cut, min_saving=0.5)
  assert caps == {"fc1": 5, "conv": 6}
  np.testing.assert_array_equal(np.asarray(kept["fc1"]["a"][:, :4]), np.asarray(params["fc1"]["a"][:, :4]))
  assert np.all(np.asarray(kept["fc1"]["a"][:, 4:]) == 0.0) and np.all(np.asarray(kept["fc1"]["b"][4:]) == 0.0)
  # Without the threshold, or once enough is freed, the capacities are cut.
  assert mj.new_capacities(params, small_cut) == {"fc1": 4, "conv": 6}
  assert mj.new_capacities(params, {"fc1": 1, "conv": 1}, min_saving=0.5) == {"fc1": 1, "conv": 1}
  # 1: never cut, however much is freed.
  assert mj.new_capacities(params, {"fc1": 1, "conv": 1}, min_saving=1.0) == {"fc1": 5, "conv": 6}
  with pytest.raises(ValueError, match="min_saving"):
    mj.new_capacities(params, small_cut, min_saving=1.5)


def test_min_saving_weighs_components_by_the_costs_given():
  params = _params()
  # d_in + d_out per component times the capacity: fc1 5 * (6 + 5), conv 6 * (8 + 7); 145 factor parameters.
  cut_fc1 = {"fc1": 1}  # frees 4 of fc1's components: 44 of the 145 parameters, 30%
  assert mj.new_capacities(params, cut_fc1, min_saving=0.25) == {"fc1": 1, "conv": 6}
  # Weighed by multiply-adds per example (the conv maps 16 positions, fc1 one), the same cut frees 44 of 1495.
  macs = {"fc1": 1 * (6 + 5), "conv": 16 * (8 + 7)}
  assert mj.new_capacities(params, cut_fc1, min_saving=0.25, component_costs=macs) == {"fc1": 5, "conv": 6}
  _, _, caps = mj.shrink(params, cut_fc1, min_saving=0.25, component_costs=macs)
  assert caps == {"fc1": 5, "conv": 6}
  # A conv cut of the same share of its components frees most of the multiply-adds.
  assert mj.new_capacities(params, {"conv": 2}, min_saving=0.25, component_costs=macs) == {"fc1": 5, "conv": 2}
  with pytest.raises(ValueError, match=r"component_costs has no cost for layers \['conv'\]"):
    mj.new_capacities(params, cut_fc1, min_saving=0.25, component_costs={"fc1": 1.0})
