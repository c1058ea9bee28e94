"""End-to-end tests of the maestro-sweep and maestro-export command lines (train/deploy.py)."""

import dataclasses
import json

import pytest

from maestro_train import config as config_lib
from maestro_train import deploy
from maestro_train import train as train_lib


def _config(**changes):
  base = config_lib.load("digits_mlp")
  return dataclasses.replace(base, epochs=1, model_kwargs={"hidden": (32,)}, batch_size=64, eval_batch_size=200,
                             checkpoint_every_steps=1000, log_every_steps=1000, **changes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  train_lib.train_and_evaluate(_config(), path, progress=False)
  return path


@pytest.fixture(scope="module")
def dense_workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("dense")
  train_lib.train_and_evaluate(_config(factorized=False, lasso=0.0), path, progress=False)
  return path


def _error(fn, argv):
  with pytest.raises(SystemExit) as info:
    fn(argv)
  message = info.value.code
  assert isinstance(message, str)  # sys.exit(message): exit status 1, the message on stderr
  return message


def test_sweep_cli(workdir, tmp_path, capsys):
  out = tmp_path / "sweep"
  result = deploy.sweep_cli(["--checkpoint", str(workdir), "--fractions", "0.25,0.5,1", "--out", str(out),
                             "--chunk-size", "2"])
  for name in ("sweep.json", "sweep.png", "sweep.txt"):
    assert (out / name).exists()
  printed = capsys.readouterr().out
  assert "fraction" in printed and "accuracy" in printed and "MACs" in printed
  saved = json.loads((out / "sweep.json").read_text())
  assert set(saved["families"]) == {"fraction", "global", "svd"} and saved["dense"] is None
  assert "no dense baseline" in saved["families"]["svd"]["label"]
  summary = json.loads((workdir / "summary.json").read_text())
  for fam in saved["families"].values():
    assert len(fam["accuracy"]) == len(fam["params"]) == len(fam["macs"]) == 3
    assert all(0 <= a <= 1 for a in fam["accuracy"])
    assert fam["params"] == sorted(fam["params"])
  # At fraction 1 every family is the trained model itself.
  for fam in ("fraction", "global"):
    assert abs(saved["families"][fam]["accuracy"][-1] - summary["test_accuracy"]) <= 1e-6
  assert result["ranks"] == saved["ranks"]


def test_sweep_cli_with_dense_baseline(workdir, dense_workdir, tmp_path):
  out = tmp_path / "sweep"
  result = deploy.sweep_cli(["--checkpoint", str(workdir), "--dense-checkpoint", str(dense_workdir),
                             "--fractions", "0.5,1", "--out", str(out)])
  dense_summary = json.loads((dense_workdir / "summary.json").read_text())
  assert abs(result["dense"]["accuracy"] - dense_summary["test_accuracy"]) <= 1e-6
  svd = result["families"]["svd"]
  assert "dense baseline" in svd["label"]
  # Full-rank SVD of the dense weights is the dense model (accuracy equal up to float rounding of the logits).
  assert abs(svd["accuracy"][-1] - result["dense"]["accuracy"]) <= 0.01
  assert (out / "sweep.png").exists()
  message = _error(deploy.sweep_cli, ["--checkpoint", str(workdir), "--dense-checkpoint", str(workdir)])
  assert message.startswith("maestro-sweep: error:") and "factorized=False" in message


def test_export_cli_budget(workdir, tmp_path):
  out = tmp_path / "export"
  before = json.loads((workdir / "summary.json").read_text())["params"]["shrunk"]
  budget = int(0.6 * before)
  report = deploy.export_cli(["--checkpoint", str(workdir), "--budget-params", str(budget), "--out", str(out),
                              "--calibration-size", "128", "--latency-runs", "3", "--latency-batch", "16"])
  for name in ("report.json", "report.md", "model/exported.json"):
    assert (out / name).exists()
  assert report["after"]["params"] <= budget < report["before"]["params"]
  assert report["greedy"]["metric"] == "params" and len(report["greedy"]["path"]) >= 2
  assert report["latency"]["batch_size"] == 16 and report["latency"]["exported_s"] > 0
  assert "speed-up" in (out / "report.md").read_text()
  model, params, state, saved = deploy.load_model(out)
  assert saved["ranks"] == report["ranks"]
  from maestro_jax import data as data_lib
  from maestro_jax import training
  run = train_lib.load_run(workdir)
  acc = training.evaluate(training.make_eval_step(model), params, state,
                          data_lib.batches(run.test_source, 200, train=False))["accuracy"]
  assert abs(acc - report["after"]["accuracy"]) <= 1e-6


def test_export_cli_ranks_and_macs(workdir, tmp_path):
  report = deploy.export_cli(["--checkpoint", str(workdir), "--ranks", "layers.0=4, layers.1=3", "--out",
                              str(tmp_path / "a"), "--latency-runs", "2", "--quantum", "8"])
  assert report["ranks"] == {"layers.0": 8, "layers.1": 8}  # snapped up to multiples of 8 (capped at 10)
  assert report["greedy"] is None
  macs = report["before"]["macs"]
  report = deploy.export_cli(["--checkpoint", str(workdir), "--budget-macs", str(macs // 2), "--out",
                              str(tmp_path / "b"), "--latency-runs", "2", "--step", "4"])
  assert report["after"]["macs"] <= macs // 2


def test_cli_errors(workdir, tmp_path):
  missing = str(tmp_path / "nope")
  for fn, prog in ((deploy.sweep_cli, "maestro-sweep"), (deploy.export_cli, "maestro-export")):
    argv = ["--checkpoint", missing] + ([] if fn is deploy.sweep_cli else ["--budget-macs", "100"])
    message = _error(fn, argv)
    assert message.startswith(f"{prog}: error:") and "does not exist" in message
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "config.json" in _error(deploy.export_cli, ["--checkpoint", str(empty), "--budget-macs", "100"])
  base = ["--checkpoint", str(workdir), "--out", str(tmp_path / "x")]
  message = _error(deploy.export_cli, base + ["--budget-macs", "10"])
  assert message.startswith("maestro-export: error:") and "smallest model" in message
  message = _error(deploy.export_cli, base + ["--ranks", "layers.1=11"])
  assert "above its capacity 10" in message and "\n" not in message
  message = _error(deploy.export_cli, base + ["--ranks", "fc9=3"])
  assert "unknown layer 'fc9'" in message and "layers.0" in message
  assert "--fractions" in _error(deploy.sweep_cli, ["--checkpoint", str(workdir), "--fractions", "0,2"])
  with pytest.raises(SystemExit) as info:  # argparse: a budget or ranks is required
    deploy.export_cli(["--checkpoint", str(workdir)])
  assert info.value.code == 2
  assert not (tmp_path / "x" / "report.json").exists()


def _tree_bytes(folder):
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_re_export_leaves_the_previous_export_whole(workdir, tmp_path, monkeypatch):
  out = tmp_path / "export"
  base = ["--checkpoint", str(workdir), "--out", str(out), "--latency-runs", "2"]
  first = deploy.export_cli(base + ["--ranks", "layers.0=8"])
  before = _tree_bytes(out)

  def failing_save(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(deploy.export_lib.ocp.StandardCheckpointer, "save", failing_save)
  message = _error(deploy.export_cli, base + ["--ranks", "layers.0=4"])
  assert message == "maestro-export: error: No space left on device"
  assert _tree_bytes(out) == before  # byte-identical, and no temporary folder left beside it
  assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]
  monkeypatch.undo()
  assert deploy.load_model(out)[3]["ranks"] == first["ranks"]


def test_export_at_rank_zero_keeps_the_bias(workdir, tmp_path):
  out = tmp_path / "export"
  report = deploy.export_cli(["--checkpoint", str(workdir), "--ranks", "layers.0=0", "--out", str(out),
                              "--latency-runs", "2"])
  model, params, state, saved = deploy.load_model(out)
  assert saved["ranks"]["layers.0"] == 0 and params["layers"][0]["a"].shape == (64, 0)
  assert report["after"]["params"] == 32 + 32 * 10 + 10  # the first layer is its bias alone


def test_export_flags_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(deploy, "_load_run", lambda *a, **k: pytest.fail("loaded the run before checking the flags"))
  for flag, value in (("--min-rank", "-1"), ("--step", "0"), ("--latency-runs", "0")):
    message = _error(deploy.export_cli, ["--checkpoint", str(tmp_path), "--budget-macs", "100", flag, value])
    assert message == f"maestro-export: error: {flag} must be >= {0 if flag == '--min-rank' else 1}, got {value}"
  _error(deploy.export_cli, ["--checkpoint", str(tmp_path), "--budget-macs", "100", "--step", "0", "--debug"])
  assert "Traceback" in capsys.readouterr().err


def test_export_merges_by_measured_latency_by_default(workdir, tmp_path, monkeypatch):
  from maestro_jax import export as export_lib
  timed = {}

  def chosen_by_timing(module, input_shape, ranks, *, batch_size):
    timed.update(input_shape=tuple(input_shape), batch_size=batch_size)
    return ["layers.1"]

  monkeypatch.setattr(export_lib, "dense_by_latency", chosen_by_timing)
  common = ["--checkpoint", str(workdir), "--fraction", "1", "--latency-runs", "2", "--latency-batch", "16"]
  report = deploy.export_cli(common + ["--out", str(tmp_path / "latency")])
  assert report["merge_rule"] == "latency" and timed == {"input_shape": (8, 8, 1), "batch_size": 16}
  # Exactly the timed choice: layers.1 one dense kernel, every other layer factors, whatever the size rule says.
  assert {name: layer["form"] for name, layer in report["layers"].items()} == {
      name: "dense" if name == "layers.1" else "factorized" for name in report["layers"]}
  by_size = deploy.export_cli(common + ["--out", str(tmp_path / "size"), "--merge", "size"])
  assert by_size["merge_rule"] == "size"
  budgeted = deploy.export_cli(common[:2] + ["--budget-params", "2000", "--out", str(tmp_path / "budget"),
                                             "--latency-runs", "2", "--calibration-size", "64"])
  assert budgeted["merge_rule"].startswith("size (a parameter or MAC budget")
  assert by_size["layers"] == export_lib.layer_forms(export_lib.export(
      train_lib.load_run(workdir).state["params"], by_size["ranks"]))
