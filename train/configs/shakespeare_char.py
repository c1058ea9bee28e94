"""A character-level Transformer language model on Shakespeare, offline, about 10 minutes on 2 CPU cores.

Trains on 38 works and validates on two held-out plays (Julius Caesar, Twelfth
Night): a pre-LN causal Transformer with every attention and MLP projection
factorized, AdamW, windows of 64 characters, trained with self-distillation (the
full model on the labels, the sampled model on its softmax: 1.83 nats/char at
full rank against 1.89 for the sampled model alone, docs/language_model.md).
An "epoch" is 250 steps: at its end
the layers shrink, the first 400 validation windows are scored and a checkpoint
is written; the run ends with the whole validation text.
"""

from ..config import Config


def get_config() -> Config:
  return Config(task="language_modeling", dataset="shakespeare", model="transformer_lm",
                model_kwargs={"d_model": 128, "num_heads": 4, "num_layers": 4, "mlp_dim": 512},
                seq_len=64, batch_size=16, eval_batch_size=64, steps_per_epoch=250, epochs=8, eval_max_windows=400,
                optimizer="adamw", learning_rate=1e-3, weight_decay=0.0, schedule="cosine",
                sampler="single_layer", loss="distill", lasso=1e-5, shrink_threshold=1e-2, rank_quantum=8,
                recalibrate_batches=0, checkpoint_every_steps=250, log_every_steps=25)
