"""The default run: scikit-learn's 8x8 digits, an MLP, offline, well under 2 minutes on 2 CPU cores."""

from train.config import Config


def get_config() -> Config:
  return Config(dataset="digits", model="mlp", model_kwargs={"hidden": (128, 64)}, epochs=15, batch_size=64,
                learning_rate=0.05, lasso=1e-4, shrink_threshold=1e-3, checkpoint_every_steps=100,
                log_every_steps=10)
