"""The paper's linear experiments: ordered dropout recovers SVD / PCA order (docs/design.md).

Every run uses plain SGD on a single factorized dense layer with random (not SVD) init,
keep counts drawn per step by ``single_layer`` from a PRNG key, and the whole run as one
``jax.lax.scan`` inside one ``jax.jit``. The loss is the plain mean squared error over all
entries (``jnp.mean``), which keeps SGD with lr 0.5 stable for these problem sizes.

Tolerances: each bound was set from the value measured on this code (2-core CPU, float32;
the runs are deterministic given their seeds) with a margin of about 3-5x, and the measured
value is written beside it, so a regression of a few times shows. Lower bounds (the
contrasts: "is not ordered", "differs") sit at 1/2 to 1/3 of the measured value.
"""

import jax
import jax.numpy as jnp
import numpy as np

import maestro_jax as mj

LR = 0.5
STEPS = 6000


def _train(params, x, y, *, steps=STEPS, lr=LR, sampler=None, seed=0, lasso=0.0):
  """Full-batch SGD on ``mean((dense(params, x, keep) - y)^2) + lasso * R_HGL`` with keep counts drawn by ``sampler``."""
  sampler = sampler or mj.samplers.single_layer()
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  ranks = {"fc": mj.capacity(params)}

  def loss(p, keep):
    return jnp.mean(jnp.square(mj.dense(p, x, keep) - y)) + lasso * mj.layer_group_lasso(p)

  @jax.jit
  def run(params, key):
    def step(params, key):
      keep = sampler(key, ranks)["fc"]
      grads = jax.grad(loss)(params, keep)
      return jax.tree.map(lambda p, g: p - lr * g, params, grads), None

    params, _ = jax.lax.scan(step, params, jax.random.split(key, steps))
    return params

  params = run(params, jax.random.key(seed))
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _truncated(m, k):
  p, s, qt = np.linalg.svd(m, full_matrices=False)
  return (p[:, :k] * s[:k]) @ qt[:k]


def _prefix(params, k):
  return params["a"][:, :k] @ params["b"][:k]


def _rel(x, ref):
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _max_sin_angle(u, v):
  """Sine of the largest principal angle between the column spans of ``u`` and ``v`` (same dimension)."""
  qu, _ = np.linalg.qr(u)
  qv, _ = np.linalg.qr(v)
  return float(np.linalg.norm(qu - qv @ (qv.T @ qu), 2))


# ------------------------------------------------------------------------------- (a) SVD recovery


def _svd_problem():
  rng = np.random.default_rng(0)
  a_true = rng.standard_normal((9, 3)) @ rng.standard_normal((3, 6))  # rank-3 map R^9 -> R^6
  return a_true, np.eye(9)  # X = I: the targets are the rows of A_true


def test_svd_recovery():
  a_true, x = _svd_problem()
  s_true = np.linalg.svd(a_true, compute_uv=False)
  # Well separated singular values (about 5.41, 4.45, 1.82), so each truncation is well defined.
  assert s_true[0] - s_true[1] > 0.5 and s_true[1] - s_true[2] > 0.5 and s_true[3] < 1e-6
  params = mj.init_layer(jax.random.key(1), (9, 6), init_method="random", use_bias=False)
  assert mj.capacity(params) == 6
  # Random init is far from the truncated SVD.
  init = {k: np.asarray(v, np.float64) for k, v in params.items()}
  assert _rel(_prefix(init, 1), _truncated(a_true, 1)) > 0.5
  params = _train(params, x, a_true, seed=2)

  for k in (1, 2, 3):
    err = _rel(_prefix(params, k), _truncated(a_true, k))
    assert err < 1e-3, (k, err)  # measured 2.5e-4, 1.2e-4, 3.3e-4
  scales = np.linalg.norm(params["a"], axis=0) * np.linalg.norm(params["b"], axis=1)
  # Measured |error| 8.7e-6, 3.1e-4, 7.5e-4 (the paper asks for about 0.1).
  np.testing.assert_allclose(scales[:3], s_true[:3], rtol=0, atol=2.5e-3)
  assert np.all(scales[3:] < 0.07), scales  # spurious components: measured 0.008, 0.018, 0.023
  # The library's component scales are these norms (measured difference 3.5e-7, float32 rounding).
  np.testing.assert_allclose(np.asarray(mj.component_scales(params)), scales, rtol=0, atol=1.5e-6)


def test_svd_recovery_with_group_lasso_finds_the_rank():
  # Without a penalty the spurious components only have a small *product* of norms: their A and
  # B parts stay unbalanced, so the tail importance ||A[:, 3:]|| ||B[3:]|| stays large. A small
  # hierarchical group lasso drives the whole tail to zero, and shrinking finds rank 3.
  a_true, x = _svd_problem()
  s_true = np.linalg.svd(a_true, compute_uv=False)
  params = mj.init_layer(jax.random.key(1), (9, 6), init_method="random", use_bias=False)
  params = _train(params, x, a_true, seed=2, lasso=1e-3)
  scales = np.asarray(mj.component_scales(params))
  # The penalty shrinks them slightly (measured 0.008, 0.022, 0.071 below the true values): a
  # systematic bias, not noise, so the bounds sit 1.4-4x above it.
  assert np.all(scales[:3] < s_true[:3]), (scales, s_true)
  assert np.all(s_true[:3] - scales[:3] < [0.03, 0.07, 0.1]), (scales, s_true)
  s = np.asarray(mj.layer_importance(params))
  assert s[2] > 1.0 and np.all(s[3:] < 3e-6), s  # measured s_2 = 1.75 and a tail of 5.5e-7
  assert mj.ranks_from_importance({"fc": params}, 1e-3) == {"fc": 3}


def test_without_ordered_dropout_components_are_not_ordered():
  # Contrast: plain factorized training (keep all) fits A_true but its first component is no
  # longer the top singular component.
  a_true, x = _svd_problem()
  params = mj.init_layer(jax.random.key(1), (9, 6), init_method="random", use_bias=False)
  params = _train(params, x, a_true, sampler=mj.samplers.none(), steps=2000, seed=2)
  assert _rel(_prefix(params, 6), a_true) < 3e-6  # measured 6.7e-7
  assert _rel(_prefix(params, 1), _truncated(a_true, 1)) > 0.3  # measured 0.85


# ------------------------------------------------------------------------------------------ (b) PCA


def _pca_problem():
  rng = np.random.default_rng(3)
  d, n = 8, 1000
  spectrum = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.12, 0.06, 0.03])  # clearly decaying
  basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
  data = (rng.standard_normal((n, d)) * np.sqrt(spectrum).reshape(1, -1)) @ basis.T
  data = data - data.mean(axis=0, keepdims=True)
  eigval, eigvec = np.linalg.eigh(data.T @ data / n)
  return data, eigval[::-1], eigvec[:, ::-1]


def test_pca_every_prefix_spans_top_principal_subspace():
  data, eigval, eigvec = _pca_problem()
  assert np.all(eigval[:4] / eigval[1:5] > 1.5)  # sample spectrum keeps clear gaps
  # Untied linear autoencoder 8 -> 4 -> 8: encoder A (8, 4), decoder B (4, 8).
  params = mj.init_layer(jax.random.key(4), (8, 8), rank=4, init_method="random", use_bias=False)
  params = _train(params, data, data, seed=5)
  # Measured: sines and projection errors about 2e-6 for k = 1..3; for k = 4 (whose component
  # has the smallest gradient signal) encoder 6.1e-4, decoder 4.1e-5, projection 6.1e-4.
  tolerance = {1: 1e-5, 2: 1e-5, 3: 1e-5, 4: 2e-3}
  for k in (1, 2, 3, 4):
    top = eigvec[:, :k]
    enc = _max_sin_angle(params["a"][:, :k], top)
    dec = _max_sin_angle(params["b"][:k].T, top)
    assert enc < tolerance[k] and dec < tolerance[k], (k, enc, dec)
    # The prefix map is the orthogonal projection onto the top-k principal subspace.
    proj = np.linalg.norm(_prefix(params, k) - top @ top.T, 2)
    assert proj < tolerance[k], (k, proj)


def test_pca_without_ordered_dropout_only_the_full_span_is_principal():
  data, _, eigvec = _pca_problem()
  params = mj.init_layer(jax.random.key(4), (8, 8), rank=4, init_method="random", use_bias=False)
  params = _train(params, data, data, sampler=mj.samplers.none(), steps=3000, seed=5)
  assert _max_sin_angle(params["b"][:4].T, eigvec[:, :4]) < 4e-6  # measured 7.8e-7
  assert max(_max_sin_angle(params["b"][:k].T, eigvec[:, :k]) for k in (1, 2, 3)) > 0.3  # measured 0.90


# --------------------------------------------------------------------------- (c) non-isotropic inputs


def test_order_follows_data_weighted_importance():
  # A_true = sum_k sigma_k e_k v_k^T with plain singular values 3, 2, 1 along input axes 0, 1, 2.
  # Inputs have diagonal covariance with variances 0.16, 1, 2.25 (and 1 on an unused axis), so the
  # data-weighted singular values (of Sigma^1/2 A_true) are 0.4*3 = 1.2, 1*2 = 2, 1.5*1 = 1.5:
  # the data-weighted order is (axis 1, axis 2, axis 0), the plain order (axis 0, axis 1, axis 2).
  rng = np.random.default_rng(6)
  v, _ = np.linalg.qr(rng.standard_normal((3, 3)))
  a_true = np.zeros((4, 3))
  a_true[:3] = np.diag([3.0, 2.0, 1.0]) @ v.T
  variances = np.array([0.16, 1.0, 2.25, 1.0])
  root = np.diag(np.sqrt(variances))
  x = root  # rows sqrt(var_i) e_i: a non-identity diagonal input covariance
  weighted_sv = np.linalg.svd(root @ a_true, compute_uv=False)
  np.testing.assert_allclose(weighted_sv, [2.0, 1.5, 1.2], atol=1e-9)

  params = mj.init_layer(jax.random.key(7), (4, 3), init_method="random", use_bias=False)
  params = _train(params, x, x @ a_true, seed=8)

  for k in (1, 2, 3):
    weighted = np.linalg.inv(root) @ _truncated(root @ a_true, k)  # the optimum under this data
    plain = _truncated(a_true, k)
    assert _rel(_prefix(params, k), weighted) < 1e-3, k  # measured 3.6e-7, 3.3e-4, 2.9e-5
    if k < 3:
      assert _rel(weighted, plain) > 0.5  # the two orders really differ here ...
      assert _rel(_prefix(params, k), plain) > 0.5  # ... and the learned one is not the plain one
  a, b = params["a"], params["b"]
  data_scales = np.linalg.norm(root @ a, axis=0) * np.linalg.norm(b, axis=1)
  plain_scales = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=1)
  # Measured errors of both below 4.4e-7 (float32 rounding of values near 2).
  np.testing.assert_allclose(data_scales, [2.0, 1.5, 1.2], rtol=0, atol=2e-6)  # ordered by data-weighted importance
  np.testing.assert_allclose(plain_scales, [2.0, 1.0, 3.0], rtol=0, atol=2e-6)  # not by plain singular value
  # Component k lives on input axis 1, 2, 0 in turn.
  assert list(np.argmax(np.abs(a[:3]), axis=0)) == [1, 2, 0]
