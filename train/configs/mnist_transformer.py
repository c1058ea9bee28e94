"""A small Transformer encoder reading MNIST rows as a sequence of 28 tokens; Adam, cosine schedule."""

from ..config import Config


def get_config() -> Config:
  return Config(dataset="mnist", idx_dir="auto", model="transformer",
                model_kwargs={"d_model": 64, "num_heads": 4, "num_layers": 2, "mlp_dim": 128},
                epochs=5, batch_size=128, optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4,
                schedule="cosine", lasso=1e-5, shrink_threshold=1e-4)
