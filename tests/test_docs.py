"""The API reference is generated from docstrings: every public name has one and the file is current."""

import importlib
import re
import inspect
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))
import make_api  # noqa: E402


@pytest.mark.parametrize("module_name", make_api.MODULES)
def test_every_public_name_has_a_docstring(module_name):
  module = importlib.import_module(module_name)
  missing = [name for name in make_api.public_names(module)
             if (inspect.isfunction(getattr(module, name)) or inspect.isclass(getattr(module, name)))
             and not inspect.getdoc(getattr(module, name))]
  assert not missing, f"{module_name}: no docstring for {missing}"


def test_api_reference_is_current():
  assert (DOCS / "API.md").read_text() == make_api.render(), "run: python docs/make_api.py"


def test_readme_python_examples_run():
  readme = (DOCS.parent / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks, "the README should show the layers in use"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
  assert namespace["y"].shape == (1, 10)
  assert namespace["full"].shape == (16, 10) and namespace["small"].shape == (16, 10)
  assert not jnp.allclose(namespace["full"], namespace["small"])  # the keep counts were applied
