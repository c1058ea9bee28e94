"""Building a run's model: a zoo name or a factory given by import path, NNX or Linen, seen through one view.

``config.model`` is either a name of the task's zoo (``'mlp'``, ``'lenet5'``,
``'transformer_lm'``, ...) or an import path ``'package.module:factory'``. A
factory is called with the keyword arguments it accepts among:

* the task's data: ``num_classes`` and ``image_shape`` (classification), or
  ``vocab_size`` and ``max_len`` (language modelling);
* ``factorized`` (``config.factorized``) and ``rngs`` (``nnx.Rngs(config.seed)``);
* ``config.model_kwargs``, which are always passed.

It returns an ``nnx.Module``, or a Linen ``nn.Module`` that the runner
initializes on a sample input (``module.init(key, x)``, with ``train=False``
when its ``__call__`` takes ``train``). Everything downstream uses the
functional view (:mod:`maestro_jax.functional`), so NNX and Linen models get
the same shrinking, checkpoints, sweeps and exports.

Modules are imported from ``config.python_path`` first (a config loaded from a
file gets that file's folder), then from the usual ``sys.path`` and the current
folder.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from maestro_jax import functional


def is_import_path(model: str) -> bool:
  """Whether ``model`` names a factory by import path (``package.module:factory``) rather than a zoo entry."""
  return ":" in model


def resolve_factory(spec: str, python_path: Sequence[str] = ()) -> Any:
  """The object ``package.module:attribute`` names, importing from ``python_path`` first.

  Raises:
    ValueError: a malformed path, a module that cannot be imported, a missing
      attribute, or an object that is not callable (one line each).
  """
  module_name, _, attribute = spec.partition(":")
  if not module_name or not attribute:
    raise ValueError(f"config: model={spec!r} must be a zoo name or an import path 'package.module:factory'")
  extra = [str(Path(p).absolute()) for p in python_path] + [str(Path.cwd())]
  added = [p for p in extra if p not in sys.path]
  sys.path[:0] = added
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    where = ", ".join(extra)
    raise ValueError(f"config: model={spec!r}: cannot import {module_name!r} ({e}); searched {where} and sys.path"
                     ) from None
  finally:
    for p in added:
      if p in sys.path:
        sys.path.remove(p)
  target = module
  for part in attribute.split("."):
    if not hasattr(target, part):
      raise ValueError(f"config: model={spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                       f"attribute {attribute!r}")
    target = getattr(target, part)
  if not callable(target):
    raise ValueError(f"config: model={spec!r} is not callable")
  return target


def _accepted(factory: Any) -> tuple[set[str], bool]:
  try:
    params = inspect.signature(factory).parameters.values()
  except (TypeError, ValueError):  # no signature (a builtin): pass only the model kwargs
    return set(), False
  names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  return names, any(p.kind is p.VAR_KEYWORD for p in params)


def call_factory(factory: Any, spec: str, config, factory_args: Mapping[str, Any]) -> Any:
  """``factory(**arguments it accepts, **config.model_kwargs)``; see the module docstring."""
  names, any_keyword = _accepted(factory)
  offered = {**factory_args, "factorized": config.factorized, "rngs": nnx.Rngs(config.seed)}
  kwargs = {k: v for k, v in offered.items() if (any_keyword or k in names) and k not in config.model_kwargs}
  if not config.factorized and "factorized" not in kwargs:
    raise ValueError(f"config: factorized=False, but model factory {spec!r} takes no 'factorized' argument; give it "
                     "one that builds the dense twin")
  try:
    return factory(**kwargs, **config.model_kwargs)
  except TypeError as e:
    raise ValueError(f"model factory {spec!r} failed: {e}") from e


def sample_input(task, sources, config) -> jax.Array:
  shape, dtype = task.example(sources, config)
  return jnp.zeros((1,) + tuple(shape), dtype)


def view_of(module: Any, spec: str, task, sources, config) -> tuple[Any, dict, dict]:
  """``(view, params, model_state)`` of an NNX module, or of a Linen module initialized on a sample input."""
  if isinstance(module, nnx.Module):
    return functional.from_module(module)
  if isinstance(module, nn.Module):
    kwargs = {"train": False} if functional.takes_train(type(module).__call__) else {}
    variables = module.init(jax.random.key(config.seed), sample_input(task, sources, config), **kwargs)
    return functional.from_module(module, jax.device_get(dict(variables)))
  raise ValueError(f"model {spec!r} returned a {type(module).__name__}, not a flax.nnx.Module or a flax.linen.Module")


def exported_view(module: Any, params: Mapping, model_state: Mapping) -> tuple[Any, dict, dict]:
  """The view of a freshly built ``module`` holding exported ``params`` (sliced factors, merged kernels)."""
  if isinstance(module, nn.Module):  # A Linen module reads whatever shapes its variables have.
    return functional.from_module(module, {"params": dict(params), **dict(model_state)})
  from maestro_jax import export as export_lib
  return functional.from_module(export_lib.module_from_exported(module, params, model_state))


def to_nnx_module(view: Any, params: Mapping, model_state: Mapping, what: str) -> nnx.Module:
  """The NNX module of a view holding ``params``; a one-line error for a Linen model (``what`` needs NNX)."""
  if not isinstance(view, functional.FunctionalModel):
    raise ValueError(f"{what} works with NNX models only; this run's model is a Linen module")
  return view.to_module(params, model_state)
