"""The runner recalibrates BatchNorm statistics before it evaluates (docs/design.md).

The zoo's BatchNorm models (VGG-19, ResNet-18) are slow to compile, so the
runner's ``build_model`` is swapped for a tiny factorized MLP with one
BatchNorm; everything else is the real runner on scikit-learn digits.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from maestro_jax import nnx as mnx
from maestro_jax import training
from maestro_train import config as config_lib
from maestro_train import train as train_lib


class _BatchNormMLP(nnx.Module):
  """64 -> 16 (factorized) -> BatchNorm -> ReLU -> 10 (factorized)."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = mnx.Linear(64, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.fc2 = mnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x, *, train=False):
    x = self.fc1(x.reshape(x.shape[0], -1))
    return self.fc2(jax.nn.relu(self.norm(x, use_running_average=not train)))


def test_runner_evaluates_with_recalibrated_batch_norm_statistics(tmp_path, monkeypatch):
  config = dataclasses.replace(config_lib.load("digits_mlp"), epochs=1, batch_size=64, eval_batch_size=128,
                               lasso=0.0, shrink=False, recalibrate_batches=3, checkpoint_every_steps=1000,
                               log_every_steps=5).validate()
  monkeypatch.setattr(train_lib, "build_model", lambda config, source: _BatchNormMLP(nnx.Rngs(config.seed)))
  evaluated = []
  evaluate = training.evaluate

  def recording_evaluate(eval_step, params, model_state, batches, keeps=None):
    result = evaluate(eval_step, params, model_state, batches, keeps)
    evaluated.append((jax.device_get(model_state), result))
    return result

  monkeypatch.setattr(training, "evaluate", recording_evaluate)
  train_lib.train_and_evaluate(config, tmp_path, progress=False)

  (used, result), = evaluated
  run = train_lib.load_run(tmp_path)
  trained = jax.device_get(run.state["model_state"])
  calibration = train_lib.calibration_images(run.train_source, config, 3)
  want = jax.jit(run.model.recalibrate)(run.state["params"], run.state["model_state"], calibration,
                                       run.state["ranks"])
  # The statistics change: the running averages after 22 steps are far from the exact ones ...
  gap = np.max(np.abs(np.asarray(trained["norm"]["mean"]) - np.asarray(want["norm"]["mean"])))
  assert gap > 1e-2, gap
  # ... and evaluation ran with the recalibrated ones.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6),
               used, want)
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["test_accuracy"] == pytest.approx(result["accuracy"], abs=1e-12)
