"""What every benchmark of the suite shares: the two modes' sizes, the reference models and the timed step.

The benchmarks themselves live in :mod:`benchmarks.training_steps`,
:mod:`benchmarks.deployment` and :mod:`benchmarks.end_to_end`; :mod:`benchmarks.suite`
runs them and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import maestro_jax
from maestro_jax import models
from maestro_jax import training

from benchmarks import timing

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
LASSO = 1e-4


# ------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes and repeats of one mode of the suite.

  Attributes:
    mode: ``'small'`` or ``'full'``.
    batch: MNIST-shape training batch.
    rounds: timed rounds of the MNIST-shape step benchmarks.
    inner: steps per function per round.
    big_models: also time VGG-19 and ResNet-18 at CIFAR shapes.
    big_width: their first-stage width (64 is the real network).
    big_batch: their batch.
    big_rounds: timed rounds for them.
    real_width_models: CIFAR-shape models also timed at the real width 64 (same batch).
    real_width_rounds: timed rounds for those.
    sweep_sizes: eval-set sizes of the sweep benchmark, each ``(examples,
      cold (cache-cleared) rounds, steady-state rounds)``.
    sweep_batch: evaluation batch of the sweep benchmark.
    sweep_configs: rank settings swept.
    export_rounds: rounds of the latency benchmark.
    export_inner: ``{batch: calls per round}``.
    compile_epochs: epochs of the compile-count runs.
    compile_hidden: hidden widths of their MLP.
    compile_quanta: rank quanta tried.
    aux_models: the MNIST-shape models of the step, ordered-dropout, freezing
      and export-latency benchmarks (the small mode's smoke test needs one).
    e2e_full: run real LeNet/MNIST for 2 epochs (else a subset).
  """

  mode: str
  batch: int = 128
  rounds: int = 15
  inner: int = 5
  big_models: bool = True
  big_width: int = 16
  big_batch: int = 32
  big_rounds: int = 5
  real_width_models: tuple = ("resnet18",)
  real_width_rounds: int = 8
  sweep_sizes: tuple = ((2000, 3, 5), (10000, 1, 2))
  sweep_batch: int = 1000
  sweep_configs: int = 16
  export_rounds: int = 15
  export_inner: tuple = ((1, 50), (128, 10))
  compile_epochs: int = 6
  compile_hidden: tuple = (256, 256)
  compile_quanta: tuple = (1, 8, 64)
  aux_models: tuple = ("mlp", "lenet5")
  e2e_full: bool = True


FULL = Settings(mode="full")
SMALL = Settings(mode="small", rounds=3, inner=2, big_models=False, sweep_sizes=((512, 1, 2),), sweep_batch=256,
                 export_rounds=3, export_inner=((1, 5), (128, 2)),
                 compile_epochs=3, compile_hidden=(32,), compile_quanta=(1, 8), aux_models=("mlp",), sweep_configs=4,
                 e2e_full=False)


# ------------------------------------------------------------------------------------------- helpers


def build(name: str, image_shape, *, factorized: bool, seed: int = 0, **kwargs):
  """``(FunctionalModel, params, model_state)`` of a reference model."""
  model = models.make_model(name, num_classes=10, image_shape=image_shape, factorized=factorized,
                            rngs=nnx.Rngs(seed), **kwargs)
  return training.FunctionalModel.from_module(model)


def paper_optimizer() -> optax.GradientTransformation:
  """The paper's LeNet optimizer: SGD momentum 0.9, coupled weight decay 1e-4, lr 0.01."""
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))


def random_batch(image_shape, batch: int, seed: int = 0) -> dict[str, jax.Array]:
  """A seeded batch of normal images and uniform labels (step timing does not depend on the values)."""
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(batch, *image_shape)).astype(np.float32)),
          "label": jnp.asarray(rng.integers(0, 10, size=(batch,)).astype(np.int32))}


def fraction_ranks(params, fraction: float) -> dict[str, int]:
  """``ceil(fraction * capacity)`` (at least 1) per factorized layer."""
  return {name: max(1, math.ceil(round(fraction * cap, 6))) for name, cap in maestro_jax.capacities(params).items()}


def stepper(fmodel, params, model_state, optimizer, batch, *, sampler, lasso: float):
  """A compiled, ready-to-time train step: ``(Stepper, flops, compile seconds)``."""
  # A private copy: the step donates its state, and variants may share leaves (e.g. biases shrink leaves alone).
  state = jax.tree.map(jnp.copy, training.init_state(params, model_state, optimizer))
  step = training.make_train_step(fmodel, optimizer, sampler=sampler, lasso=lasso)
  flops, seconds = timing.compile_stats(step, state, batch, jax.random.key(0))
  return timing.Stepper(step, state, batch, jax.random.key(1)), flops, seconds


def ms(seconds: float) -> float:
  """Seconds as milliseconds, for the tables."""
  return round(1e3 * seconds, 4)


def rounded(x: float) -> float:
  """A ratio as reported: a float to 4 decimals."""
  return round(float(x), 4)


class FrozenGradients:
  """A FunctionalModel view whose apply stops gradients at frozen factors (``stop_frozen_gradients``)."""

  def __init__(self, model: training.FunctionalModel, mask):
    self.model, self.mask = model, mask

  def apply(self, params, model_state, x, keeps=None, *, train: bool = False):
    return self.model.apply(maestro_jax.stop_frozen_gradients(params, self.mask), model_state, x, keeps,
                            train=train)


def section(title: str, baseline: str, columns: list[str]) -> dict[str, Any]:
  """An empty report section: the title, the baseline every ratio is against, the table's columns."""
  return {"title": title, "baseline": baseline, "columns": columns, "rows": [], "ratios": {}, "notes": []}
