"""Writes docs/API.md from the docstrings of the public modules: ``python docs/make_api.py``."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = ("maestro_jax", "maestro_jax.samplers", "maestro_jax.nnx", "maestro_jax.linen", "maestro_jax.functional",
           "maestro_jax.training", "maestro_jax.sharding", "maestro_jax.batch_norm", "maestro_jax.models", "maestro_jax.data",
           "maestro_jax.sweep", "maestro_jax.export", "maestro_jax.accounting")
OUT = Path(__file__).with_name("API.md")


def public_names(module) -> list[str]:
  names = getattr(module, "__all__", None)
  if names is None:
    names = [n for n, obj in vars(module).items() if not n.startswith("_") and (inspect.isfunction(obj) or
             inspect.isclass(obj)) and getattr(obj, "__module__", "").startswith("maestro_jax")]
  return sorted(names)


def summary(obj) -> str:
  doc = inspect.getdoc(obj) or ""
  return doc.split("\n\n")[0].replace("\n", " ")


def signature(name: str, obj) -> str:
  try:
    text = f"{name}{inspect.signature(obj)}"
  except (TypeError, ValueError):
    return name
  # Linen's implicit `parent`/`name` fields and object addresses change from run to run.
  text = re.sub(r", parent: .*?, name: Optional\[str\] = None", "", text)
  return re.sub(r" at 0x[0-9a-f]+", "", text)


def render() -> str:
  lines = ["# API reference", "", "Generated from the docstrings by `python docs/make_api.py`; "
           "`help(maestro_jax.NAME)` shows the full text.", ""]
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    lines += [f"## `{module_name}`", "", summary(module), ""]
    for name in public_names(module):
      obj = getattr(module, name)
      if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue
      kind = "class " if inspect.isclass(obj) else ""
      lines += [f"- **`{kind}{signature(name, obj)}`**", f"  {summary(obj)}".rstrip(), ""]
  return "\n".join(lines)


def main() -> None:
  OUT.write_text(render())
  print(f"wrote {OUT}")


if __name__ == "__main__":
  sys.exit(main())
