"""The shared rules: fraction_to_rank pinned on a table and every consumer agreeing with it; the merge rule; kinds."""

import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax as mj
from maestro_jax import linen as mln
from maestro_jax import nnx as mnx
from maestro_jax import sweep

# A fine grid of fractions (every 0.0025, plus ones that float rounding gets wrong: 0.07 * 100 = 7.000000000000001).
FRACTIONS = sorted({round(i * 0.0025, 4) for i in range(1, 401)} | {0.07, 0.29, 0.57, 0.58, 1 / 3, 2 / 3, 0.1})
SIZES = np.arange(0, 601)


def reference(p: float, n: int) -> int:
  """ceil(q * n) for q the closest ratio to p with a denominator up to 10,000; at least 1, at most n."""
  if n == 0:
    return 0
  q = Fraction(p).limit_denominator(10_000)
  return min(n, max(1, math.ceil(q * n)))


@pytest.fixture(scope="module")
def table():
  return {p: np.asarray([reference(p, int(n)) for n in SIZES]) for p in FRACTIONS}


def test_fraction_to_rank_python_matches_table(table):
  for p, expected in table.items():
    got = np.asarray([mj.fraction_to_rank(p, int(n)) for n in SIZES])
    np.testing.assert_array_equal(got, expected, err_msg=f"p={p}")
  assert mj.fraction_to_rank(0.07, 100) == 7  # not 8 through float rounding
  assert mj.fraction_to_rank(1 / 3, 3) == 1 and mj.fraction_to_rank(2 / 3, 3) == 2


def test_fraction_to_rank_traced_matches_table(table):
  ranks = jnp.asarray(SIZES, jnp.int32)
  static_p = jax.jit(jax.vmap(lambda n, p: mj.fraction_to_rank(p, n), in_axes=(0, None)), static_argnums=1)
  for p in FRACTIONS[::25] + [1 / 3, 2 / 3, 0.07]:  # one compilation each: a sample of the grid
    np.testing.assert_array_equal(np.asarray(static_p(ranks, p)), table[p], err_msg=f"static p={p}")
  # A traced fraction is read to 4 decimals, so it agrees on that grid (one compilation for all).
  grid = [p for p in FRACTIONS if round(p, 4) == p]
  traced_p = jax.jit(jax.vmap(jax.vmap(lambda n, p: mj.fraction_to_rank(p, n), in_axes=(0, None)), in_axes=(None, 0)))
  got = np.asarray(traced_p(ranks, jnp.asarray(grid, jnp.float32)))
  np.testing.assert_array_equal(got, np.stack([table[p] for p in grid]))


def test_fraction_to_rank_large_counts_do_not_overflow():
  n = jnp.int32(2_000_000)
  assert int(jax.jit(mj.fraction_to_rank, static_argnums=0)(0.9999, n)) == math.ceil(0.9999 * 2_000_000)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_fraction_to_rank_rejects_bad_fractions(bad):
  with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
    mj.fraction_to_rank(bad, 10)


def test_samplers_and_sweep_agree_with_the_rule(table):
  ranks = {f"l{n}": int(n) for n in SIZES[1::7]}
  for p in FRACTIONS[::9] + [1 / 3, 2 / 3]:
    fixed = mj.samplers.fixed_fraction(p)(jax.random.key(0), ranks)  # eager: one compile per p would cost a minute
    shared = mj.samplers.shared_fraction((p,))(jax.random.key(0), ranks)
    grid = sweep.fraction_grid(ranks, [p])
    for name, n in ranks.items():
      expected = table[p][n]
      assert int(fixed[name]) == expected and int(shared[name]) == expected, (p, n)
      assert int(grid[name][0]) == expected, (p, n)
    budget = sweep.global_budget(_two_layers(), None, [p])
    assert sum(int(v[0]) for v in budget.values()) == mj.fraction_to_rank(p, 7)


def _two_layers():
  return {"x": mj.init_layer(jax.random.key(0), (4, 6), use_bias=False),
          "y": mj.init_layer(jax.random.key(1), (3, 5), use_bias=False)}


def test_decomposable_global_budget_uses_the_rule():
  # Two layers of 4 and 3 components: the global keep total is fraction_to_rank(p, 7).
  params = _two_layers()
  for p in (0.07, 0.29, 0.5, 1 / 3, 2 / 3, 1.0):
    keeps = mj.global_budget_keeps(params, p)
    assert sum(int(v) for v in keeps.values()) == mj.fraction_to_rank(p, 7)


class _Plain(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(100, 100, rngs=rngs)
    self.conv = nnx.Conv(3, 40, (3, 3), rngs=rngs)


def test_converters_agree_with_the_rule():
  """nnx.factorize (the runner's init_from), linen.factorize_params and factorize_dense_params."""
  for p in (0.07, 0.29, 0.57, 1 / 3):
    model = mnx.factorize(_Plain(nnx.Rngs(0)), rank_fraction=p)
    expected = {"fc": mj.fraction_to_rank(p, 100), "conv": mj.fraction_to_rank(p, 27)}
    assert mnx.capacities(model) == expected
    dense = nnx.to_pure_dict(nnx.state(_Plain(nnx.Rngs(0)), nnx.Param))
    assert mj.capacities(mj.factorize_dense_params(dense, p)) == expected
    assert mj.capacities(mj.truncate_dense_params(dense, p)) == expected
    linen_params = {"Dense_0": {"kernel": jnp.ones((100, 100)), "bias": jnp.zeros(100)}}
    assert mj.capacities(mln.factorize_params(linen_params, rank_fraction=p)) == {"Dense_0": expected["fc"]}


def test_merge_rule():
  assert mj.should_merge(10, 10, 5) and not mj.should_merge(10, 10, 4)
  for d_in, d_out in [(10, 10), (120, 84), (400, 120), (27, 6)]:
    boundary = d_in * d_out // (d_in + d_out)
    for r in range(max(boundary - 2, 0), boundary + 3):
      assert mj.should_merge(d_in, d_out, r) == ((d_in + d_out) * r >= d_in * d_out)


def test_kinds_table():
  dense = mj.init_layer(jax.random.key(0), (6, 4))
  conv = mj.init_layer(jax.random.key(0), (3, 3, 2, 5))
  assert mj.kind_of(dense).name == "dense" and mj.kind_of(conv).name == "conv"
  assert mj.kind_of(mj.merge_layer(conv)).name == "conv"
  assert mj.matrix_dims(dense) == (6, 4) and mj.matrix_dims(conv) == (18, 5)
  assert mj.KINDS["conv"].apply is mj.conv and mj.KINDS["dense"].apply is mj.dense
  with pytest.raises(ValueError, match="layer 'odd': no layer kind has 3-D"):
    mj.kind_of({"kernel": jnp.ones((2, 3, 4))}, "odd")


def test_linen_dense_layer_count_matches_nn_dense():
  """A converted Linen model keeps nn.Dense's parameter names (the rule's consumers key on them)."""
  variables = nn.Dense(5).init(jax.random.key(0), jnp.ones((1, 7)))
  converted = mln.factorize_params(variables["params"])
  assert set(converted) == {"a", "b", "bias"}
