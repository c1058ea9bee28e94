"""Tests for the Maestro train step (maestro_jax/training.py, ``make_train_step``) against hand-written references.

The model is a tiny factorized MLP 4 -> 5 -> 3 (ranks 4 and 3), so every
reference below is a few lines of plain ``jnp``: the forward pass with masks,
the cross-entropies, the hierarchical group lasso and the Frobenius decay. An
optimizer that returns ``-grads`` and keeps the gradients as its state exposes
the exact gradient each step used.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import maestro_jax as mj
from maestro_jax import models
from maestro_jax import training

NAMES = ("layers.0", "layers.1")
RANKS = {"layers.0": 4, "layers.1": 3}
LASSO = 1e-2
TOL = 1e-6


def _tiny():
  """The functional model, its params and a batch of 16 examples of 4 features in 3 classes."""
  model = models.MLP(4, (5,), 3, rngs=nnx.Rngs(0))
  fmodel, params, model_state = training.FunctionalModel.from_module(model)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 16), jnp.int32)}
  return fmodel, params, model_state, batch


def _grad_recorder() -> optax.GradientTransformation:
  """SGD at learning rate 1 whose state is the last gradient, so a step's gradient can be read back exactly."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda grads, state, params=None: (jax.tree.map(jnp.negative, grads), grads))


def _fixed_sampler(keeps):
  """A sampler that always returns ``keeps`` (int32), whatever the key."""
  return lambda key, ranks: {name: jnp.asarray(keeps[name], jnp.int32) for name in ranks}


# ----------------------------------------------------------------------------- hand-written references


def _forward(params, x, keeps):
  """The MLP by hand: per layer ``z = (x @ A) * [k < keep]``, ``y = z @ B + bias``, ReLU between layers."""
  for i, name in enumerate(NAMES):
    layer = params["layers"][i]
    mask = (jnp.arange(layer["a"].shape[-1]) < keeps[name]).astype(jnp.float32)
    x = ((x @ layer["a"]) * mask[None, :]) @ layer["b"] + layer["bias"][None, :]
    if i < len(NAMES) - 1:
      x = jax.nn.relu(x)
  return x


def _cross_entropy(logits, labels):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def _soft_cross_entropy(logits, target):
  return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=1))


def _group_lasso(params):
  """``sum_l sum_b ||A_l[:, b:]||_F + ||B_l[b:, :]||_F`` written as the definition reads."""
  total = 0.0
  for layer in params["layers"].values():
    a, b = layer["a"], layer["b"]
    for k in range(a.shape[-1]):
      total = total + jnp.sqrt(jnp.sum(a[:, k:] ** 2)) + jnp.sqrt(jnp.sum(b[k:] ** 2))
  return total


def _frobenius(params):
  return sum(jnp.sum((layer["a"] @ layer["b"]) ** 2) for layer in params["layers"].values())


def _reference_loss(params, batch, keeps, *, loss, alpha, frobenius_decay, stop_gradient=True, distill_weight=1.0):
  x, y = batch["image"], batch["label"]
  low_logits = _forward(params, x, keeps)
  low = _cross_entropy(low_logits, y)
  if loss == "maestro":
    task = low
  else:
    full_logits = _forward(params, x, RANKS)
    full = _cross_entropy(full_logits, y)
    if loss == "distill":
      target = jax.nn.softmax(full_logits)
      if stop_gradient:
        target = jax.lax.stop_gradient(target)
      task = full + distill_weight * _soft_cross_entropy(low_logits, target)
    else:
      task = (1 - alpha) * full + alpha * low
  return task + LASSO * _group_lasso(params) + frobenius_decay * _frobenius(params), task


def _assert_trees_close(got, want, tol=TOL):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol), got, want)


# ----------------------------------------------------------------------------- keep counts come from the sampler


class _RecordingModel:
  """A functional model that records (on the host) the keep counts of every forward pass it runs."""

  def __init__(self, model):
    self.model, self.seen = model, []

  def __getattr__(self, name):
    return getattr(self.model, name)

  def apply(self, params, model_state, x, keeps=None, **kwargs):
    jax.debug.callback(lambda k: self.seen.append({n: int(v) for n, v in k.items()}), keeps)
    return self.model.apply(params, model_state, x, keeps, **kwargs)


@pytest.mark.parametrize("sampler_name", ["single_layer", "independent", "decomposable"])
def test_train_step_uses_the_sampler_keep_counts(sampler_name):
  fmodel, params, model_state, batch = _tiny()
  recording = _RecordingModel(fmodel)
  sampler = mj.decomposable_sampler() if sampler_name == "decomposable" else mj.make_sampler(sampler_name)
  optimizer = optax.sgd(0.1)
  step = training.make_train_step(recording, optimizer, sampler=sampler, donate=False)
  state = training.init_state(params, model_state, optimizer)
  key = jax.random.key(0)
  expected = []
  for i in range(8):
    step_key = jax.random.fold_in(key, i)
    # What the sampler draws from this key, computed outside the step (with the step's params).
    drawn = sampler(step_key, state["ranks"], state["params"]) if sampler_name == "decomposable" else sampler(
        step_key, state["ranks"])
    expected.append({n: int(v) for n, v in drawn.items()})
    state, metrics = step(state, batch, step_key)
    kept = sum(expected[-1].values()) / sum(RANKS.values())
    assert float(metrics["kept_fraction"]) == pytest.approx(kept, abs=1e-6)
  jax.effects_barrier()
  assert recording.seen == expected
  assert len({tuple(k.values()) for k in expected}) > 2, "keep counts should vary from step to step"
  assert any(k != RANKS for k in expected), "some steps should train a truncated model"


# ----------------------------------------------------------------------------- each loss against its reference


@pytest.mark.parametrize("frobenius_decay", [0.0, 0.05])
@pytest.mark.parametrize("loss", ["maestro", "distill", "decomposable"])
def test_loss_and_gradients_match_the_reference(loss, frobenius_decay):
  fmodel, params, model_state, batch = _tiny()
  keeps = {"layers.0": 2, "layers.1": 1}
  alpha = 0.3  # not 0.5, so swapped weights would show
  distill_weight = 0.4  # not 1, so an ignored weight would show
  optimizer = _grad_recorder()
  step = training.make_train_step(fmodel, optimizer, sampler=_fixed_sampler(keeps), lasso=LASSO, loss=loss,
                                  alpha=alpha, distill_weight=distill_weight, frobenius_decay=frobenius_decay,
                                  donate=False)
  state = training.init_state(params, model_state, optimizer)
  new_state, metrics = step(state, batch, jax.random.key(0))

  reference = lambda p: _reference_loss(p, batch, keeps, loss=loss, alpha=alpha, frobenius_decay=frobenius_decay,
                                        distill_weight=distill_weight)
  (total, task), grads = jax.value_and_grad(reference, has_aux=True)(params)
  assert float(metrics["loss"]) == pytest.approx(float(total), abs=TOL, rel=TOL)
  assert float(metrics["task_loss"]) == pytest.approx(float(task), abs=TOL, rel=TOL)
  assert float(metrics["penalty"]) == pytest.approx(float(_group_lasso(params)), abs=TOL, rel=TOL)
  _assert_trees_close(new_state["opt_state"], grads)
  _assert_trees_close(new_state["params"], jax.tree.map(jnp.subtract, params, grads))
  accuracy = jnp.mean(jnp.argmax(_forward(params, batch["image"], keeps), -1) == batch["label"])
  assert float(metrics["accuracy"]) == float(accuracy)


def test_lasso_schedule_weights_each_step_by_its_count():
  # A schedule of the step: lambda on step 0, zero from step 1; each step's gradient is the fixed-weight one.
  fmodel, params, model_state, batch = _tiny()
  keeps = {"layers.0": 2, "layers.1": 1}
  optimizer = _grad_recorder()
  schedule = optax.piecewise_constant_schedule(LASSO, {1: 0.0})
  scheduled = training.make_train_step(fmodel, optimizer, sampler=_fixed_sampler(keeps), lasso=schedule,
                                       donate=False)
  state = training.init_state(params, model_state, optimizer)
  fixed = lambda weight: training.make_train_step(fmodel, optimizer, sampler=_fixed_sampler(keeps), lasso=weight,
                                                  donate=False)
  gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), fixed(LASSO)(state, batch, jax.random.key(0))[0]
                      ["opt_state"], fixed(0.0)(state, batch, jax.random.key(0))[0]["opt_state"])
  assert max(jax.tree.leaves(gaps)) > 1e-4, "the check needs the lasso's gradient to show"
  for step, weight in enumerate([LASSO, 0.0, 0.0]):
    want, want_metrics = fixed(weight)(state, batch, jax.random.key(0))
    state, metrics = scheduled(state, batch, jax.random.key(0))
    assert int(state["step"]) == step + 1
    _assert_trees_close(state["opt_state"], want["opt_state"])
    assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), abs=TOL)


def test_decoupled_lasso_steps_after_the_optimizer():
  # Decoupled, the step is the optimizer's update of the task's gradient minus lasso * the penalty's gradient.
  fmodel, params, model_state, batch = _tiny()
  keeps = {"layers.0": 2, "layers.1": 1}

  def stepped(optimizer, **kwargs):
    step = training.make_train_step(fmodel, optimizer, sampler=_fixed_sampler(keeps), donate=False, **kwargs)
    return step(training.init_state(params, model_state, optimizer), batch, jax.random.key(0))

  adam = optax.adam(0.1)
  task_only, task_metrics = stepped(adam, lasso=0.0)
  decoupled, metrics = stepped(adam, lasso=LASSO, lasso_decoupled=True)
  want = jax.tree.map(lambda p, g: p - LASSO * g, task_only["params"], jax.grad(_group_lasso)(params))
  _assert_trees_close(decoupled["params"], want)
  assert float(metrics["loss"]) == pytest.approx(float(task_metrics["loss"]) + LASSO * float(_group_lasso(params)),
                                                 abs=TOL)
  coupled, _ = stepped(adam, lasso=LASSO)
  gap = max(float(jnp.max(jnp.abs(c - d))) for c, d in zip(jax.tree.leaves(coupled["params"]),
                                                           jax.tree.leaves(decoupled["params"])))
  assert gap > 1e-3, "under Adam a penalty in the loss must step differently"
  # Under plain SGD at rate lr the two agree once the decoupled step is lr times the loss weight.
  sgd_coupled, _ = stepped(optax.sgd(0.1), lasso=LASSO)
  sgd_decoupled, _ = stepped(optax.sgd(0.1), lasso=0.1 * LASSO, lasso_decoupled=True)
  _assert_trees_close(sgd_decoupled["params"], sgd_coupled["params"])


def test_distillation_target_is_detached():
  # The full model's softmax is a target, not a path for gradients: the gradient is the
  # stop-gradient reference's, and measurably not the one that differentiates through the target.
  fmodel, params, model_state, batch = _tiny()
  keeps = {"layers.0": 1, "layers.1": 1}
  optimizer = _grad_recorder()
  step = training.make_train_step(fmodel, optimizer, sampler=_fixed_sampler(keeps), lasso=LASSO, loss="distill",
                                  donate=False)
  new_state, _ = step(training.init_state(params, model_state, optimizer), batch, jax.random.key(0))

  def grads(stop_gradient):
    fn = lambda p: _reference_loss(p, batch, keeps, loss="distill", alpha=0.5, frobenius_decay=0.0,
                                   stop_gradient=stop_gradient)[0]
    return jax.grad(fn)(params)

  detached, attached = grads(True), grads(False)
  gap = max(float(jnp.max(jnp.abs(d - a))) for d, a in zip(jax.tree.leaves(detached), jax.tree.leaves(attached)))
  assert gap > 1e-3, "the check needs the two gradients to differ"
  _assert_trees_close(new_state["opt_state"], detached)


def test_dense_model_trains_without_sampling():
  model = models.MLP(4, (5,), 3, factorized=False, rngs=nnx.Rngs(0))
  fmodel, params, model_state = training.FunctionalModel.from_module(model)
  _, _, _, batch = _tiny()

  def sampler(key, ranks):
    raise AssertionError("a dense model has nothing to sample")

  optimizer = _grad_recorder()
  step = training.make_train_step(fmodel, optimizer, sampler=sampler, donate=False)
  new_state, metrics = step(training.init_state(params, model_state, optimizer), batch, jax.random.key(0))

  def reference(p):
    h = jax.nn.relu(batch["image"] @ p["layers"][0]["kernel"] + p["layers"][0]["bias"][None, :])
    return _cross_entropy(h @ p["layers"][1]["kernel"] + p["layers"][1]["bias"][None, :], batch["label"])

  loss, grads = jax.value_and_grad(reference)(params)
  assert float(metrics["loss"]) == pytest.approx(float(loss), abs=TOL, rel=TOL)
  _assert_trees_close(new_state["opt_state"], grads)
