"""Pure-function views of any Flax model, NNX or Linen: what the train step, sweeps, search and export take.

A view has one interface whatever the model::

  out, new_model_state = view.apply(params, model_state, x, keeps, train=False)
  model_state = view.recalibrate(params, model_state, images, keeps)   # BatchNorm statistics
  positions = view.layer_positions(params, model_state, input_shape)   # for MAC counts

``params`` and ``model_state`` are plain nested dicts (``model_state`` holds
BatchNorm statistics and any other non-parameter state); ``keeps`` maps layer
names to keep counts (ints or traced int32) and goes straight into the apply:
layers not named keep their full capacity. Build a view with
:meth:`FunctionalModel.from_module` (NNX) or :meth:`LinenModel.from_module`
(Linen, with its variables). The model is called as ``model(x, train=train)``
when its ``__call__`` takes a ``train`` argument, else as ``model(x)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util
from jax.experimental import checkify

from maestro_jax import batch_norm
from maestro_jax import linen as mln
from maestro_jax import nnx as mnx
from maestro_jax._src import tree

__all__ = ["FunctionalModel", "LinenModel", "from_module", "takes_train", "check_keep_counts"]


def takes_train(call) -> bool:
  """Whether a ``__call__`` accepts a ``train`` keyword (or ``**kwargs``)."""
  params = inspect.signature(call).parameters.values()
  return any(p.name == "train" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _copy(state: nnx.State) -> nnx.State:
  return jax.tree.map(lambda v: v, state)


def check_keep_counts(params: Mapping, keeps: Mapping[str, Any] | None) -> None:
  """Adds a ``checkify`` check that every keep count is in ``0..capacity``; for debugging.

  Traced keep counts are not range-checked by default: one above a layer's
  capacity acts as full rank and one below 0 as 0 (the mask keeps components
  ``k < keep``). Call this inside a function transformed by
  ``jax.experimental.checkify.checkify`` (as
  :func:`maestro_jax.training.make_train_step` does with ``check_keeps=True``)
  to make an out-of-range value an error that names the layer.
  """
  caps = tree.capacities(params)
  for name, keep in dict(keeps or {}).items():
    keep = jnp.asarray(keep)
    checkify.check(jnp.all((keep >= 0) & (keep <= caps[name])),
                   f"layer {name!r}: keep count {{keep}} is out of range 0..{caps[name]}", keep=keep)


def _keep_tree(params: Mapping, keeps: Mapping[str, Any] | None, leaf: str) -> dict:
  """``{..layer path: {leaf: keep}}`` for every factorized layer: ``keeps[name]`` or its capacity."""
  keeps = dict(keeps or {})
  caps = tree.capacities(params)
  tree.check_names(keeps, caps, "layers in keep counts")
  flat = {path + (leaf,): jnp.asarray(keeps.get(name, caps[name]), jnp.int32)
          for name, path in tree.layer_paths(params).items()}
  return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionalModel:
  """A pure-function view of an NNX model (any ``__call__`` signature)."""
  graphdef: Any
  param_template: nnx.State
  keep_template: nnx.State
  state_template: nnx.State
  accepts_train: bool = True

  @classmethod
  def from_module(cls, model: nnx.Module) -> tuple[FunctionalModel, dict, dict]:
    """Splits ``model``; returns the view, its params and its model state (pure dicts)."""
    graphdef, params, keeps, rest = nnx.split(model, nnx.Param, mnx.KeepCount, ...)
    view = cls(graphdef, params, keeps, rest, takes_train(type(model).__call__))
    return view, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def states(self, params: Mapping, model_state: Mapping,
             keeps: Mapping[str, Any] | None = None) -> tuple[nnx.State, nnx.State, nnx.State]:
    """``(params, keep counts, rest)`` as NNX states for ``nnx.merge(graphdef, *states)``.

    Keep counts default to each layer's (possibly shrunk) capacity.
    """
    param_state, keep_state, rest = _copy(self.param_template), _copy(self.keep_template), _copy(self.state_template)
    nnx.replace_by_pure_dict(param_state, dict(params))
    nnx.replace_by_pure_dict(rest, dict(model_state))
    nnx.replace_by_pure_dict(keep_state, _keep_tree(params, keeps, "keep"))
    return param_state, keep_state, rest

  def to_module(self, params: Mapping, model_state: Mapping, keeps: Mapping[str, Any] | None = None) -> nnx.Module:
    """An NNX module holding the given params (any capacities), state and keep counts."""
    return nnx.merge(self.graphdef, *self.states(params, model_state, keeps))

  def call(self, model: nnx.Module, x: jax.Array, train: bool) -> Any:
    return model(x, train=train) if self.accepts_train else model(x)

  def apply(self, params: Mapping, model_state: Mapping, x: jax.Array, keeps: Mapping[str, Any] | None = None,
            *, train: bool = False) -> tuple[Any, dict]:
    """Runs the model; returns ``(outputs, new_model_state)``."""
    model = self.to_module(params, model_state, keeps)
    out = self.call(model, x, train)
    return out, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, mnx.KeepCount))))

  def recalibrate(self, params: Mapping, model_state: Mapping, images: jax.Array,
                  keeps: Mapping[str, Any] | None = None) -> dict:
    """``model_state`` with BatchNorm statistics recomputed over calibration batches ``images (n, B, ...)``.

    Pure and jittable; vmap it over keep counts to recalibrate many rank settings at once.
    """
    stats = batch_norm.batch_norm_statistics(self.graphdef, self.states(params, model_state, keeps), images,
                                             apply=lambda model, x: self.call(model, x, True))
    merged = _copy(self.state_template)
    nnx.replace_by_pure_dict(merged, dict(model_state))
    return nnx.to_pure_dict(nnx.merge_state(merged, stats))

  def layer_positions(self, params: Mapping, model_state: Mapping, input_shape: Sequence[int], *,
                      dtype=jnp.float32) -> dict[str, int]:
    """Output positions per example of every weight layer (see :func:`maestro_jax.accounting.layer_positions`)."""
    from maestro_jax import accounting  # pylint: disable=import-outside-toplevel  (accounting imports this module)
    return accounting.layer_positions(self.to_module(params, model_state), input_shape, dtype=dtype,
                                      apply=lambda m, x: self.call(m, x, False))


@dataclasses.dataclass(frozen=True, eq=False)
class LinenModel:
  """A pure-function view of a Linen module built from ``maestro_jax.linen`` layers (and any others).

  ``model_state`` holds every variable collection but ``params`` and the keep
  counts (e.g. ``batch_stats``); in training mode those collections are mutable
  and their new values are returned.
  """
  module: nn.Module
  state_collections: tuple[str, ...] = ()
  accepts_train: bool = True

  @classmethod
  def from_module(cls, module: nn.Module, variables: Mapping) -> tuple[LinenModel, dict, dict]:
    """The view of ``module`` with ``variables`` (from ``module.init``); returns ``(view, params, model_state)``."""
    if "params" not in variables:
      raise ValueError(f"variables have no 'params' collection (collections: {sorted(variables)})")
    state = {k: v for k, v in variables.items() if k not in ("params", mln.KEEP_COLLECTION)}
    view = cls(module, tuple(sorted(state)), takes_train(type(module).__call__))
    return view, dict(variables["params"]), state

  def variables(self, params: Mapping, model_state: Mapping, keeps: Mapping[str, Any] | None = None) -> dict:
    return {"params": params, **model_state, mln.KEEP_COLLECTION: _keep_tree(params, keeps, "keep")}

  def _run(self, variables, x, train: bool, mutable):
    kwargs = {"train": train} if self.accepts_train else {}
    return self.module.apply(variables, x, mutable=mutable, **kwargs)

  def apply(self, params: Mapping, model_state: Mapping, x: jax.Array, keeps: Mapping[str, Any] | None = None,
            *, train: bool = False) -> tuple[Any, dict]:
    """Runs the model; returns ``(outputs, new_model_state)``."""
    variables = self.variables(params, model_state, keeps)
    if train and self.state_collections:
      out, updates = self._run(variables, x, True, list(self.state_collections))
      return out, {**model_state, **updates}
    return self._run(variables, x, train, False), dict(model_state)

  def recalibrate(self, params: Mapping, model_state: Mapping, images: jax.Array,
                  keeps: Mapping[str, Any] | None = None) -> dict:
    """``model_state`` with exact BatchNorm statistics over calibration batches ``images (n, B, ...)``.

    Linen's BatchNorm keeps a moving average ``new = m * old + (1 - m) * batch``
    whose momentum ``m`` the view does not know, so each batch runs twice, from
    running statistics of 0 and of 1: the difference is ``m`` and the batch
    statistic is ``new_0 / (1 - m)``. Each statistic is then averaged over the
    batches (as :func:`maestro_jax.batch_norm.batch_norm_statistics` does for NNX).
    """
    if "batch_stats" not in model_state:
      return dict(model_state)
    stats = model_state["batch_stats"]

    def one(x):
      runs = []
      for fill in (jnp.zeros_like, jnp.ones_like):
        variables = self.variables(params, {**model_state, "batch_stats": jax.tree.map(fill, stats)}, keeps)
        _, updates = self._run(variables, x, True, ["batch_stats"])
        runs.append(updates["batch_stats"])
      return jax.tree.map(lambda new0, new1: new0 / jnp.where(new1 - new0 < 1, 1 - (new1 - new0), 1), *runs)

    def body(total, x):
      return jax.tree.map(jnp.add, total, one(x)), None

    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, stats), images)
    return {**model_state, "batch_stats": jax.tree.map(lambda t: t / images.shape[0], total)}

  def layer_positions(self, params: Mapping, model_state: Mapping, input_shape: Sequence[int], *,
                      dtype=jnp.float32) -> dict[str, int]:
    """Output positions per example of every layer with a ``kernel`` or factors, found by one abstract trace."""
    found: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name == "__call__" and hasattr(out, "shape") and hasattr(module, "features") and (
          module.has_variable("params", "kernel") or module.has_variable("params", "a")):
        features = module.features if isinstance(module.features, int) else math.prod(module.features)
        name = ".".join(module.scope.path)
        found[name] = found.get(name, 0) + math.prod(out.shape) // features
      return out

    def run(params, model_state, x):
      with nn.intercept_methods(record):
        self._run(self.variables(params, model_state), x, False, False)

    jax.eval_shape(run, params, model_state, jax.ShapeDtypeStruct((1,) + tuple(input_shape), dtype))
    return found


def from_module(model: nnx.Module | nn.Module, variables: Mapping | None = None):
  """The view of an NNX module, or of a Linen module with its ``variables``: ``(view, params, model_state)``."""
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("a Linen module needs its variables: from_module(module, module.init(key, x))")
    return LinenModel.from_module(model, variables)
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("an NNX module holds its own variables; call from_module(model)")
    return FunctionalModel.from_module(model)
  raise TypeError(f"expected a flax.nnx.Module or a flax.linen.Module, got {type(model).__name__}")
