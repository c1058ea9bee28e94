"""LeNet-5 on MNIST: SGD momentum 0.9, wd 1e-4, batch 128, 10 epochs, group lasso 3e-4.

Measured here (10 epochs, whole process on an idle 2-core CPU; greedy export to
a budget of 170,158 MACs, 50% of the full-rank factorized MACs, no fine-tuning):

| overrides | accuracy | ranks fc1, fc2 | params | wall | export at 50% MACs |
|---|---|---|---|---|---|
| (this config: independent sampler from 25% of each rank up) | 98.91% | 60/120, 48/84 | 35,978 | 83 s | 98.96% |
| ``sampler_kwargs={} loss=distill`` (the last config) | 98.86% | 65/120, 49/84 | 38,062 | 113 s | 98.65% |
| ``sampler=single_layer`` (the paper's default sampler) | 98.99% | 61/120, 48/84 | 36,354 | 86 s | 97.74% |

Since the layers' init is drawn in one compiled program per layer (the same
kernels; SVD factors that differ from the op-by-op draw in sign and rounding),
this config gives 98.80% / 99.07% / 98.69% for seeds 0 / 1 / 2, fc1 60/60/60,
fc2 48/47/48, in 73 / 68 / 65 s with peak RSS 853 / 827 / 802 MB: the table's
98.91% was one draw of a spread of about 0.4%.

The single-layer sampler rarely truncates the small conv layers (conv2 is picked
in 16 of 236 pairs), so their low ranks stay weak. Sampling every layer each
step trains the truncations a deployment uses; drawing each keep count from 25%
of the rank up skips the tiny ones that would cost the full model accuracy
(from 1 up, with the paper's loss, it reached 98.33%). The paper's own setting
is ``mnist_lenet_paper``.

Reads the original IDX files when a ``shared/data/mnist`` folder sits beside the
repository (or ``idx_dir=PATH``); otherwise tfds's prepared ``mnist``.
"""

from ..config import Config


def get_config() -> Config:
  return Config(dataset="mnist", idx_dir="auto", model="lenet5", epochs=10, batch_size=128, learning_rate=0.02,
                schedule="cosine", momentum=0.9, weight_decay=1e-4, sampler="independent",
                sampler_kwargs={"min_fraction": 0.25}, loss="maestro", lasso=3e-4, shrink_threshold=1e-5)
