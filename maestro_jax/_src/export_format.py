"""The on-disk format of an exported model: Orbax arrays plus a JSON description.

An export folder holds ``arrays`` (an Orbax ``StandardCheckpointer``
checkpoint of the leaves) and ``exported.json`` (format tag, the tree's
structure with its integer keys, each leaf's shape and dtype, how each layer is
stored, and a free-form report). The format is its own module because it is a
contract with files already on disk: building an export
(:mod:`maestro_jax.export`) may change, reading ``maestro_jax.export/1`` may not.
It works on plain nested dicts and imports no Flax.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from maestro_jax._src import tree

PyTree = Any
FORMAT = "maestro_jax.export/1"


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
  path = Path(path).absolute()
  if path.exists() and not (path / "exported.json").exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{path} exists and holds no exported model; not replacing it")
  path.parent.mkdir(parents=True, exist_ok=True)
  full = {"params": params, "model_state": model_state or {}}
  flat, spec = _flatten(full)
  stored = {k: v for k, v in flat.items() if v.size}  # Orbax cannot save zero-size arrays.
  meta = {"format": FORMAT, "leaves": spec, "skeleton": _skeleton(full), "layers": layer_forms(params),
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
  if meta.get("format") != FORMAT:
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
