"""The runner's optimizer chain (``maestro_train.train.make_optimizer``) against hand-written update rules.

Each case runs several steps on a small parameter tree with fixed per-step
gradients and compares every step's parameters with a float64 reference that
spells out the rule: coupled weight decay added to the gradient (as
``torch.optim.SGD`` does), heavy-ball momentum, Adam's bias-corrected moments,
AdamW's decoupled decay, and each learning-rate schedule.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maestro_train import config as config_lib
from maestro_train import train as train_lib

STEPS = 8  # the run's total steps: the step schedule decays at steps 4 and 6, cosine reaches 0 at 8
LR = 0.3
WD = 0.05  # large enough that a dropped decay term changes the result well beyond tolerance


def _schedule(name, count):
  """The learning rate of update ``count`` (0-based) by the schedule's definition."""
  if name == "constant":
    return LR
  if name == "step":  # x0.1 from half the run on, x0.1 again from three quarters on
    return LR * 0.1 ** sum(count >= b for b in (STEPS // 2, 3 * STEPS // 4))
  return LR * 0.5 * (1 + math.cos(math.pi * min(count, STEPS) / STEPS))


def _reference(optimizer, schedule, momentum, params, grads_per_step):
  """Float64 parameters after each step of the hand-written rule."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  out = []
  for t, grads in enumerate(grads_per_step):
    lr = _schedule(schedule, t)
    for k in p:
      g = np.asarray(grads[k], np.float64)
      if optimizer == "sgd":
        g = g + WD * p[k]  # coupled: the decay goes through momentum
        m[k] = momentum * m[k] + g if momentum else g
        p[k] = p[k] - lr * m[k]
      else:
        if optimizer == "adam":
          g = g + WD * p[k]
        m[k] = 0.9 * m[k] + 0.1 * g
        v2[k] = 0.999 * v2[k] + 0.001 * g * g
        step = (m[k] / (1 - 0.9 ** (t + 1))) / (np.sqrt(v2[k] / (1 - 0.999 ** (t + 1))) + 1e-8)
        if optimizer == "adamw":
          step = step + WD * p[k]  # decoupled: scaled by the learning rate only
        p[k] = p[k] - lr * step
    out.append({k: v.copy() for k, v in p.items()})
  return out


@pytest.mark.parametrize("optimizer,schedule,momentum", [
    ("sgd", "constant", 0.9), ("sgd", "step", 0.9), ("sgd", "cosine", 0.9), ("sgd", "step", 0.0),
    ("adam", "cosine", 0.9), ("adamw", "step", 0.9),
])
def test_make_optimizer_matches_the_reference_rule(optimizer, schedule, momentum):
  config = dataclasses.replace(config_lib.Config(), optimizer=optimizer, schedule=schedule, momentum=momentum,
                               learning_rate=LR, weight_decay=WD).validate()
  tx = train_lib.make_optimizer(config, STEPS)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((2,)), jnp.float32)}
  grads_per_step = [{k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
                    for _ in range(STEPS)]
  want = _reference(optimizer, schedule, momentum, params, grads_per_step)

  # Adam's bias correction 1 - 0.999^t is computed in float32 by optax and loses about four digits
  # at small t (the measured gap is 4e-6); a dropped decay term moves the parameters by 1e-3 or more.
  atol = 1e-6 if optimizer == "sgd" else 2e-5
  update = jax.jit(tx.update)
  state, p = tx.init(params), params
  for t, grads in enumerate(grads_per_step):
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
    for k in p:
      np.testing.assert_allclose(np.asarray(p[k]), want[t][k], rtol=1e-5, atol=atol, err_msg=f"step {t} {k}")


def test_schedules_by_step():
  # The learning rates themselves, read off the SGD update of a zero-decay, no-momentum run with gradient 1.
  for schedule in ("constant", "step", "cosine"):
    config = dataclasses.replace(config_lib.Config(), schedule=schedule, momentum=0.0, weight_decay=0.0,
                                 learning_rate=LR).validate()
    tx = train_lib.make_optimizer(config, STEPS)
    params = {"w": jnp.zeros(())}
    state, rates = tx.init(params), []
    for _ in range(STEPS + 1):
      updates, state = tx.update({"w": jnp.ones(())}, state, params)
      rates.append(-float(updates["w"]))
    np.testing.assert_allclose(rates, [_schedule(schedule, t) for t in range(STEPS + 1)], rtol=1e-6, atol=1e-7)
  step_rates = [_schedule("step", t) for t in range(STEPS)]
  assert step_rates == [LR] * 4 + [LR * 0.1] * 2 + [LR * 0.1 ** 2] * 2  # two decays, not one
