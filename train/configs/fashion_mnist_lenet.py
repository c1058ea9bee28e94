"""LeNet-5 on Fashion-MNIST with the settings of ``mnist_lenet``.

Reads the original IDX files when a ``shared/data/fashion_mnist`` folder sits beside
the repository (or ``idx_dir=PATH``); otherwise tfds's prepared ``fashion_mnist``.
"""

import dataclasses

from . import mnist_lenet


def get_config():
  return dataclasses.replace(mnist_lenet.get_config(), dataset="fashion_mnist")
