"""Deployment: slice a trained model to chosen ranks, merge layers that are not smaller, save and load it.

:func:`export` works on plain parameter trees: every factorized layer is cut to
its rank (:func:`maestro_jax.truncate_layer`), and a layer whose factorized form is
not smaller than its kernel, ``(d_in + d_out) r >= d_in d_out`` (``d_in = kh *
kw * c_in`` for a convolution), is merged into one dense kernel
``{'kernel': A[..., :r] @ B[:r] (kernel shape), 'bias'?}`` (:func:`maestro_jax.merge_layer`).
The functional core (:func:`maestro_jax.dense`, :func:`maestro_jax.conv`),
the NNX layers (``layer.merge()``) and the Linen layers (a ``kernel`` param)
all run the merged form, so the exported model is the same model:
:func:`export_module` and :func:`module_from_exported` put exported params into
an NNX model, :func:`export_functional` does it for a
:class:`maestro_jax.functional.FunctionalModel` or ``LinenModel``.

:func:`save_exported` / :func:`load_exported` store exported params and model
state with Orbax plus a JSON report; the format itself is defined in
``maestro_jax/_src/export_format.py`` (with :func:`layer_forms` and
:func:`json_default`) and re-exported here.

Rank quantization (Hajimolahoseini et al.): :func:`quantize_ranks` snaps ranks
up to a hardware-friendly multiple (8 on GPU, 128 on TPU);
:func:`measure_layer_times` times each layer's factorized apply at candidate
ranks against its dense kernel on the current backend and says which rank to use
and whether to keep the layer dense; :func:`dense_by_latency` turns those
timings into the ``dense=`` list of :func:`export` (a layer is merged when its
kernel is at least as fast; the size rule where nothing could be timed).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp  # noqa: F401  (tests reach the save format's Orbax checkpointer as export.ocp)
from flax import nnx

from maestro_jax import nnx as mnnx
from maestro_jax import functional
from maestro_jax._src import export_format
from maestro_jax._src import factorized as core
from maestro_jax._src import kinds
from maestro_jax._src import recording
from maestro_jax._src import rules
from maestro_jax._src import shrink as shrink_lib
from maestro_jax._src import tree

__all__ = ["MERGE_MODES", "should_merge", "export", "layer_forms", "export_module", "module_from_exported",
           "export_functional", "save_exported", "load_exported", "quantize_ranks", "LayerTiming",
           "layer_inputs", "measure_layer_times", "dense_by_latency", "time_fn", "json_default"]

PyTree = Any
MERGE_MODES = ("auto", "all", "none")

should_merge = rules.should_merge
# The save format lives in its own module (files on disk depend on it); these are its public names.
save_exported = export_format.save_exported
load_exported = export_format.load_exported
layer_forms = export_format.layer_forms
json_default = export_format.json_default


# --------------------------------------------------------------------------------------------- export


def _merge_decisions(params: PyTree, ranks: Mapping[str, int], merge: str, dense: Iterable[str]) -> dict[str, bool]:
  if merge not in MERGE_MODES:
    raise ValueError(f"merge must be one of {list(MERGE_MODES)}, got {merge!r}")
  layers = tree.factorized_layers(params)
  dense = set(dense)
  tree.check_names(dense, layers, "layers in dense")
  decide = {"auto": lambda n, l: rules.should_merge(*kinds.matrix_dims(l), ranks[n]), "all": lambda n, l: True,
            "none": lambda n, l: False}[merge]
  return {name: name in dense or decide(name, layer) for name, layer in layers.items()}


def export(params: PyTree, ranks: Mapping[str, int] | None = None, *, merge: str = "auto",
           dense: Iterable[str] = ()) -> PyTree:
  """Cuts every factorized layer to its rank and merges those that are not smaller as factors.

  Args:
    params: parameter tree holding factorized layers (pure nested dicts).
    ranks: rank per layer name; layers not named keep their capacity.
    merge: ``'auto'`` merges a layer when ``(d_in + d_out) r >= d_in d_out``
      (its factors are not smaller than its kernel); ``'all'`` merges every
      layer (the dense model at these ranks); ``'none'`` merges none.
    dense: further layers to merge regardless (e.g. those
      :func:`measure_layer_times` found faster dense).

  Returns:
    The parameter tree with each factorized layer replaced by
    ``{'a': A[..., :r], 'b': B[:r], 'bias'?}`` or ``{'kernel', 'bias'?}``. The
    model at full keep counts computes what the input model computes at keep
    counts ``ranks``.

  Raises:
    ValueError: unknown layer names, ranks out of range, a bad ``merge``.
  """
  ranks = tree.resolve_ranks(params, ranks)
  merged = _merge_decisions(params, ranks, merge, dense)

  def one(name: str, layer: Mapping) -> dict:
    if merged[name]:
      extra = {k: v for k, v in layer.items() if k not in ("a", "b", "bias")}
      return {**extra, **core.merge_layer(layer, ranks[name])}
    return core.truncate_layer(layer, ranks[name])

  return tree.map_layers(one, params)


def _factorized_modules(model: nnx.Module) -> list[tuple[tuple, mnnx.FactorizedModule]]:
  return [(path, m) for path, m in mnnx.iter_modules(model) if path and isinstance(m, mnnx.FactorizedModule)]


def _lookup(params: PyTree, path: tuple) -> Any:
  node = params
  for key in path:
    if not isinstance(node, Mapping):
      return None
    if key in node:
      node = node[key]
    elif str(key) in node:
      node = node[str(key)]
    else:
      return None
  return node


def module_from_exported(model: nnx.Module, params: PyTree, model_state: PyTree | None = None) -> nnx.Module:
  """Puts exported params (from :func:`export`) into an NNX model of the same architecture.

  Layers stored merged in ``params`` are merged in ``model`` first
  (``layer.merge()``), then every parameter, and the model state when given, is
  replaced; keep counts are set to the new capacities.

  Args:
    model: the model (e.g. freshly built); modified in place and returned.
    params: exported parameters.
    model_state: optional non-parameter state (BatchNorm statistics, ...), a
      pure dict as :meth:`FunctionalModel.from_module` returns.

  Returns:
    ``model``.
  """
  for path, layer in _factorized_modules(model):
    node = _lookup(params, path)
    if node is None:
      raise ValueError(f"exported params lack layer {tree.path_name(path)!r}")
    if core.is_merged(node) and not layer.merged:
      layer.merge()
    elif tree.is_factorized(node) and layer.merged:
      raise ValueError(f"layer {tree.path_name(path)!r} is merged in the model but factorized in the exported "
                       "params; start from a model whose layer holds factors")
  graphdef, param_state, keep_state, rest = nnx.split(model, nnx.Param, mnnx.KeepCount, ...)
  nnx.replace_by_pure_dict(param_state, dict(params))
  if model_state is not None:
    nnx.replace_by_pure_dict(rest, dict(model_state))
  nnx.update(model, param_state, rest)
  caps = {tree.path_name(path): layer.capacity for path, layer in _factorized_modules(model)}
  mnnx.set_keep_counts(model, caps)
  return model


def export_module(model: nnx.Module, ranks: Mapping[str, int] | None = None, *, merge: str = "auto",
                  dense: Iterable[str] = ()) -> nnx.Module:
  """:func:`export` applied to an NNX model, in place: factors cut to ``ranks``, small-enough layers merged."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return module_from_exported(model, export(params, ranks, merge=merge, dense=dense))


def export_functional(model: functional.FunctionalModel | functional.LinenModel, params: PyTree, model_state: PyTree,
                      ranks: Mapping[str, int] | None = None, *, merge: str = "auto",
                      dense: Iterable[str] = ()) -> tuple[Any, dict, dict]:
  """Exports a model's view (NNX or Linen): ``(exported view, its params, its model state)``.

  The exported view's ``apply(params, model_state, x)`` (no keep counts needed)
  equals ``model.apply(params, model_state, x, ranks)`` up to float rounding. A
  Linen module reads sliced factors and merged kernels as they are, so its view
  is unchanged; an NNX module is rebuilt with merged layers where needed.
  """
  exported = export(params, ranks, merge=merge, dense=dense)
  if isinstance(model, functional.LinenModel):
    return model, exported, dict(model_state)
  module = module_from_exported(model.to_module(params, model_state), exported, model_state)
  return functional.FunctionalModel.from_module(module)


# ----------------------------------------------------------------------------------- rank quantization


def quantize_ranks(ranks: Mapping[str, int], quantum: int, capacities: Mapping[str, int]) -> dict[str, int]:
  """Snaps every rank up to a multiple of ``quantum``, at most the layer's capacity.

  ``quantum`` is the hardware's friendly size (8 for GPU tensor cores, 128 for
  the TPU's matrix unit, 1 for no change); a rank of 0 stays 0.

  Raises:
    ValueError: ``quantum < 1``, layers missing from ``capacities``, ranks out of range.
  """
  if not isinstance(quantum, (int, np.integer)) or quantum < 1:
    raise ValueError(f"quantum must be an int >= 1, got {quantum!r}")
  tree.check_names(ranks, capacities, "layers in ranks")
  out = {}
  for name, rank in ranks.items():
    rank, cap = int(rank), int(capacities[name])
    if not 0 <= rank <= cap:
      raise ValueError(f"layer {name!r}: rank {rank} is out of range; need 0 <= rank <= capacity {cap}")
    out[name] = shrink_lib.round_up_rank(rank, int(quantum), cap)
  return out


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time in seconds of ``fn(*args)`` (outputs blocked on), after ``warmup`` calls."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(statistics.median(times))


def _alternated_times(calls: Mapping[Any, tuple[Callable[..., Any], tuple]], *, repeats: int = 10,
                     warmup: int = 2) -> dict[Any, list[float]]:
  """Wall times of each ``fn(*args)`` in ``calls`` (``{key: (fn, args)}``), ``repeats`` samples each.

  Every call is warmed up first; then each round times every call once, in
  turn, so a machine that slows down while timing favours none of them.
  """
  for fn, args in calls.values():
    time_fn(fn, *args, repeats=1, warmup=warmup)
  samples = {key: [] for key in calls}
  for _ in range(repeats):
    for key, (fn, args) in calls.items():
      samples[key].append(time_fn(fn, *args, repeats=1, warmup=0))
  return samples


def layer_inputs(model: nnx.Module, input_shape: Sequence[int], *, dtype=jnp.float32,
                 apply: Callable[[nnx.Module, jax.Array], Any] | None = None) -> dict[str, tuple[int, ...]]:
  """The input shape (without the batch axis) of every factorized layer's first call, by abstract tracing.

  Args:
    model: the model (not modified).
    input_shape: one example's shape, e.g. ``(28, 28, 1)``.
    dtype: input dtype.
    apply: ``apply(model, x)``; by default ``model(x)``.

  Returns:
    ``{layer name: input shape}`` for every factorized layer the forward pass calls.
  """
  graphdef, state = nnx.split(model)
  calls = recording.record_calls(
      lambda s: nnx.merge(graphdef, s, copy=True), state,
      jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in input_shape), dtype),
      layers=lambda m: {tree.path_name(path): layer for path, layer in _factorized_modules(m)},
      observe=lambda layer, x, out: tuple(int(d) for d in x.shape[1:]),
      apply=apply or (lambda m, x: m(x)))
  return {name: shapes[0] for name, shapes in calls.items() if shapes}


@dataclasses.dataclass(frozen=True)
class LayerTiming:
  """Measured times of one layer (seconds, median of runs).

  Attributes:
    name: layer name.
    requested: the rank asked for.
    rank: the chosen rank: the smallest candidate whose time is within
      ``tolerance`` of the fastest candidate's (so never below ``requested``).
    dense: whether the dense kernel is at least as fast as the chosen rank
      (then deploy the layer merged).
    times: ``{candidate rank: seconds}``; candidates are multiples of the quantum.
    dense_time: seconds of the dense kernel.
    input_shape: the timed input, batch axis included.
  """

  name: str
  requested: int
  rank: int
  dense: bool
  times: dict[int, float]
  dense_time: float
  input_shape: tuple[int, ...]


def _layer_fn(layer: mnnx.FactorizedModule) -> Callable:
  """``fn(core params, x)``: the layer's forward on given factors or kernel, as the layer itself runs it.

  Timed on the layer's own compute path (a factorized layer may form its kernel
  per call) and with its own axes. A skin class not listed here is refused:
  timing it as some other kind would measure the wrong operation.
  """
  path = getattr(layer, "compute_path", "auto")
  if isinstance(layer, mnnx.Conv):
    return lambda p, x: core.conv(p, x, None, strides=layer.strides, padding=layer.padding,
                                  dilation=layer.kernel_dilation, dtype=layer.dtype, precision=layer.precision,
                                  compute_path=path)
  if isinstance(layer, mnnx.LinearGeneral):
    return lambda p, x: core.dense_general(p, x, None, axis=layer.axis, features=layer.out_features,
                                           dtype=layer.dtype, precision=layer.precision, compute_path=path)
  if isinstance(layer, mnnx.Linear):
    return lambda p, x: core.dense(p, x, None, dtype=layer.dtype, precision=layer.precision, compute_path=path)
  raise TypeError(f"cannot time a {type(layer).__name__} layer; timed kinds are Linear, LinearGeneral and Conv")


def measure_layer_times(model: nnx.Module, input_shape: Sequence[int], ranks: Mapping[str, int] | None = None, *,
                        quantum: int = 8, batch_size: int = 32, max_candidates: int = 4, repeats: int = 10,
                        warmup: int = 2, tolerance: float = 0.05, layers: Iterable[str] | None = None,
                        seed: int = 0) -> dict[str, LayerTiming]:
  """Times each factorized layer at candidate ranks against its dense kernel on the current backend.

  For every layer the candidates are ``quantize(requested) + i * quantum``
  (``i = 0 .. max_candidates - 1``, capped at the capacity). Each candidate's
  factorized apply (factors sliced to that rank) and the dense kernel's apply
  are jitted, warmed up and timed (median of ``repeats`` runs, the forms
  alternated call by call, outputs blocked on) on a random input of
  ``batch_size`` examples of the layer's real input
  shape (found by :func:`layer_inputs`). Timings are noisy; nothing here is
  meant for assertions, only for choosing shapes.

  Args:
    model: an NNX model holding factorized layers (not modified).
    input_shape: one example's shape, e.g. ``(28, 28, 1)``.
    ranks: requested rank per layer (default: capacity).
    quantum: the rank multiple to try (8 GPU, 128 TPU).
    batch_size: examples per timed call.
    max_candidates: how many multiples of ``quantum`` to try per layer.
    repeats: timed runs per measurement.
    warmup: untimed runs first (the first one compiles).
    tolerance: a larger rank is not worth being slower by more than this share.
    layers: which layers to time (default: every factorized layer).
    seed: seed of the random inputs.

  Returns:
    ``{layer name: LayerTiming}``; use ``rank`` as the deployed rank and merge
    the layers with ``dense`` True (``export(..., dense=[...])``).
  """
  if max_candidates < 1 or batch_size < 1 or tolerance < 0:
    raise ValueError("need max_candidates >= 1, batch_size >= 1 and tolerance >= 0")
  modules = {tree.path_name(path): m for path, m in _factorized_modules(model) if not m.merged}
  ranks = dict(ranks or {})
  tree.check_names(ranks, modules, "layers in ranks")
  names = list(modules) if layers is None else list(layers)
  tree.check_names(names, modules, "layers to time")
  shapes = layer_inputs(model, input_shape)
  key = jax.random.key(seed)
  out = {}
  for i, name in enumerate(names):
    layer = modules[name]
    if name not in shapes:
      continue  # never called
    params = layer.factor_params()
    cap = core.capacity(params)
    requested = int(ranks.get(name, cap))
    if not 0 <= requested <= cap:
      raise ValueError(f"layer {name!r}: rank {requested} is out of range; need 0 <= rank <= capacity {cap}")
    first = shrink_lib.round_up_rank(requested, quantum, cap)
    candidates = sorted({min(first + j * quantum, cap) for j in range(max_candidates)})
    x = jax.random.normal(jax.random.fold_in(key, i), (batch_size,) + shapes[name], jnp.float32)
    fn = jax.jit(_layer_fn(layer))
    forms = {r: core.truncate_layer(params, r) for r in candidates}
    forms["dense"] = core.merge_layer(params, cap)
    samples = _alternated_times({key: (fn, (form, x)) for key, form in forms.items()}, repeats=repeats,
                               warmup=warmup)
    dense_time = float(statistics.median(samples.pop("dense")))
    times = {r: float(statistics.median(samples[r])) for r in candidates}
    fastest = min(times.values())
    rank = min(r for r, t in times.items() if t <= fastest * (1.0 + tolerance))
    out[name] = LayerTiming(name=name, requested=requested, rank=rank, dense=dense_time <= times[rank],
                            times=times, dense_time=dense_time, input_shape=tuple(x.shape))
  return out


def dense_by_latency(model: nnx.Module, input_shape: Sequence[int] | None, ranks: Mapping[str, int] | None = None, *,
                     timings: Mapping[str, LayerTiming] | None = None, batch_size: int = 32, repeats: int = 10,
                     warmup: int = 2, seed: int = 0, tolerance: float = 0.05, whole_model: bool = False) -> list[str]:
  """The layers to deploy as one dense kernel, by measured latency on the current backend.

  Each factorized layer of ``model`` is timed at its export rank (factors cut to
  ``ranks[name]``, applied as the layer would run them) against its merged
  kernel (:func:`measure_layer_times` with quantum 1 and one candidate, so the
  rank timed is the rank exported). The faster form wins when the two times
  differ by more than ``tolerance``; closer than that the timing cannot tell
  them apart and the size rule, :func:`maestro_jax.should_merge`, decides. A
  layer with no timing (no ``input_shape`` given, a layer the forward pass
  never calls, or a table without it) takes the size rule too. So an exported model is not slower
  than its dense twin layer by layer, within timing noise, wherever a layer
  can be timed. Layer times do not add up to the model's (fusion, dispatch,
  noise at microseconds), so with ``whole_model`` the whole exported model is
  timed too against the same model with every layer merged (the dense model at
  these ranks; the two alternated, the median of their per-round time ratios
  compared), and every layer is merged when that is faster at all: latency
  first, at the cost of the export's size, so that the export is not slower
  than the dense model beyond timing noise. Pass the
  result as ``export(..., dense=...)``; measure at the batch size the model
  will serve.

  Args:
    model: an NNX model holding factorized layers (not modified).
    input_shape: one example's shape, e.g. ``(28, 28, 1)``; None skips timing (size rule only).
    ranks: export rank per layer (default: capacity).
    timings: already measured times (e.g. from :func:`measure_layer_times`);
      when given nothing is timed.
    batch_size: examples per timed call.
    repeats: timed runs per measurement.
    warmup: untimed runs first.
    seed: seed of the random inputs.
    tolerance: relative difference below which two times count as equal.
    whole_model: also time the whole model, as above (needs ``input_shape``; off by default, since it
      may give up the size saving).

  Returns:
    Layer names to merge, in graph order.
  """
  modules = {tree.path_name(path): m for path, m in _factorized_modules(model) if not m.merged}
  ranks = dict(ranks or {})
  tree.check_names(ranks, modules, "layers in ranks")
  ranks = {name: int(ranks.get(name, layer.capacity)) for name, layer in modules.items()}
  if timings is None and input_shape is not None:
    timings = measure_layer_times(model, input_shape, ranks, quantum=1, max_candidates=1, batch_size=batch_size,
                                  repeats=repeats, warmup=warmup, seed=seed)
  timings = timings or {}
  merged = []
  for name, layer in modules.items():
    timing = timings.get(name)
    rank = ranks[name]
    factor_time = timing.times.get(rank) if timing is not None else None
    if factor_time is not None and abs(timing.dense_time - factor_time) > tolerance * min(timing.dense_time,
                                                                                           factor_time):
      merge = timing.dense_time < factor_time
    else:  # Not timed, or too close to call: the size rule.
      merge = rules.should_merge(*kinds.matrix_dims(layer.factor_params()), rank)
    if merge:
      merged.append(name)
  if whole_model and input_shape is not None and len(merged) < len(modules):
    x = jax.random.normal(jax.random.key(seed), (batch_size,) + tuple(int(d) for d in input_shape), jnp.float32)

    def model_call(dense: list[str]):
      graphdef, state = nnx.split(export_module(nnx.clone(model), ranks, merge="none", dense=dense))
      return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), (state, x)

    every = list(modules)
    samples = _alternated_times({"every": model_call(every), "chosen": model_call(merged)}, repeats=repeats,
                               warmup=warmup)
    ratios = [a / b for a, b in zip(samples["every"], samples["chosen"])]  # round by round
    if statistics.median(ratios) < 1.0:  # Latency first: any measured gain, since merging all is the dense speed.
      merged = every
  return merged
