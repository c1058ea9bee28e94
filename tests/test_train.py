"""Tests for the training runner: configs, a whole run, kill-and-resume, shrinking, sharding, failures."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import maestro_jax
from maestro_jax import models
from maestro_train import config as config_lib
from maestro_train import main as main_lib
from maestro_train import train as train_lib

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> config_lib.Config:
  """Digits, a one-hidden-layer MLP, 2 epochs of 22 steps, a lasso strong enough to shrink, every cut resliced."""
  base = config_lib.load("digits_mlp")
  fields = dict(model_kwargs={"hidden": (32,)}, epochs=2, batch_size=64, learning_rate=0.1, lasso=1e-2,
                shrink_threshold=5e-2, rank_quantum=1, reslice_min_saving=0.0, checkpoint_every_steps=5,
                log_every_steps=5, eval_batch_size=128)
  fields.update(changes)
  return dataclasses.replace(base, **fields).validate()


# ----------------------------------------------------------------------------- configs and CLI


def test_every_named_config_loads_and_validates():
  assert {"digits_mlp", "mnist_lenet", "fashion_mnist_lenet", "cifar10_resnet18", "cifar10_vgg19",
          "mnist_transformer"} <= set(config_lib.available())
  for name in config_lib.available():
    assert config_lib.load(name).validate().model in config_lib.registry_choices()["model"]


def test_overrides_parse_literals_and_reject_bad_values():
  config = config_lib.override(config_lib.load("digits_mlp"), ["epochs=3", "lasso=1e-3", "sampler=none",
                                                              "model_kwargs={'hidden': (8,)}"])
  assert (config.epochs, config.lasso, config.sampler, config.model_kwargs) == (3, 1e-3, "none", {"hidden": (8,)})
  with pytest.raises(ValueError, match=r"sampler='nope' is not valid; choose one of single_layer, independent"):
    config_lib.override(config, ["sampler=nope"])
  with pytest.raises(ValueError, match=r"unknown config key 'epoch'; valid keys: task, dataset"):
    config_lib.override(config, ["epoch=3"])
  with pytest.raises(ValueError, match=r"override 'epochs' is not key=value"):
    config_lib.override(config, ["epochs"])
  with pytest.raises(ValueError, match=r"epochs=0 must be >= 1"):
    config_lib.override(config, ["epochs=0"])
  with pytest.raises(ValueError, match=r"unknown config 'nope'; choose one of .*digits_mlp"):
    config_lib.load("nope")
  # A config's sampler_kwargs belong to its sampler: another sampler on the command line drops them.
  lenet = config_lib.load("mnist_lenet")
  assert lenet.sampler_kwargs == {"min_fraction": 0.4}
  assert config_lib.override(lenet, ["sampler=single_layer"]).sampler_kwargs == {}
  assert config_lib.override(lenet, ["lasso=1e-3"]).sampler_kwargs == {"min_fraction": 0.4}
  assert config_lib.override(lenet, ["sampler=independent", "sampler_kwargs={'min_fraction': 0.5}"]
                             ).sampler_kwargs == {"min_fraction": 0.5}
  with pytest.raises(ValueError, match=r"sampler_kwargs min_fraction not taken by sampler 'single_layer'; it takes "
                                       r"none"):
    config_lib.override(lenet, ["sampler=single_layer", "sampler_kwargs={'min_fraction': 0.5}"])


def test_cli_prints_one_line_errors(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main_lib.cli(["digits_mlp", "optimizer=lbfgs"])
  message = str(exit_info.value.code)
  assert message.startswith("maestro-train: error: config: optimizer='lbfgs' is not valid; choose one of sgd")
  assert "\n" not in message


# ----------------------------------------------------------------------------- a whole run


def test_run_writes_metrics_plots_summary_and_shrinks(tmp_path):
  summary = train_lib.train_and_evaluate(tiny_config(), tmp_path, progress=False)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  for name in ("ranks.png", "accuracy.png", "summary.txt", "summary.json", "config.json"):
    assert (tmp_path / name).stat().st_size > 0
  assert summary["test_accuracy"] > 0.5  # 44 steps; chance is 0.1
  ranks = {name: rank for name, (rank, cap) in summary["ranks"].items()}
  assert ranks["layers.0"] < 32, "the lasso should have cut hidden components"
  assert summary["params"]["shrunk"] < summary["params"]["factorized_full_rank"]
  assert summary["params"]["dense"] == 64 * 32 + 32 + 32 * 10 + 10


def test_reslices_weigh_pending_cuts_by_multiply_adds(tmp_path, monkeypatch):
  calls = []
  shrink = train_lib.maestro_jax.shrink
  monkeypatch.setattr(train_lib.maestro_jax, "shrink", lambda *a, **k: calls.append(k) or shrink(*a, **k))
  train_lib.train_and_evaluate(tiny_config(epochs=1), tmp_path, progress=False)
  # Digits (64 pixels) -> 32 -> 10: one position per example, so a component costs d_in + d_out multiply-adds.
  assert calls and calls[0]["component_costs"] == {"layers.0": 64 + 32, "layers.1": 32 + 10}
  # A convolution's component costs its positions times that: LeNet's conv1 maps 28 x 28 -> 24 x 24 pixels.
  lenet = models.make_model("lenet5", num_classes=10, image_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  view, params, model_state = train_lib.training.FunctionalModel.from_module(lenet)
  positions = view.layer_positions(params, model_state, (28, 28, 1))
  macs = train_lib.component_macs(params, positions)
  assert positions["conv1"] == 24 * 24 and macs["conv1"] == 24 * 24 * (5 * 5 * 1 + 6)
  assert macs["fc1"] == 1 * (256 + 120)


def test_reslices_only_when_the_rest_of_the_run_pays_for_the_recompile(tmp_path, monkeypatch):
  def run(workdir):
    train_lib.train_and_evaluate(tiny_config(reslice_min_saving=0.01), workdir, progress=False)
    loaded = train_lib.load_run(workdir)
    caps = maestro_jax.capacities(loaded.state["params"])
    return caps, loaded.ranks

  # Two digits epochs free far fewer multiply-adds than a recompile costs: ranks fall, shapes stay.
  caps, ranks = run(tmp_path / "short")
  assert caps == {"layers.0": 32, "layers.1": 10} and ranks["layers.0"] < 32
  monkeypatch.setattr(train_lib, "RESLICE_MIN_SAVED_MACS", 0.0)
  caps, ranks = run(tmp_path / "paid")
  assert caps["layers.0"] == ranks["layers.0"] < 32


def test_restore_after_shrink_reads_saved_shapes(tmp_path):
  train_lib.train_and_evaluate(tiny_config(), tmp_path, progress=False)
  run = train_lib.load_run(tmp_path, optimizer_state=True)
  caps = maestro_jax.capacities(run.state["params"])
  assert caps["layers.0"] < 32
  assert caps == run.ranks  # rank_quantum=1: capacity is the rank
  momentum = run.state["opt_state"][1][0].trace
  assert momentum["layers"][0]["a"].shape == run.state["params"]["layers"][0]["a"].shape


def test_small_cuts_keep_the_shapes_and_zero_the_cut_components_and_lasso_epochs_end_the_penalty(tmp_path):
  train_lib.train_and_evaluate(tiny_config(reslice_min_saving=0.99, lasso_epochs=1), tmp_path, progress=False)
  # The loss is the task loss plus lambda times the penalty in epoch 1, the task loss alone in epoch 2.
  first, second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert first["penalty"] > 0 and second["penalty"] > 0
  assert first["train_loss"] - first["train_task_loss"] == pytest.approx(1e-2 * first["penalty"], rel=1e-4)
  assert second["train_loss"] == pytest.approx(second["train_task_loss"], abs=1e-6)
  run = train_lib.load_run(tmp_path)
  a = np.asarray(run.state["params"]["layers"][0]["a"])
  rank = run.ranks["layers.0"]
  assert rank < a.shape[-1] == 32  # the rank shrank, the shape did not (the cut frees under 99%)
  assert np.all(a[:, rank:] == 0) and np.any(a[:, :rank] != 0)


@pytest.mark.parametrize("quantum", [1, 64])
def test_train_step_compiles_once_per_capacity(tmp_path, monkeypatch, quantum):
  steps = []
  make = train_lib.training.make_train_step
  monkeypatch.setattr(train_lib.training, "make_train_step", lambda *a, **k: steps.append(make(*a, **k)) or steps[-1])
  summary = train_lib.train_and_evaluate(tiny_config(rank_quantum=quantum, epochs=3), tmp_path, progress=False)
  capacities = [tuple(sorted(r["ranks"].values())) for r in
                (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())]
  assert summary["ranks"]["layers.0"][0] < 32, "ranks must shrink for this test to mean anything"
  if quantum == 64:  # Ranks change, capacities (32 and 10, both below the quantum) never do.
    assert steps[0]._cache_size() == 1
  else:  # One compile per distinct capacity set the epochs trained with (ranks never grow back).
    trained_with = [(10, 32)] + capacities[:-1]
    assert steps[0]._cache_size() == len(set(trained_with)) > 1


def test_workdir_of_another_config_is_refused(tmp_path):
  train_lib.train_and_evaluate(tiny_config(epochs=1), tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"holds checkpoints of another config \(model_kwargs"):
    train_lib.train_and_evaluate(tiny_config(epochs=1, model_kwargs={"hidden": (16,)}), tmp_path, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  train_lib.train_and_evaluate(tiny_config(epochs=1), tmp_path, progress=False)
  good_step = train_lib.load_run(tmp_path).state["step"]
  with pytest.raises(train_lib.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopped. The newest finite "
                                                        r"checkpoint, step 22, is kept"):
    train_lib.train_and_evaluate(tiny_config(epochs=2, learning_rate=1e12), tmp_path, progress=False,
                                 allow_changes=True)
  assert int(train_lib.load_run(tmp_path).state["step"]) == int(good_step)


_KILL_SCRIPT = """
import os, signal, sys, dataclasses
sys.path.insert(0, {tests!r})
from maestro_jax import training
from maestro_train import train
from test_train import tiny_config

make = training.make_train_step
def killing_make(*args, **kwargs):
  step = make(*args, **kwargs)
  calls = [0]
  def wrapped(state, batch, key):
    calls[0] += 1
    if calls[0] == {kill_at}:
      train.jax.block_until_ready(state)
      os.kill(os.getpid(), signal.SIGKILL)
    return step(state, batch, key)
  return wrapped
training.make_train_step = killing_make
train.train_and_evaluate(tiny_config(), {workdir!r}, progress=False)
"""


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
  reference = tmp_path / "reference"
  train_lib.train_and_evaluate(tiny_config(), reference, progress=False)

  resumed = tmp_path / "resumed"
  # Step 33 is mid-epoch 2 (22 steps an epoch): after the epoch-1 shrink and a mid-epoch checkpoint.
  script = _KILL_SCRIPT.format(tests=str(REPO / "tests"), kill_at=33, workdir=str(resumed))
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  killed_at = train_lib.load_run(resumed).state["step"]
  assert 22 < int(killed_at) < 44, "the kill should leave a mid-epoch checkpoint of epoch 2"

  train_lib.train_and_evaluate(tiny_config(), resumed, progress=False)
  a, b = train_lib.load_run(reference).state, train_lib.load_run(resumed).state
  assert int(a["step"]) == int(b["step"]) == 44
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  history = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert history[-1] == 2


# ----------------------------------------------------------------------------- data parallelism


def test_eight_simulated_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_check.py")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "devices: 8" in proc.stdout and "sharded step matches" in proc.stdout and "restored sharded" in proc.stdout


# ----------------------------------------------------------------------------- tfds datasets


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_tfds_dataset_trains_under_mock_data(tmp_path, dataset):
  config = dataclasses.replace(tiny_config(epochs=1, batch_size=16, eval_batch_size=16), dataset=dataset,
                               model="lenet5", model_kwargs={}, idx_dir=None)
  with tfds.testing.mock_data(num_examples=64):
    summary = train_lib.train_and_evaluate(config, tmp_path, progress=False)
  assert summary["epochs"] == 1 and summary["ranks"]["fc1"][1] == 120


def test_cli_turns_on_the_persistent_compilation_cache_off_cpu(tmp_path, monkeypatch):
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  try:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    main_lib.use_compilation_cache()  # this CPU: no cache
    assert jax.config.jax_compilation_cache_dir == saved["jax_compilation_cache_dir"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    main_lib.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "maestro_train" / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.2
    jax.config.update("jax_compilation_cache_dir", saved["jax_compilation_cache_dir"])
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # the user's setting wins, even "no cache"
    main_lib.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == saved["jax_compilation_cache_dir"]
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
