"""VGG-19 (CIFAR form) on CIFAR-10: SGD 0.1, step decay, 300 epochs, random crop and flip."""

from ..config import Config


def get_config() -> Config:
  return Config(dataset="cifar10", augment=True, model="vgg19", epochs=300, batch_size=128, learning_rate=0.1,
                schedule="step", lasso=16e-6, shrink_threshold=1e-5, rank_quantum=8,
                # bfloat16 activations and matmuls on a GPU/TPU, float32 on CPU: 'auto' is decided when the run
                # starts, on its backend (parameters, optimizer state and loss are float32 either way).
                compute_dtype="auto")
