"""LeNet-5 on MNIST: SGD momentum 0.9, wd 1e-4, batch 128, 12 epochs, group lasso 3e-4.

Measured here (whole process on an idle 2-core CPU; greedy export to a budget
of 170,158 MACs, 50% of the full-rank factorized MACs, no fine-tuning); the
rows after the first ran 10 epochs, with the overrides shown on the config of
their time:

| overrides | accuracy | ranks fc1, fc2 | params | wall | export at 50% MACs |
|---|---|---|---|---|---|
| (this config: 12 epochs, independent sampler from 40% of each rank up) | 98.96% | 52/120, 41/84 | 31,542 | 64 s | 98.93% |
| ``epochs=10 sampler_kwargs={'min_fraction': 0.25}`` (the config before) | 98.91% | 60/120, 48/84 | 35,978 | 83 s | 98.96% |
| ``sampler_kwargs={} loss=distill`` (the config before that) | 98.86% | 65/120, 49/84 | 38,062 | 113 s | 98.65% |
| ``sampler=single_layer`` (the paper's default sampler) | 98.99% | 61/120, 48/84 | 36,354 | 86 s | 97.74% |

Since the layers' init is drawn in one compiled program per layer (the same
kernels; SVD factors that differ from the op-by-op draw in sign and rounding),
the config before gives 98.80% / 99.07% / 98.69% for seeds 0 / 1 / 2 (fc1
60/60/60, fc2 48/47/48, 65-73 s): its 98.91% was one draw of a spread of about
0.4%. Two more epochs alone gave 98.96% / 99.03% / 98.65% (fc1 50); two more
epochs with each keep count drawn from 40% of the rank up (this config) give
99.08% / 99.16% / 98.98% with fc1 52/53/52 and fc2 41/41/40, in 77 / 64 / 77 s
with peak RSS 721 / 710 / 675 MB: the sampler no longer trains truncations
below 40% that no budget of interest deploys. With conv1 on its factor path in
the train step (``rules.SHIFTED_SUM_COPIES``; the same function, other float
rounding) the seeds give 98.96% / 99.14% / 98.95%, fc1 52/53/52, fc2 41/41/40,
in 64 / 70 / 67 s with peak RSS 691 / 748 / 697 MB (a second round, the machine
slower: 86 / 79 / 76 s).

The single-layer sampler rarely truncates the small conv layers (conv2 is picked
in 16 of 236 pairs), so their low ranks stay weak. Sampling every layer each
step trains the truncations a deployment uses; drawing each keep count from 25%
of the rank up skips the tiny ones that would cost the full model accuracy
(from 1 up, with the paper's loss, it reached 98.33%), and from 40% up the
full model is a little stronger still. The paper's own setting
is ``mnist_lenet_paper``.

Reads the original IDX files when a ``shared/data/mnist`` folder sits beside the
repository (or ``idx_dir=PATH``); otherwise tfds's prepared ``mnist``.
"""

from ..config import Config


def get_config() -> Config:
  return Config(dataset="mnist", idx_dir="auto", model="lenet5", epochs=12, batch_size=128, learning_rate=0.02,
                schedule="cosine", momentum=0.9, weight_decay=1e-4, sampler="independent",
                sampler_kwargs={"min_fraction": 0.4}, loss="maestro", lasso=3e-4, shrink_threshold=1e-5)
