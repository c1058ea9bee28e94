"""Jitted Maestro train and eval steps over an NNX model held as plain dicts.

The train state is a plain dict (big_vision style)::

  {'params': ..., 'model_state': ..., 'opt_state': ..., 'step': int32, 'ranks': {layer: int32}}

``params`` and ``model_state`` (BatchNorm statistics and any other non-param,
non-keep-count variables) are pure nested dicts, so shrinking, checkpointing and
accounting work on them directly. ``ranks`` are data: a layer samples keep
counts in ``1..rank`` and its capacity may be larger (rank quantum), so a rank
change that keeps the capacity never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from maestro_jax import functional
from maestro_jax import sharding
from maestro_jax.functional import FunctionalModel  # noqa: F401  (the train step's model type; re-exported)
from maestro_jax._src import regularizers
from maestro_jax._src import sampling
from maestro_jax._src import tree

PyTree = Any
LOSSES = ("maestro", "distill", "decomposable")


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over the (masked) examples."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  """Mean cross-entropy against soft targets (self-distillation)."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), target_probs))


def init_state(params: PyTree, model_state: PyTree, optimizer: optax.GradientTransformation,
               ranks: Mapping[str, int] | None = None) -> dict:
  """A fresh train state; ranks default to each layer's capacity."""
  caps = tree.capacities(params)
  ranks = dict(caps if ranks is None else ranks)
  return {"params": params, "model_state": model_state, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "ranks": {k: jnp.asarray(v, jnp.int32) for k, v in ranks.items()}}


def make_train_step(model: FunctionalModel, optimizer: optax.GradientTransformation, *,
                    sampler: sampling.Sampler, lasso: float | optax.Schedule = 0.0, loss: str = "maestro",
                    alpha: float = 0.5, distill_weight: float = 1.0, frobenius_decay: float = 0.0,
                    lasso_decoupled: bool = False, donate: bool = True, check_keeps: bool = False,
                    mesh: jax.sharding.Mesh | None = None, min_shard_size: int = sharding.DEFAULT_MIN_SIZE,
                    fold_in_step: bool = False) -> Callable:
  """Builds the jitted step ``(state, batch, key) -> (state, metrics)``.

  Args:
    model: the functional model.
    optimizer: an optax transformation over ``params``.
    sampler: draws keep counts from ``(key, ranks)``, or from ``(key, ranks,
      params)`` for a :class:`maestro_jax.samplers.ParamSampler`.
    lasso: weight of the hierarchical group lasso, or an optax schedule of the
      step (e.g. zero after the ranks are found, so training goes on free of
      the penalty's shrinkage; no recompilation).
    loss: ``'maestro'`` (the sampled model on labels, the paper's default),
      ``'distill'`` (full pass on labels plus the sampled model on the full
      model's detached softmax) or ``'decomposable'``
      (``(1 - alpha) L_full + alpha L_low``).
    alpha: weight of the low-rank loss for ``'decomposable'``.
    distill_weight: weight of the sampled model's term for ``'distill'``;
      below 1 the full model's own loss counts for more.
    frobenius_decay: weight of ``sum ||A B||_F^2`` (spectral-init baseline).
    lasso_decoupled: step the parameters down the lasso's gradient times
      ``lasso`` directly, after the optimizer, as AdamW does with weight decay,
      instead of adding the lasso to the loss. With Adam, a penalty in the loss
      is rescaled per parameter like the task's gradient, so it shrinks hardest
      the weights the task pushes least on; decoupled, its step is the same for
      every group whatever the task does. Its ``lasso`` is a step size, not a
      loss weight, and needs its own tuning.
    donate: donate the input state's buffers.
    mesh: keep the new state sharded over this 1-D mesh by
      :func:`maestro_jax.sharding.state_shardings` (FSDP style; the rule reads
      shapes at trace time, so it follows shrinking). None leaves placement to XLA.
    min_shard_size: arrays smaller than this stay replicated (with ``mesh``).
    check_keeps: debugging mode: raise (via ``checkify``) when a sampled keep
      count is outside ``0..capacity`` instead of silently clipping it.
    fold_in_step: draw with ``jax.random.fold_in(key, state['step'])`` inside
      the step, so a loop passes one key for the whole run; the same draws as
      folding in outside, without one more dispatch (and host wait) per step.

  Returns:
    The jitted step; ``metrics`` holds ``loss``, ``task_loss``, ``penalty``,
    ``accuracy``, ``grad_norm`` and ``kept_fraction`` (components kept / rank).
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
  lasso_at = lasso if callable(lasso) else (lambda step: lasso)
  use_lasso = callable(lasso) or bool(lasso)
  decoupled = use_lasso and lasso_decoupled

  def step(state, batch, key):
    ranks = state["ranks"]
    if fold_in_step:
      key = jax.random.fold_in(key, state["step"])
    if not ranks:  # A dense model: nothing to sample.
      keeps = {}
    else:
      keeps = sampling.draw(sampler, key, ranks, state["params"])
    if check_keeps:
      functional.check_keep_counts(state["params"], keeps)
    images, labels = batch["image"], batch["label"]
    weight = lasso_at(state["step"])
    if decoupled:  # The penalty and its gradient, once; the gradient is stepped after the optimizer.
      decoupled_penalty, lasso_grads = jax.value_and_grad(regularizers.group_lasso)(state["params"], ranks)

    def loss_fn(params):
      logits, new_state = model.apply(params, state["model_state"], images, keeps, train=True)
      low = cross_entropy(logits, labels)
      if loss == "maestro":
        task = low
      else:
        full_logits, new_state = model.apply(params, state["model_state"], images, ranks, train=True)
        full = cross_entropy(full_logits, labels)
        if loss == "distill":
          target = jax.lax.stop_gradient(jax.nn.softmax(full_logits.astype(jnp.float32)))
          task = full + distill_weight * soft_cross_entropy(logits, target)
        else:
          task = (1.0 - alpha) * full + alpha * low
      if decoupled:  # In the reported loss, but a constant here: no gradient through it.
        penalty = decoupled_penalty
      else:
        penalty = regularizers.group_lasso(params, ranks) if use_lasso else jnp.zeros(())
      total = task + weight * penalty
      if frobenius_decay:
        total = total + frobenius_decay * regularizers.frobenius_decay(params)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
      return total, (new_state, task, penalty, accuracy)

    (total, (new_state, task, penalty, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    if decoupled:
      updates = jax.tree.map(lambda u, g: u - weight * g, updates, lasso_grads)
    params = optax.apply_updates(state["params"], updates)
    kept = jnp.sum(jnp.asarray(jax.tree.leaves(keeps) or [1])) / jnp.maximum(
        jnp.sum(jnp.asarray(jax.tree.leaves(ranks) or [1])), 1)
    metrics = {"loss": total, "task_loss": task, "penalty": penalty, "accuracy": accuracy,
               "grad_norm": optax.tree.norm(grads), "kept_fraction": kept.astype(jnp.float32)}
    new = {"params": params, "model_state": new_state, "opt_state": opt_state, "step": state["step"] + 1,
           "ranks": ranks}
    if mesh is not None:
      new = jax.lax.with_sharding_constraint(new, sharding.state_shardings(new, mesh, min_size=min_shard_size))
    return new, metrics

  if not check_keeps:
    return jax.jit(step, donate_argnums=(0,) if donate else ())

  checked_step = jax.jit(checkify.checkify(step, errors=checkify.user_checks), donate_argnums=(0,) if donate else ())

  def run(state, batch, key):
    error, out = checked_step(state, batch, key)
    error.throw()
    return out

  return run


def make_eval_step(model: FunctionalModel) -> Callable:
  """Jitted ``(params, model_state, batch, keeps) -> {'loss_sum', 'correct', 'count'}`` (mask-aware)."""

  def evaluate(params, model_state, batch, keeps):
    logits, _ = model.apply(params, model_state, batch["image"], keeps, train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32)).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  return jax.jit(evaluate)


def evaluate(eval_step: Callable, params, model_state, batches: Iterable[Mapping], keeps=None) -> dict[str, float]:
  """Accuracy and mean loss over all batches (masked padding excluded)."""
  totals = None
  for batch in batches:
    out = eval_step(params, model_state, batch, keeps)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError("evaluate got no batches")
  count = float(totals["count"])
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss_sum"]) / count,
          "count": int(count)}
