"""Tests for ``maestro-compare``: the small setting end to end and Pufferfish's dense-to-factorized switch."""

import contextlib
import dataclasses
import io
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from maestro_jax import data as data_lib
from maestro_jax import training
from maestro_train import compare
from maestro_train import config as config_lib
from maestro_train import train as train_lib

EPOCHS = 2
ROW = re.compile(r"^\| (?P<dataset>[^|]+) \| (?P<method>[^|]+) \| (?P<model>[^|]+) \| (?P<acc>[^|]+) \| "
                 r"(?P<params>[^|]+) \| (?P<macs>[^|]+) \| (?P<seconds>[^|]+) \| (?P<cpu>[^|]+) \|$")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """The ``--small`` setting (digits, MLP) through the CLI, at 2 epochs: its folder, results and console text."""
  out = tmp_path_factory.mktemp("compare")
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    compare.compare_cli(["--small", "--epochs", str(EPOCHS), "--out", str(out)])
  return out, json.loads((out / "comparison.json").read_text()), console.getvalue()


def _table_rows(text):
  rows = []
  for line in text.splitlines():
    match = ROW.match(line)
    if match and match["dataset"].strip() not in ("dataset", "---"):
      rows.append({k: v.strip() for k, v in match.groupdict().items()})
  return rows


def test_table_has_every_method_with_parsable_numbers(small_run):
  out, results, _ = small_run
  text = (out / "comparison.md").read_text()
  assert "Small CI setting" in text and "scikit-learn 8x8 digits" in text
  rows = _table_rows(text)
  assert {r["method"] for r in rows} == set(compare.LABELS.values())
  assert {r["dataset"] for r in rows} == {"digits"}
  ranks = ", ".join(f"{k} {v}" for k, v in results["datasets"]["digits"]["methods"]["maestro"]["ranks"].items())
  assert any(r["method"] == "Maestro" and r["model"] == f"trained ranks ({ranks})" for r in rows)
  for r in rows:
    acc, seconds, cpu = float(r["acc"]), float(r["seconds"]), float(r["cpu"])
    params, macs = int(r["params"].replace(",", "")), int(r["macs"].replace(",", ""))
    assert 0.0 <= acc <= 100.0 and seconds > 0 and cpu > 0 and params > 0 and macs > 0
  # Each row is one point of a family in the JSON, in the same numbers.
  points = sum(len(m["family"]) for m in results["datasets"]["digits"]["methods"].values())
  assert len(rows) == points
  dense = next(r for r in rows if r["method"] == "Dense")
  assert float(dense["acc"]) == pytest.approx(
      100 * results["datasets"]["digits"]["methods"]["dense"]["point"]["accuracy"], abs=0.006)


def test_plot_and_json_families(small_run):
  out, results, _ = small_run
  png = out / "comparison.png"
  assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert results["small"] and results["epochs"] == EPOCHS and results["fractions"][0] == 1.0
  methods = results["datasets"]["digits"]["methods"]
  assert list(methods) == list(compare.METHODS)
  k = len(results["fractions"])
  for name, entry in methods.items():
    assert len(entry["family"]) == (k if name in ("maestro", "decomposable", "svd") else 1), name
    for q in entry["family"]:
      assert 0 <= q["accuracy"] <= 1 and q["params"] > 0 and q["macs"] > 0
    assert entry["train_seconds"] > 0 and entry["train_cpu_seconds"] > 0
  # Families get smaller with the fraction; their full-fraction points are the trained models.
  for name in ("maestro", "decomposable", "svd"):
    macs = [q["macs"] for q in methods[name]["family"]]
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0], name
  for name in ("maestro", "decomposable"):
    assert methods[name]["family"][0]["accuracy"] == pytest.approx(methods[name]["point"]["accuracy"], abs=1e-9)
  # Post-hoc SVD at full rank is the dense model itself.
  assert methods["svd"]["family"][0]["accuracy"] == pytest.approx(methods["dense"]["point"]["accuracy"], abs=1e-9)
  assert methods["svd"]["train_seconds"] >= methods["dense"]["train_seconds"]
  assert methods["svd"]["train_cpu_seconds"] == methods["dense"]["train_cpu_seconds"]
  # Pufferfish: warm-up + low-rank epochs add up; a quarter of the ranks, the first layer dense.
  puff = methods["pufferfish"]
  assert puff["config"]["epochs"] + puff["warmup_epochs"] == EPOCHS
  assert puff["config"]["rank_fraction"] == 0.25 and puff["config"]["dense_layers"] == ["layers.0"]
  assert "layers.0" not in puff["ranks"] and puff["point"]["params"] < methods["dense"]["point"]["params"]
  assert methods["spectral"]["config"]["frobenius_decay"] == compare.FROBENIUS_DECAY
  assert methods["spectral"]["config"]["weight_decay"] == 0.0
  # Every method's exact config is in the results, and each run's own fields are in the table.
  (setting,) = compare.make_settings(["digits"], epochs=EPOCHS, small=True, out=out)
  configs = compare.method_configs(setting, {"pufferfish_warmup": out / "digits" / "pufferfish_warmup"})
  for name in ("dense", "maestro", "decomposable", "pufferfish", "spectral"):
    assert methods[name]["config"] == json.loads(configs[name].to_json()), name
  assert puff["warmup_config"] == json.loads(configs["pufferfish_warmup"].to_json())
  assert methods["svd"]["config"] == methods["dense"]["config"] and methods["svd"]["truncates"] == "dense"
  text = (out / "comparison.md").read_text()
  assert "### Configs run on digits" in text
  assert any(line.startswith("| Maestro | ") and "`sampler=single_layer`" in line and "`loss=maestro`" in line
             for line in text.splitlines())


def test_console_reports_each_epoch_from_the_runs_own_records(small_run):
  """Epoch lines come from each run's metrics.jsonl; the runner's own console text goes to its log, unparsed."""
  out, results, console = small_run
  methods = results["datasets"]["digits"]["methods"]
  for name in ("dense", "maestro", "decomposable", "pufferfish_warmup", "pufferfish", "spectral"):
    records = compare.epoch_records(out / "digits" / name)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1)) and records, name
    for record in records:
      assert f"      {compare.format_epoch(record, len(records))}\n" in console, name
    assert "epoch 1: " in (out / "digits" / f"{name}.log").read_text(), name
    if name in methods:  # the last epoch's record is the run's reported result
      assert records[-1]["test_accuracy"] == pytest.approx(methods[name]["point"]["accuracy"], abs=1e-9), name
  assert "epoch 1: " not in console  # the runner's line, as it prints it, stays in the log
  assert compare.epoch_records(out / "nowhere") == []


@pytest.mark.parametrize("dense_layers", [(), ("layers.0",)])
def test_pufferfish_switch_at_full_rank_preserves_the_function(small_run, dense_layers):
  out, _, _ = small_run
  dense_dir = out / "digits" / "dense"
  dense = train_lib.load_run(dense_dir)
  config = dataclasses.replace(dense.config, factorized=True, init_from=str(dense_dir), rank_fraction=None,
                               dense_layers=dense_layers).validate()
  model = train_lib.build_model(config, dense.train_source)
  fmodel, params, state = training.FunctionalModel.from_module(model)
  assert params["layers"][1].keys() >= {"a", "b"} and ("kernel" in params["layers"][0]) == bool(dense_layers)

  batch = next(data_lib.batches(dense.test_source, 128, train=False))
  x = jnp.asarray(batch["image"])
  want, _ = dense.model.apply(dense.state["params"], dense.state["model_state"], x)
  got, _ = fmodel.apply(params, state, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)

  def accuracy(fm, p, s):
    batches = data_lib.batches(dense.test_source, 500, train=False)
    return training.evaluate(training.make_eval_step(fm), p, s, batches)["accuracy"]

  assert accuracy(fmodel, params, state) == accuracy(dense.model, dense.state["params"],
                                                     dense.state["model_state"])


def test_rerun_reuses_finished_runs(small_run, capsys):
  out, results, _ = small_run
  again = compare.run_comparison(["digits"], epochs=EPOCHS, out=out, small=True)
  assert "reusing the finished run" in capsys.readouterr().out
  assert all(e["reused"] for e in again["datasets"]["digits"]["methods"].values())
  assert "6 method(s) reused finished runs" in (out / "comparison.md").read_text()
  for name, entry in again["datasets"]["digits"]["methods"].items():
    first = results["datasets"]["digits"]["methods"][name]
    if name != "svd":  # post-hoc SVD is redone (it trains nothing); its seconds are measured again
      assert entry["train_seconds"] == first["train_seconds"], name
    assert [q["accuracy"] for q in entry["family"]] == [q["accuracy"] for q in first["family"]], name


def test_missing_data_and_bad_options_are_clear_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    compare.compare_cli(["--datasets", "mnist", "--idx-root", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "mnist: the offline data is missing" in err and "--idx-root" in err and "tfds build mnist" in err
  assert "--small" in err
  with pytest.raises(compare.DataMissingError, match="fashion_mnist: the offline data is missing"):
    compare.make_settings(["fashion_mnist"], epochs=3, small=False, out=tmp_path, idx_root=str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown dataset 'digits'; choose from mnist, fashion_mnist \(digits only"):
    compare.make_settings(["digits"], epochs=3, small=False, out=tmp_path)
  with pytest.raises(ValueError, match="--epochs must be >= 2"):
    compare.make_settings(["digits"], epochs=1, small=True, out=tmp_path)
  for argv in (["--small", "--datasets", "cifar10"], ["--small", "--fractions", "0,1"],
               ["--small", "--rank-fraction", "1.5"]):
    with pytest.raises(SystemExit):
      compare.compare_cli(argv + ["--out", str(tmp_path)])
    assert "maestro-compare: error:" in capsys.readouterr().err


def test_method_configs_follow_the_brief(tmp_path):
  (setting,) = compare.make_settings(["digits"], epochs=10, small=True, out=tmp_path)
  dirs = {name: tmp_path / name for name in ("pufferfish_warmup",)}
  configs = compare.method_configs(setting, dirs)
  assert not configs["dense"].factorized
  assert (configs["maestro"].sampler, configs["maestro"].shrink) == ("single_layer", True)
  assert configs["maestro"].lasso > 0
  d = configs["decomposable"]
  assert (d.sampler, d.loss, d.alpha, d.lasso, d.shrink) == ("decomposable", "decomposable", 0.5, 0.0, False)
  p = configs["pufferfish"]
  assert p.init_from == str((tmp_path / "pufferfish_warmup").resolve()) and p.rank_fraction == 0.25
  assert (p.sampler, p.lasso, p.shrink, p.dense_layers) == ("none", 0.0, False, ("layers.0",))
  assert configs["pufferfish_warmup"].epochs + p.epochs == 10 and configs["pufferfish_warmup"].epochs == 2
  s = configs["spectral"]
  assert (s.sampler, s.lasso, s.shrink, s.weight_decay, s.frobenius_decay) == ("none", 0.0, False, 0.0, 1e-4)
  for c in configs.values():
    assert isinstance(c, config_lib.Config) and c.learning_rate == 0.02 and c.schedule in ("cosine", "constant")


def _lenet_setting(tmp_path):
  """The MNIST setting's configs without reading any data, from a base with a recipe of its own (none may leak)."""
  base = dataclasses.replace(config_lib.load("mnist_lenet"), idx_dir=str(tmp_path), lasso=0.0, loss="distill",
                             sampler_kwargs={"min_fraction": 0.25}, lasso_epochs=3)
  return compare.Setting("mnist", base, maestro_lasso=3e-4, first_layer="conv1", description="LeNet-5")


def test_every_method_names_its_loss_whatever_the_base(tmp_path):
  setting = _lenet_setting(tmp_path)
  assert setting.base.loss == "distill"  # would leak two-pass distillation into every method otherwise
  configs = compare.method_configs(setting, {"pufferfish_warmup": tmp_path / "warm"})
  assert all(c.sampler_kwargs == {} and c.lasso_epochs == 0 for c in configs.values())
  assert {name: c.loss for name, c in configs.items()} == {
      "dense": "maestro", "maestro": "maestro", "decomposable": "decomposable", "pufferfish_warmup": "maestro",
      "pufferfish": "maestro", "spectral": "maestro"}
  m = configs["maestro"]
  assert (m.sampler, m.loss, m.lasso, m.shrink, m.factorized) == ("single_layer", "maestro", 3e-4, True, True)


def test_markdown_states_every_run_config(tmp_path):
  setting = _lenet_setting(tmp_path)
  configs = compare.method_configs(setting, {"pufferfish_warmup": tmp_path / "warm"})
  as_dict = {name: compare._config_dict(c) for name, c in configs.items()}  # pylint: disable=protected-access
  point = {"setting": "trained", "fraction": 1.0, "accuracy": 0.5, "params": 10, "macs": 10}
  methods = {}
  for method in compare.METHODS:
    run = "dense" if method == "svd" else method
    methods[method] = {"label": compare.LABELS[method], "config": as_dict[run], "point": point, "family": [point],
                       "train_seconds": 1.0}
  methods["pufferfish"]["warmup_config"] = as_dict["pufferfish_warmup"]
  results = {"small": False, "epochs": 10, "fractions": [1.0], "rank_fraction": 0.25, "warmup_epochs": 2,
             "maestro_lasso": {"mnist": 3e-4}, "wall_seconds": 1.0,
             "datasets": {"mnist": {"description": "LeNet-5", "methods": methods}}}
  text = compare.format_markdown(results)
  shared = next(line for line in text.splitlines() if line.startswith("Shared by every run: "))
  rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and " | `" in line}
  assert set(rows) == {"Dense", "Maestro", "Decomposable-Net", "Pufferfish (dense warm-up)", "Pufferfish",
                       "Spectral init + Frobenius decay"}
  for label, run in (("Dense", "dense"), ("Maestro", "maestro"), ("Decomposable-Net", "decomposable"),
                     ("Pufferfish (dense warm-up)", "pufferfish_warmup"), ("Pufferfish", "pufferfish"),
                     ("Spectral init + Frobenius decay", "spectral")):
    stated = dict(item.strip("`").split("=", 1) for item in re.findall(r"`[^`]+`", shared + rows[label]))
    omitted = set(compare.BOOKKEEPING_FIELDS)
    assert set(stated) == set(as_dict[run]) - omitted, label  # every field, once
    for key in ("loss", "sampler", "lasso", "shrink", "factorized", "epochs", "weight_decay", "frobenius_decay"):
      assert stated[key] == compare._format_value(as_dict[run][key]), (label, key)  # pylint: disable=protected-access
  assert "`loss=maestro`" in rows["Maestro"] and "`sampler=single_layer`" in rows["Maestro"]


def test_reports_name_paths_from_the_repository():
  repo = compare.layout.REPO
  assert compare.repo_relative(repo / "shared" / "data" / "mnist") == "shared/data/mnist"
  assert compare.repo_relative(repo.parent / "shared" / "data" / "mnist") == "../shared/data/mnist"
  assert compare.repo_relative("/far/away/runs/mnist/warmup") == "…/mnist/warmup"
  assert compare.repo_relative("runs/a") == "runs/a"
  assert compare._format_value(str(repo / "x")) == "x"  # pylint: disable=protected-access
