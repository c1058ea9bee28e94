"""The default run: scikit-learn's 8x8 digits, an MLP, offline, well under 2 minutes on 2 CPU cores."""

from ..config import Config


def get_config() -> Config:
  return Config(dataset="digits", model="mlp", model_kwargs={"hidden": (256, 256)}, epochs=20, batch_size=64,
                learning_rate=0.02, schedule="cosine", lasso=3e-3, shrink_threshold=1e-2, rank_quantum=8,
                checkpoint_every_steps=100, log_every_steps=10)
