"""LeNet-5 on MNIST: SGD momentum 0.9, wd 1e-4, batch 128, 10 epochs, group lasso 3e-4.

Measured here (10 epochs, 2-core CPU; greedy export to 50% of the full-rank
factorized MACs, no fine-tuning):

| overrides | accuracy | ranks fc1, fc2 | params | export at 50% MACs |
|---|---|---|---|---|
| (this config: independent sampler, self-distillation) | 98.86% | 65/120, 49/84 | 38,062 | 98.65% |
| ``sampler=single_layer loss=maestro`` (the paper's default) | 98.98% | 61/120, 48/84 | 36,354 | 98.11% |
| ``sampler=single_layer loss=maestro lasso=1e-3`` | 98.60% | 16/120, 13/84 | 11,720 | 98.36% |

The single-layer sampler rarely truncates the small conv layers (conv2 is picked
in 16 of 236 pairs), so their low ranks stay weak; sampling every layer each
step and distilling the sampled model from the full one keeps both the full
model and its truncations strong. The paper's own setting is
``sampler=single_layer loss=maestro learning_rate=0.01 schedule=constant lasso=1e-4``.

Reads the original IDX files when a ``shared/data/mnist`` folder sits beside the
repository (or ``idx_dir=PATH``); otherwise tfds's prepared ``mnist``.
"""

from ..config import Config


def get_config() -> Config:
  return Config(dataset="mnist", idx_dir="auto", model="lenet5", epochs=10, batch_size=128, learning_rate=0.02,
                schedule="cosine", momentum=0.9, weight_decay=1e-4, sampler="independent", loss="distill",
                lasso=3e-4, shrink_threshold=1e-5)
