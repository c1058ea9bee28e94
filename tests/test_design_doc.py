"""docs/design.md's worked examples run as written."""

import re
from pathlib import Path

from maestro_jax import samplers

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def test_design_doc_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", DESIGN.read_text(), re.S)
  assert blocks, "docs/design.md should show how to add a sampler"
  try:
    for block in blocks:
      exec(compile(block, str(DESIGN), "exec"), {})  # noqa: S102 - our own documentation
    assert "half_rank" in samplers.SAMPLERS
  finally:
    samplers.SAMPLERS.pop("half_rank", None)  # leave the registry as other tests expect it
