"""The Colab notebook colab/maestro_tpu.ipynb: committed clean, and runnable top to bottom on CPU.

The run uses the notebook's SMALL setting (digits, a 64-unit MLP, 2 epochs), selected with the environment
variables the notebook reads (``MAESTRO_NOTEBOOK_SMALL=1``, ``MAESTRO_WORKDIR``), in a kernel on this very
interpreter (a kernelspec written to a temporary folder), with two host CPU devices so the data-parallel
path is exercised.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "maestro_tpu.ipynb"


def test_notebook_is_committed_clean():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code), \
      "clear the notebook's outputs before committing"
  tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill)"
  source = "".join(tagged[0]["source"])
  for name in ("REPO_URL", "CONFIG", "EPOCHS", "WORKDIR", "SMALL", "BUDGET"):
    assert f"\n{name} = " in "\n" + source


def _import_jupyter():
  """nbclient, nbformat and jupyter_client, or a skip when the test extra is not installed."""
  with warnings.catch_warnings():
    # jupyter_core < 6 warns (DeprecationWarning) on import that its default paths will move to platformdirs;
    # this test picks its own kernel folder, so the paths do not matter.
    warnings.filterwarnings("ignore", message="Jupyter is migrating its paths", category=DeprecationWarning)
    try:
      import ipykernel  # noqa: F401
      import nbclient
      import nbformat
      from jupyter_client.kernelspec import KernelSpecManager
      from jupyter_client.manager import KernelManager
    except ImportError as e:
      pytest.skip(f"running the notebook needs nbclient, nbformat and ipykernel (pip install -e '.[test]'): {e}")
  return nbclient, nbformat, KernelSpecManager, KernelManager


def test_notebook_runs_small_on_cpu(tmp_path):
  nbclient, nbformat, KernelSpecManager, KernelManager = _import_jupyter()
  # A kernelspec for this interpreter, so the kernel sees the same installed packages.
  kernels = tmp_path / "kernels"
  (kernels / "maestro-test").mkdir(parents=True)
  (kernels / "maestro-test" / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "maestro test", "language": "python"}))
  workdir = tmp_path / "run"
  env = dict(os.environ, MAESTRO_NOTEBOOK_SMALL="1", MAESTRO_WORKDIR=str(workdir), JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip(),
             JAX_NUMPY_RANK_PROMOTION="raise",  # as strict as conftest.py makes this process
             PYDEVD_DISABLE_FILE_VALIDATION="1")  # quiets debugpy's frozen-modules notice at kernel start
  env.pop("MPLBACKEND", None)  # the kernel's default, inline, is what a notebook user gets

  nb = nbformat.read(NOTEBOOK, as_version=4)
  km = KernelManager(kernel_name="maestro-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = nbclient.NotebookClient(nb, km=km, timeout=300, startup_timeout=120,
                                   resources={"metadata": {"path": str(tmp_path)}})
  try:
    # Raises CellExecutionError, with the failing cell's traceback. cleanup_kc: shut the kernel down and close
    # its channels after the run (by default nbclient leaves a kernel manager it did not create running).
    client.execute(env=env, cleanup_kc=True)
  finally:
    if km.has_kernel:
      km.shutdown_kernel(now=True)

  by_id = {c["id"]: c for c in nb.cells}
  for cell in nb.cells:
    assert not [o for o in cell.get("outputs", []) if o["output_type"] == "error"], cell["id"]

  def text(cell_id):
    return "".join(o.get("text", "") for o in by_id[cell_id]["outputs"] if o["output_type"] == "stream")

  def images(cell_id):
    return [o for o in by_id[cell_id]["outputs"] if o["output_type"] == "display_data" and "image/png" in o["data"]]

  assert "2 device(s)" in text("devices")
  assert "digits_mlp" in text("config") and "batch 64 (32 per device)" in text("config")
  assert "epoch 2:" in text("train")
  assert len(images("history")) == 2
  assert "fraction of every rank" in text("sweep") and "global singular-value budget" in text("sweep")
  assert len(images("plot-sweep")) == 1, "the sweep plot is shown inline"
  assert "greedy steps" in text("greedy")
  assert len(images("export")) == 1 and "saved to" in text("export")
  assert "test accuracy" in text("load")

  for name in ("config.json", "summary.json", "metrics.jsonl"):
    assert (workdir / name).is_file()
  assert any((workdir / "checkpoints").iterdir())
  saved = json.loads((workdir / "export" / "model" / "exported.json").read_text())
  report = saved["report"]
  dense_macs = json.loads((workdir / "summary.json").read_text())["macs"]["dense"]
  assert report["macs"] <= report["budget_macs"] == int(0.5 * dense_macs)
  assert 0.0 <= report["accuracy"] <= 1.0 and report["model"]["name"] == "mlp"
