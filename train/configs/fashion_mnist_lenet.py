"""LeNet-5 on Fashion-MNIST as in the paper: SGD lr 0.01, momentum 0.9, wd 1e-4, batch 128, lambda 1e-4.

Reads the original IDX files when a ``shared/data/fashion_mnist`` folder sits beside the
repository (or ``idx_dir=PATH``); otherwise tfds's prepared ``fashion_mnist``.
"""

from train.config import Config


def get_config() -> Config:
  return Config(dataset="fashion_mnist", idx_dir="auto", model="lenet5", epochs=10, batch_size=128, learning_rate=0.01,
                momentum=0.9, weight_decay=1e-4, lasso=1e-4, shrink_threshold=1e-5)
