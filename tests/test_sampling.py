"""Tests for the keep-count samplers (maestro_jax/_src/sampling.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maestro_jax as mj

N_DRAWS = 20_000
RANKS = {"conv": 2, "fc": {"0": 5, "1": 3}}  # nested on purpose: the output mirrors the tree
FLAT = {"conv": 2, "fc.0": 5, "fc.1": 3}


def _draw(sampler, ranks, n=N_DRAWS, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  out = jax.jit(jax.vmap(lambda k: sampler(k, ranks)))(keys)
  return out


def _flat(out):
  return {"conv": np.asarray(out["conv"]), "fc.0": np.asarray(out["fc"]["0"]), "fc.1": np.asarray(out["fc"]["1"])}


ALL = {
    "single_layer": mj.samplers.single_layer(),
    "independent": mj.samplers.independent(),
    "independent_min_fraction": mj.samplers.independent(min_fraction=0.5),
    "shared_fraction": mj.samplers.shared_fraction(),
    "fixed_fraction": mj.samplers.fixed_fraction(0.5),
    "none": mj.samplers.none(),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_jittable_same_structure_in_range(name):
  sampler = ALL[name]
  out = jax.jit(sampler)(jax.random.key(1), RANKS)
  assert jax.tree.structure(out) == jax.tree.structure(RANKS)
  for keep, rank in zip(jax.tree.leaves(out), jax.tree.leaves(RANKS)):
    assert keep.shape == () and keep.dtype == jnp.int32
    assert 1 <= int(keep) <= rank
  # Many draws: always within [1, r].
  draws = _flat(_draw(sampler, RANKS, n=2000))
  for layer, rank in FLAT.items():
    assert draws[layer].min() >= 1 and draws[layer].max() <= rank, layer


@pytest.mark.parametrize("name", sorted(ALL))
def test_traced_ranks_and_list_trees(name):
  sampler = ALL[name]
  count = [0]

  @jax.jit
  def sample(key, ranks):
    count[0] += 1
    return sampler(key, ranks)

  for i, ranks in enumerate([[4, 6], [2, 6], [1, 1]]):
    traced = [jnp.int32(r) for r in ranks]
    out = sample(jax.random.key(i), traced)
    assert isinstance(out, list) and len(out) == 2
    for keep, rank in zip(out, ranks):
      assert 1 <= int(keep) <= rank
  # Changing the ranks (values, not shapes) does not retrace.
  assert count[0] == 1


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_rank_layers_keep_zero(name):
  sampler = ALL[name]
  ranks = {"dead": 0, "live": 4}
  draws = _draw(sampler, ranks, n=500)
  assert np.all(np.asarray(draws["dead"]) == 0)
  live = np.asarray(draws["live"])
  assert live.min() >= 1 and live.max() <= 4
  out = sampler(jax.random.key(0), {"a": 0, "b": 0})
  assert int(out["a"]) == 0 and int(out["b"]) == 0


def test_single_layer_distribution():
  draws = _flat(_draw(mj.samplers.single_layer(), RANKS))
  total = sum(FLAT.values())  # 10 pairs (l, b)
  below = {layer: draws[layer] < rank for layer, rank in FLAT.items()}
  # Only one layer is below full rank in any draw.
  n_below = sum(b.astype(int) for b in below.values())
  assert n_below.max() == 1
  # Each pair (l, b) with b < r_l has probability 1/sum(r).
  for layer, rank in FLAT.items():
    for b in range(1, rank):
      freq = float(np.mean(draws[layer] == b))
      assert abs(freq - 1 / total) < 0.01, (layer, b, freq)
    # Layer l is below full rank with probability (r_l - 1) / sum(r): layer l is picked with
    # probability r_l / sum(r) and then draws b = r_l with probability 1 / r_l.
    assert abs(float(np.mean(below[layer])) - (rank - 1) / total) < 0.015, layer
    # Given that layer l is the one reduced, b is uniform over 1..r_l-1.
    if rank > 2:
      picked = draws[layer][below[layer]]
      for b in range(1, rank):
        assert abs(float(np.mean(picked == b)) - 1 / (rank - 1)) < 0.03, (layer, b)
  # Every layer at full rank: the pairs (l, r_l) for each of the 3 layers.
  assert abs(float(np.mean(n_below == 0)) - len(FLAT) / total) < 0.015


def test_single_layer_layer_probability_proportional_to_rank():
  # With ranks 1 and 4 the b = r_l events are easy to tell apart: layer 'big' is reduced
  # with probability 3/5, and the pair ('big', 4) and ('small', 1) both look "full rank".
  draws = _draw(mj.samplers.single_layer(), {"small": 1, "big": 4})
  big = np.asarray(draws["big"])
  assert np.all(np.asarray(draws["small"]) == 1)
  for b in (1, 2, 3):
    assert abs(float(np.mean(big == b)) - 0.2) < 0.015
  assert abs(float(np.mean(big == 4)) - 0.4) < 0.015


def test_independent_uniform_per_layer():
  draws = _flat(_draw(mj.samplers.independent(), RANKS))
  for layer, rank in FLAT.items():
    counts = np.bincount(draws[layer], minlength=rank + 1)
    assert counts[0] == 0
    freqs = counts[1:] / N_DRAWS
    np.testing.assert_allclose(freqs, 1 / rank, atol=0.015, err_msg=layer)
  # Independent across layers: the joint frequency factorizes.
  joint = float(np.mean((draws["fc.0"] == 1) & (draws["fc.1"] == 1)))
  assert abs(joint - 1 / 15) < 0.01
  # Not a shared draw: layers of equal rank differ in some draws.
  pair = _draw(mj.samplers.independent(), [6, 6], n=200)
  assert np.any(np.asarray(pair[0]) != np.asarray(pair[1]))


def test_independent_min_fraction_uniform_from_the_floor():
  # ranks 2, 5, 3 at 0.5: floors ceil(1.0) = 1, ceil(2.5) = 3, ceil(1.5) = 2; uniform from the floor to the rank.
  draws = _flat(_draw(mj.samplers.independent(min_fraction=0.5), RANKS))
  for layer, floor in {"conv": 1, "fc.0": 3, "fc.1": 2}.items():
    rank = FLAT[layer]
    counts = np.bincount(draws[layer], minlength=rank + 1)
    assert counts[:floor].sum() == 0, layer
    np.testing.assert_allclose(counts[floor:] / N_DRAWS, 1 / (rank - floor + 1), atol=0.015, err_msg=layer)
  # At 1.0 the range is the rank itself; a floor of 1 everywhere is the paper's 1..r, draw for draw.
  assert np.all(_flat(_draw(mj.samplers.independent(min_fraction=1.0), RANKS, n=100))["fc.0"] == 5)
  np.testing.assert_array_equal(_flat(_draw(mj.samplers.independent(min_fraction=1e-4), RANKS))["fc.0"],
                                _flat(_draw(mj.samplers.independent(), RANKS))["fc.0"])
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"min_fraction must be in \(0, 1\]"):
      mj.make_sampler("independent", min_fraction=bad)


def test_shared_fraction_one_p_for_all_layers():
  fractions = (0.2, 0.4, 0.6, 0.8, 1.0)
  ranks = {"a": 5, "b": 10, "c": 7, "d": 1}
  draws = {k: np.asarray(v) for k, v in _draw(mj.samplers.shared_fraction(fractions), ranks).items()}
  expected = {p: {k: math.ceil(round(p * r, 6)) for k, r in ranks.items()} for p in fractions}
  # Every draw is ceil(p * r) with the same p in every layer.
  which = np.full(N_DRAWS, -1)
  for i, p in enumerate(fractions):
    match = np.all([draws[k] == expected[p][k] for k in ranks], axis=0)
    which[match] = i
  assert np.all(which >= 0)
  # Each p equally likely ('b' with rank 10 tells every p apart).
  freqs = np.bincount(which, minlength=len(fractions)) / N_DRAWS
  np.testing.assert_allclose(freqs, 1 / len(fractions), atol=0.015)
  # ceil(0.2 * 5) is exactly 1, despite 0.2 not being representable.
  assert expected[0.2] == {"a": 1, "b": 2, "c": 2, "d": 1}


def test_fixed_fraction_deterministic():
  sampler = mj.samplers.fixed_fraction(0.2)
  ranks = {"a": 5, "b": 10, "c": 7, "d": 1, "e": 3}
  outs = [jax.jit(sampler)(jax.random.key(s), ranks) for s in range(5)]
  for out in outs:
    assert {k: int(v) for k, v in out.items()} == {"a": 1, "b": 2, "c": 2, "d": 1, "e": 1}
  # Float rounding of p * r never bumps an exact product up.
  for p, r, want in [(0.6, 5, 3), (0.3, 10, 3), (0.7, 10, 7), (0.1, 30, 3), (0.25, 5, 2), (1.0, 9, 9),
                     (0.5, 3, 2), (0.01, 4, 1)]:
    assert int(mj.samplers.fixed_fraction(p)(jax.random.key(0), {"x": r})["x"]) == want, (p, r)
  # Traced ranks.
  out = jax.jit(sampler)(jax.random.key(0), {"a": jnp.int32(15)})
  assert int(out["a"]) == 3


def test_none_returns_ranks():
  out = jax.jit(mj.samplers.none())(jax.random.key(0), RANKS)
  assert jax.tree.map(int, out) == RANKS
  draws = _flat(_draw(mj.samplers.none(), RANKS, n=100))
  for layer, rank in FLAT.items():
    assert np.all(draws[layer] == rank)


def test_make_sampler():
  assert set(mj.SAMPLERS) == {"single_layer", "independent", "shared_fraction", "fixed_fraction", "none",
                              "decomposable"}
  assert isinstance(mj.make_sampler("decomposable"), mj.ParamSampler)
  s = mj.make_sampler("fixed_fraction", fraction=0.5)
  assert int(s(jax.random.key(0), {"a": 8})["a"]) == 4
  s = mj.make_sampler("shared_fraction", fractions=(0.5,))
  assert int(s(jax.random.key(0), {"a": 8})["a"]) == 4
  s = mj.make_sampler("single_layer")
  assert 1 <= int(s(jax.random.key(0), {"a": 8})["a"]) <= 8
  with pytest.raises(ValueError, match=r"unknown sampler 'bogus'.*decomposable.*fixed_fraction.*independent.*none.*"
                     r"shared_fraction.*single_layer"):
    mj.make_sampler("bogus")


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_bad_fraction(bad):
  with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
    mj.samplers.fixed_fraction(bad)
  with pytest.raises(ValueError, match=r"fractions must be non-empty and in \(0, 1\]"):
    mj.samplers.shared_fraction((0.5, bad))
  with pytest.raises(ValueError, match="fraction"):
    mj.make_sampler("fixed_fraction", fraction=bad)


def test_empty_fractions_and_no_layers():
  with pytest.raises(ValueError, match="non-empty"):
    mj.samplers.shared_fraction(())
  with pytest.raises(ValueError, match="no factorized layers"):
    mj.samplers.single_layer()(jax.random.key(0), {})
