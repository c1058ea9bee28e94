"""maestro-train with a model given by import path: the README's worked example, NNX and Linen, end to end.

The two files come verbatim from README.md into a folder outside the repository;
training, ``maestro-sweep`` and ``maestro-export`` run on the workdir, and the
export loads back and scores what its report says.
"""

import json
import re
import subprocess
import sys
import shutil
from pathlib import Path

import jax
import pytest

from maestro_jax import functional
from maestro_jax import training
from maestro_train import deploy
from maestro_train import main as main_lib
from maestro_train import train as train_lib

REPO = Path(__file__).resolve().parents[1]
FAST = ["epochs=2", "checkpoint_every_steps=1000", "log_every_steps=1000", "eval_batch_size=200"]


def _readme_file(name: str) -> str:
  """The README's python block that starts with ``# <name>``."""
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  found = [b for b in blocks if b.startswith(f"# {name}\n")]
  assert len(found) == 1, f"README.md should hold one python block starting with '# {name}'"
  return found[0]


@pytest.fixture
def project(tmp_path, monkeypatch):
  """The README's my_models.py and my_config.py in a folder of their own; the tests run from another folder."""
  folder = tmp_path / "project"
  folder.mkdir()
  (folder / "my_models.py").write_text(_readme_file("my_models.py"))
  (folder / "my_config.py").write_text(_readme_file("my_config.py"))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  yield folder
  sys.modules.pop("my_models", None)  # each test imports its own copy


def _sweep_and_export(workdir: Path, tmp_path: Path) -> dict:
  sweep = deploy.sweep_cli(["--checkpoint", str(workdir), "--fractions", "0.5,1", "--out", str(tmp_path / "sweep")])
  summary = json.loads((workdir / "summary.json").read_text())
  assert abs(sweep["families"]["fraction"]["accuracy"][-1] - summary["test_accuracy"]) <= 1e-6
  out = tmp_path / "export"
  # The size rule: whether a layer is smaller merged is a fact; which form is faster is a timing.
  report = deploy.export_cli(["--checkpoint", str(workdir), "--fraction", "0.5", "--out", str(out),
                              "--latency-runs", "2", "--latency-batch", "8", "--merge", "size"])
  assert report["after"]["params"] < report["before"]["params"]
  model, params, state, saved = deploy.load_model(out)
  assert saved["ranks"] == report["ranks"]
  run = train_lib.load_run(workdir)
  batches = run.task.eval_batches(run.sources.evaluation, run.config, 200)
  accuracy = training.evaluate(training.make_eval_step(model), params, state, batches)["accuracy"]
  assert abs(accuracy - report["after"]["accuracy"]) <= 1e-6
  return report


def test_nnx_factory_by_import_path_trains_sweeps_and_exports(project, tmp_path):
  workdir = tmp_path / "runs" / "mlp"
  main_lib.cli([str(project / "my_config.py"), "model=my_models:make_mlp", "model_kwargs={'hidden': 24}", *FAST,
                "--workdir", str(workdir), "--no-progress"])
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == "my_models:make_mlp" and saved["python_path"] == [str(project)]
  run = train_lib.load_run(workdir)
  assert isinstance(run.model, functional.FunctionalModel)
  assert run.initial_capacities == {"fc1": 24, "fc2": 10}  # the factory got model_kwargs and the data's sizes
  _sweep_and_export(workdir, tmp_path)


def test_linen_factory_with_batch_norm_from_the_command_line(project, tmp_path):
  workdir = tmp_path / "runs" / "cnn"
  maestro_train = shutil.which("maestro-train") or pytest.skip("maestro-train is not installed")
  proc = subprocess.run([maestro_train, str(project / "my_config.py"), *FAST, "--workdir", str(workdir),
                         "--no-progress"], capture_output=True, text=True, timeout=300, cwd=tmp_path / "elsewhere")
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = train_lib.load_run(workdir)  # this process imports my_models through the recorded python_path
  assert isinstance(run.model, functional.LinenModel)
  stats = run.state["model_state"]["batch_stats"]["bn"]
  assert float(jax.numpy.abs(stats["mean"]).sum()) > 0, "BatchNorm statistics should have been trained"
  report = _sweep_and_export(workdir, tmp_path)
  assert report["model"]["config"]["model"] == "my_models:make_cnn"


def test_import_path_errors_are_one_line(project, tmp_path):
  config = str(project / "my_config.py")
  for overrides, expected in ((["model=my_models:nope"], "has no attribute 'nope'"),
                              (["model=no_such_module:make"], "cannot import 'no_such_module'"),
                              (["model=my_models"], "or an import path 'package.module:factory'"),
                              (["factorized=False"], "takes no 'factorized' argument")):
    with pytest.raises(SystemExit) as info:
      main_lib.cli([config, *overrides, "epochs=1", "--workdir", str(tmp_path / "w"), "--no-progress"])
    message = str(info.value.code)
    assert message.startswith("maestro-train: error:") and expected in message and "\n" not in message, message


def test_nnx_only_features_refuse_a_linen_model_in_one_line():
  import flax.linen as nn
  from maestro_train import modeling

  module = nn.Dense(3)
  view, params, state = functional.from_module(module, module.init(jax.random.key(0), jax.numpy.ones((1, 2))))
  with pytest.raises(ValueError, match=r"^init_from \(SVD of a dense run\) works with NNX models only; this run's "
                                       r"model is a Linen module$"):
    modeling.to_nnx_module(view, params, state, "init_from (SVD of a dense run)")
