"""Factor freezing (Hajimolahoseini et al.): train one factor of each pair, layers frozen in sequence."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from maestro_jax._src import tree

Array = jax.Array
PyTree = Any

FACTORS = ("a", "b")

# --------------------------------------------------------------------------- factor freezing


def freeze_mask(params: PyTree, frozen: Mapping[str, str]) -> PyTree:
  """A boolean tree like ``params``: True where a leaf trains, False for frozen factors.

  Args:
    params: parameter tree holding factorized layers.
    frozen: ``{layer name: 'a' | 'b'}``, the factor to freeze in each named layer.
      Biases and all other leaves stay trainable.
  """
  layers = tree.factorized_layers(params)
  tree.check_names(frozen, layers, "layers in frozen")
  for name, which in frozen.items():
    if which not in FACTORS:
      raise ValueError(f"layer {name!r}: frozen factor must be 'a' or 'b', got {which!r}")

  def one(name: str, layer: Mapping[str, Any]) -> dict[str, Any]:
    return {k: jax.tree.map(lambda _, k=k: k != frozen.get(name), v) for k, v in layer.items()}

  with_layers = tree.map_layers(one, params)
  return jax.tree.map(lambda x: x if isinstance(x, bool) else True, with_layers)


def frozen_optimizer(optimizer: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
  """``optimizer`` on the trainable leaves; frozen leaves (``mask`` False) get exactly zero updates.

  Built with ``optax.multi_transform``: frozen leaves never reach ``optimizer``
  (no momentum, weight decay or optimizer state for them) and receive
  ``optax.set_to_zero()``, so ``optax.apply_updates`` leaves them bitwise
  unchanged. The state's structure depends on the mask; when the frozen set
  changes, carry the state over with :func:`refreeze_state`.
  """
  labels = jax.tree.map(lambda trainable: "trainable" if trainable else "frozen", mask)
  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def refreeze_state(optimizer: optax.GradientTransformation, params: PyTree, opt_state: PyTree) -> PyTree:
  """State for a new :func:`frozen_optimizer` after the frozen set changed, reusing ``opt_state``.

  Entries of newly frozen leaves are dropped, entries of still-trainable leaves
  (momentum, Adam moments, step counts) are carried over from ``opt_state``, and
  newly unfrozen leaves start from a fresh ``optimizer.init``.

  Args:
    optimizer: the new frozen optimizer (same inner optimizer, new mask).
    params: current parameters.
    opt_state: state of the previous frozen optimizer.
  """
  fresh = optimizer.init(params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return jax.tree.map(lambda new, old: new if masked(new) or masked(old) else old, fresh, opt_state,
                      is_leaf=masked)


def stop_frozen_gradients(params: PyTree, mask: PyTree) -> PyTree:
  """``params`` with ``jax.lax.stop_gradient`` on frozen leaves (``mask`` False).

  Apply inside the loss so XLA drops the frozen factors' weight-gradient
  matmuls — the training speed-up of freezing. Values are unchanged.
  """
  return jax.tree.map(lambda p, trainable: p if trainable else jax.lax.stop_gradient(p), params, mask)


def sequential_freeze_schedule(layer_names: Sequence[str], epochs: int, factor: str = "a",
                               start_epoch: int = 1) -> Callable[[int], dict[str, str]]:
  """Freezes one factor of each layer, one layer after another.

  Rule: with ``interval = max(1, epochs // len(layer_names))``, layer ``i``
  (in the given order) is frozen from epoch ``start_epoch + i * interval`` on
  (epochs count from 0). A layer once frozen stays frozen.

  Args:
    layer_names: layers in freezing order (e.g. ``maestro_jax.factorized_layers(params)``).
    epochs: number of epochs to spread the freezing over.
    factor: the factor to freeze, ``'a'`` or ``'b'``.
    start_epoch: epoch at which the first layer freezes.

  Returns:
    ``schedule(epoch) -> {layer name: factor}`` for the layers frozen at that epoch.
  """
  if factor not in FACTORS:
    raise ValueError(f"factor must be 'a' or 'b', got {factor!r}")
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  names = list(layer_names)
  interval = max(1, epochs // max(len(names), 1))

  def schedule(epoch: int) -> dict[str, str]:
    return {name: factor for i, name in enumerate(names) if epoch >= start_epoch + i * interval}

  return schedule
