"""Recording what each layer of a model sees when the model runs, by abstract tracing.

One recorder serves every question asked of a traced forward pass: how many
output positions a layer has (:func:`maestro_jax.accounting.layer_positions`,
for MAC counts) and what input shape it is called with
(:func:`maestro_jax.export.layer_inputs`, for timing). The model runs under
:func:`jax.eval_shape`, so no FLOPs are spent and arrays are shapes only.

A layer is any Python object called as ``layer(x, ...)``. To see its calls
without asking its author for a hook, the recorder gives the object a subclass
of its own class whose ``__call__`` notes ``observe(layer, x, out)`` and then
behaves exactly as before; the original class is put back afterwards. The
subclass keeps the class's name and module, so error messages read the same.
The core imports no Flax: the caller says how to build a throwaway copy of the
model from its state and which layers to watch.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax

T = TypeVar("T")

# A recording subclass per layer class, made once: classes made per call would pile up for the process's life.
_SUBCLASSES: dict[type, type] = {}
_RECORDING_CLASSES: set[type] = set()
# The recordings in progress on this thread, innermost last. A layer is looked up by id in each, so nested
# recordings (a traced model that itself traces a model) each see only their own layers.
_ACTIVE = threading.local()


def _recordings() -> list[tuple[dict[int, list[str]], dict[str, list], Callable]]:
  if not hasattr(_ACTIVE, "stack"):
    _ACTIVE.stack = []
  return _ACTIVE.stack


def _recording_subclass(cls: type) -> type:
  if cls not in _SUBCLASSES:

    def __call__(self, *args, **kwargs):
      out = cls.__call__(self, *args, **kwargs)
      for names, calls, observe in _recordings():
        for name in names.get(id(self), ()):
          calls[name].append(observe(self, args[0] if args else None, out))
      return out

    _SUBCLASSES[cls] = types.new_class(cls.__name__, (cls,), exec_body=lambda ns: ns.update(
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}))
    _RECORDING_CLASSES.add(_SUBCLASSES[cls])
  return _SUBCLASSES[cls]


@contextlib.contextmanager
def recording(layers: Mapping[str, Any], observe: Callable[[Any, Any, Any], T]) -> Iterator[dict[str, list[T]]]:
  """Within the block, every call of a named layer appends ``observe(layer, x, out)`` to its list.

  Args:
    layers: ``{name: layer object}``; their classes are swapped for the block
      and restored after it.
    observe: what to note of one call, from the layer, its first positional
      argument (None when called with keywords only) and its output.

  Yields:
    ``{name: [observation per call, in call order]}`` (an empty list for a
    layer never called).
  """
  calls: dict[str, list[T]] = {name: [] for name in layers}
  names: dict[int, list[str]] = {}
  for name, layer in layers.items():
    names.setdefault(id(layer), []).append(name)
  entry = (names, calls, observe)
  # One swap per object, even when an object is named twice or is already recording for an outer block:
  # a recording subclass of a recording subclass would note every call twice.
  objects = {id(layer): layer for layer in layers.values() if type(layer) not in _RECORDING_CLASSES}
  originals = {key: type(layer) for key, layer in objects.items()}
  stack = _recordings()
  for layer in objects.values():
    layer.__class__ = _recording_subclass(type(layer))
  stack.append(entry)
  try:
    yield calls
  finally:
    stack.remove(entry)
    for key, layer in objects.items():
      layer.__class__ = originals[key]


def record_calls(rebuild: Callable[[Any], Any], state: Any, x: jax.ShapeDtypeStruct, *,
                 layers: Callable[[Any], Mapping[str, Any]], observe: Callable[[Any, Any, Any], T],
                 apply: Callable[[Any, Any], Any]) -> dict[str, list[T]]:
  """Runs a model abstractly on ``x`` and returns what ``observe`` noted of each named layer's calls.

  Args:
    rebuild: ``rebuild(state) -> model``, a fresh model made inside the trace
      (so the caller's model is never touched and sees no tracers).
    state: the model's state, traced as abstract shapes.
    x: the input's shape and dtype, batch axis included.
    layers: ``layers(model) -> {name: layer}``, the layers to watch in the rebuilt model.
    observe: ``observe(layer, x, out)``, what to note of one call; sees
      shapes, not values.
    apply: ``apply(model, x)`` runs the model.

  Returns:
    ``{name: [observation per call]}`` for every watched layer.
  """
  found: dict[str, list[T]] = {}

  def run(state, x):
    model = rebuild(state)
    with recording(layers(model), observe) as calls:
      apply(model, x)
    found.update(calls)

  jax.eval_shape(run, state, x)
  return found
