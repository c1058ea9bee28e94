"""Deployment: slice a trained model to chosen ranks, merge layers that are not smaller, save and load it.

:func:`export` works on plain parameter trees: every factorized layer is cut to
its rank (:func:`maestro_jax.truncate`), and a layer whose factorized form is
not smaller than its kernel, ``(d_in + d_out) r >= d_in d_out`` (``d_in = kh *
kw * c_in`` for a convolution), is merged into one dense kernel
``{'kernel': A[..., :r] @ B[:r] (kernel shape), 'bias'?}`` (:func:`maestro_jax.merge`).
The functional core (:func:`maestro_jax.dense`, :func:`maestro_jax.conv`),
the NNX layers (``layer.merge()``) and the Linen layers (a ``kernel`` param)
all run the merged form, so the exported model is the same model:
:func:`export_module` and :func:`module_from_exported` put exported params into
an NNX model, :func:`export_functional` does it for a
:class:`maestro_jax.training.FunctionalModel`.

:func:`save_exported` / :func:`load_exported` store exported params and model
state with Orbax plus a JSON report.

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
import json
import statistics
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from maestro_jax import nnx as mnnx
from maestro_jax import functional
from maestro_jax._src import factorized as core
from maestro_jax._src import kinds
from maestro_jax._src import rules
from maestro_jax._src import shrink as shrink_lib
from maestro_jax._src import tree

__all__ = ["MERGE_MODES", "should_merge", "export", "layer_forms", "export_module", "module_from_exported",
           "export_functional", "save_exported", "load_exported", "quantize_ranks", "LayerTiming",
           "layer_inputs", "measure_layer_times", "dense_by_latency", "time_fn", "json_default"]

PyTree = Any
MERGE_MODES = ("auto", "all", "none")
_FORMAT = "maestro_jax.export/1"

should_merge = rules.should_merge


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


def layer_forms(params: PyTree) -> dict[str, dict[str, Any]]:
  """How each weight layer of an exported tree is stored.

  Returns:
    ``{layer name: {'form': 'factorized', 'rank': r}}`` for factor pairs and
    ``{'form': 'dense', 'kernel_shape': [...]}`` for merged (or plain) kernels.
  """
  out: dict[str, dict[str, Any]] = {}

  def walk(node, path):
    if tree.is_factorized(node):
      out[tree.path_name(path)] = {"form": "factorized", "rank": int(node["a"].shape[-1])}
    elif isinstance(node, Mapping) and "kernel" in node and hasattr(node["kernel"], "shape"):
      out[tree.path_name(path)] = {"form": "dense", "kernel_shape": [int(d) for d in node["kernel"].shape]}
    elif isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, path + (key,))

  walk(params, ())
  return out


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


# ------------------------------------------------------------------------------------------ save / load


def _flatten(tree_: PyTree) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Leaves under safe keys ``leaf_00000, ...`` plus a spec that rebuilds the nested dicts (int keys kept)."""
  flat, spec = {}, []

  def walk(node, path):
    if isinstance(node, Mapping):
      for key, child in node.items():
        if not isinstance(key, (str, int)):
          raise TypeError(f"cannot save a dict key of type {type(key).__name__} at {list(path)}")
        walk(child, path + [key])
    elif node is None:
      return
    else:
      key = f"leaf_{len(spec):05d}"
      array = np.asarray(jax.device_get(node))
      flat[key] = array
      spec.append({"key": key, "path": path, "shape": list(array.shape), "dtype": array.dtype.name})

  walk(tree_, [])
  return flat, spec


def _unflatten(flat: Mapping[str, Any], spec: Sequence[Mapping[str, Any]], skeleton: Mapping) -> dict:
  out = json.loads(json.dumps(skeleton))  # the empty dicts (e.g. no model state) survive

  def rebuild(node):
    return {int(k[4:]) if k.startswith("int:") else k[4:]: rebuild(v) for k, v in node.items()} \
        if isinstance(node, dict) else node

  out = rebuild(out)
  for entry in spec:
    node = out
    for key in entry["path"][:-1]:
      node = node.setdefault(key, {})
    node[entry["path"][-1]] = flat[entry["key"]]
  return out


def _skeleton(tree_: PyTree) -> Any:
  """The dict structure without leaves; keys tagged ``int:``/``str:`` so JSON keeps their type."""
  if isinstance(tree_, Mapping):
    return {f"{'int' if isinstance(k, int) else 'str'}:{k}": _skeleton(v) for k, v in tree_.items()
            if isinstance(v, Mapping)}
  return None


def json_default(value: Any) -> Any:
  """``json.dumps(..., default=json_default)`` for numpy/JAX scalars and arrays, paths and dataclasses."""
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, (np.bool_,)):
    return bool(value)
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, Path):
    return str(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return dataclasses.asdict(value)
  raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_exported(path: str | Path, params: PyTree, model_state: PyTree | None = None,
                  report: Mapping[str, Any] | None = None) -> Path:
  """Saves exported params and model state with Orbax, and ``report`` as JSON.

  Layout: ``path/arrays`` (an Orbax ``StandardCheckpointer`` checkpoint of the
  leaves) and ``path/exported.json`` (the tree structure, with its integer keys,
  shapes, dtypes, layer forms and ``report``). Zero-size leaves (a layer at rank
  0 is its bias alone) are described in ``exported.json`` only.

  The export is written to a temporary folder beside ``path`` and renamed into
  place, so a failed save leaves an earlier export at ``path`` as it was.

  Returns:
    ``path`` as an absolute ``Path``.

  Raises:
    FileExistsError: ``path`` is a non-empty folder that holds no export (it is never replaced).
  """
  import shutil  # Local imports keep this function's atomic replace self-contained.
  import uuid

  path = Path(path).absolute()
  if path.exists() and not (path / "exported.json").exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{path} exists and holds no exported model; not replacing it")
  path.parent.mkdir(parents=True, exist_ok=True)
  full = {"params": params, "model_state": model_state or {}}
  flat, spec = _flatten(full)
  stored = {k: v for k, v in flat.items() if v.size}  # Orbax cannot save zero-size arrays.
  meta = {"format": _FORMAT, "leaves": spec, "skeleton": _skeleton(full), "layers": layer_forms(params),
          "report": dict(report or {})}
  staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  staging.mkdir()
  try:
    if stored:
      checkpointer = ocp.StandardCheckpointer()
      try:
        checkpointer.save(staging / "arrays", stored)
        checkpointer.wait_until_finished()
      finally:
        checkpointer.close()
    (staging / "exported.json").write_text(json.dumps(meta, indent=2, default=json_default))
    if path.exists():
      previous = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
      path.rename(previous)
      staging.rename(path)
      shutil.rmtree(previous)
    else:
      staging.rename(path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return path


def load_exported(path: str | Path) -> tuple[dict, dict, dict]:
  """Loads what :func:`save_exported` wrote: ``(params, model_state, report)`` (arrays as ``jax.Array``).

  Raises:
    FileNotFoundError: ``path`` holds no export.
  """
  path = Path(path).absolute()
  meta_path = path / "exported.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{path} holds no exported model (no exported.json)")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != _FORMAT:
    raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}")
  shapes = {e["key"]: jax.ShapeDtypeStruct(tuple(e["shape"]), np.dtype(e["dtype"])) for e in meta["leaves"]}
  abstract = {k: v for k, v in shapes.items() if int(np.prod(v.shape))}
  flat: dict = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items() if k not in abstract}
  if abstract:
    checkpointer = ocp.StandardCheckpointer()
    try:
      flat.update(checkpointer.restore(path / "arrays", abstract))
    finally:
      checkpointer.close()
  full = _unflatten(flat, meta["leaves"], meta["skeleton"])
  return full["params"], full.get("model_state", {}), meta["report"]


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


_RECORDING: dict[type, type] = {}


def _recording(cls: type, seen: dict[int, tuple[int, ...]]) -> type:
  def __call__(self, x, *args, **kwargs):
    seen.setdefault(id(self), tuple(int(d) for d in x.shape[1:]))
    return cls.__call__(self, x, *args, **kwargs)

  return types.new_class(cls.__name__, (cls,), exec_body=lambda ns: ns.update(
      {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}))


def layer_inputs(model: nnx.Module, input_shape: Sequence[int], *, dtype=jnp.float32,
                 apply: Callable[[nnx.Module, jax.Array], Any] | None = None) -> dict[str, tuple[int, ...]]:
  """The input shape (without the batch axis) of every factorized layer's first call, by abstract tracing.

  Args:
    model: the model (not modified).
    input_shape: one example's shape, e.g. ``(28, 28, 1)``.
    dtype: input dtype.
    apply: ``apply(model, x)``; by default ``model(x)``.
  """
  apply = apply or (lambda m, x: m(x))
  graphdef, state = nnx.split(model)
  found: dict[str, tuple[int, ...]] = {}

  def run(state, x):
    copy = nnx.merge(graphdef, state, copy=True)
    seen: dict[int, tuple[int, ...]] = {}
    ids = {}
    for path, module in _factorized_modules(copy):
      module.__class__ = _recording(type(module), seen)
      ids[id(module)] = tree.path_name(path)
    apply(copy, x)
    for module_id, name in ids.items():
      if module_id in seen:
        found[name] = seen[module_id]
    return None

  jax.eval_shape(run, state, jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in input_shape), dtype))
  return found


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
  # Timed as the layer runs it: on its own compute path (a factorized layer may form its kernel per call).
  path = getattr(layer, "compute_path", "auto")
  if isinstance(layer, mnnx.Conv):
    return lambda p, x: core.conv(p, x, None, strides=layer.strides, padding=layer.padding,
                                  dilation=layer.kernel_dilation, dtype=layer.dtype, precision=layer.precision,
                                  compute_path=path)
  return lambda p, x: core.dense(p, x, None, dtype=layer.dtype, precision=layer.precision, compute_path=path)


def measure_layer_times(model: nnx.Module, input_shape: Sequence[int], ranks: Mapping[str, int] | None = None, *,
                        quantum: int = 8, batch_size: int = 32, max_candidates: int = 4, repeats: int = 10,
                        warmup: int = 2, tolerance: float = 0.05, layers: Iterable[str] | None = None,
                        seed: int = 0) -> dict[str, LayerTiming]:
  """Times each factorized layer at candidate ranks against its dense kernel on the current backend.

  For every layer the candidates are ``quantize(requested) + i * quantum``
  (``i = 0 .. max_candidates - 1``, capped at the capacity). Each candidate's
  factorized apply (factors sliced to that rank) and the dense kernel's apply
  are jitted, warmed up and timed (median of ``repeats`` runs, outputs blocked
  on) on a random input of ``batch_size`` examples of the layer's real input
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
    times = {r: time_fn(fn, core.truncate_layer(params, r), x, repeats=repeats, warmup=warmup) for r in candidates}
    dense_time = time_fn(fn, core.merge_layer(params, cap), x, repeats=repeats, warmup=warmup)
    fastest = min(times.values())
    rank = min(r for r, t in times.items() if t <= fastest * (1.0 + tolerance))
    out[name] = LayerTiming(name=name, requested=requested, rank=rank, dense=dense_time <= times[rank],
                            times=times, dense_time=dense_time, input_shape=tuple(x.shape))
  return out


def dense_by_latency(model: nnx.Module, input_shape: Sequence[int] | None, ranks: Mapping[str, int] | None = None, *,
                     timings: Mapping[str, LayerTiming] | None = None, batch_size: int = 32, repeats: int = 10,
                     warmup: int = 2, seed: int = 0, tolerance: float = 0.05) -> list[str]:
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
  can be timed. Pass the result as ``export(..., dense=...)``; measure at the
  batch size the model will serve.

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
  return merged
