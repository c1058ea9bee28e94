"""Tests of the decoder-only Transformer language model, its loss and generation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maestro_jax.nnx as mnnx
from maestro_jax import language_model as lm
from maestro_jax import sweep
from maestro_jax import text
from maestro_jax import training

VOCAB = 11
TINY = dict(d_model=16, num_heads=2, num_layers=2, mlp_dim=24, max_len=12)
VARIANTS = {
    "learned-tied": dict(positions="learned", tie_embeddings=True),
    "rotary-head": dict(positions="rotary", tie_embeddings=False),
}

_forward = nnx.jit(lambda model, x: model(x))


def _model(variant="learned-tied", factorized=True, init_method="random", seed=0):
  return lm.TransformerLM(VOCAB, **TINY, **VARIANTS[variant], factorized=factorized, init_method=init_method,
                          rngs=nnx.Rngs(seed))


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_position_sees_a_later_one(variant):
  model = _model(variant)
  x = _tokens((2, TINY["max_len"]))
  logits = _forward(model, x)
  assert logits.shape == (2, TINY["max_len"], VOCAB)
  for t in (0, 5, TINY["max_len"] - 1):
    changed = _forward(model, x.at[:, t].set((x[:, t] + 1) % VOCAB))
    # Earlier positions are bit-identical; position t itself reads the new token.
    np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
    assert not np.allclose(changed[:, t], logits[:, t])


def test_per_token_loss_on_a_hand_made_example():
  probs = np.array([[[1 / 8, 2 / 8, 5 / 8], [1 / 2, 1 / 4, 1 / 4]]])  # (B=1, L=2, V=3)
  logits = jnp.asarray(np.log(probs) + 3.0, jnp.float32)  # softmax ignores the shift
  targets = jnp.array([[0, 2]])
  np.testing.assert_allclose(lm.token_losses(logits, targets), [[3 * math.log(2), 2 * math.log(2)]], rtol=1e-6)
  np.testing.assert_allclose(lm.cross_entropy(logits, targets), 2.5 * math.log(2), rtol=1e-6)
  np.testing.assert_allclose(lm.cross_entropy(logits, targets, jnp.array([[False, True]])), 2 * math.log(2),
                             rtol=1e-6)
  assert float(lm.cross_entropy(logits, targets, jnp.zeros((1, 2), bool))) == 0.0
  np.testing.assert_allclose(lm.bits_per_char(3 * math.log(2)), 3.0)
  np.testing.assert_allclose(lm.perplexity(math.log(5.0)), 5.0)
  np.testing.assert_allclose(lm.perplexity(jnp.log(5.0)), 5.0, rtol=1e-6)

  # next_token_loss scores tokens[:, 1:] given tokens[:, :-1]: a bigram table model makes it hand-computable.
  table = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]]))
  bigram = lambda x, train=False: jnp.asarray(table)[x]
  tokens = jnp.array([[0, 1, 2, 1], [2, 2, 0, 0]])
  expected = -np.mean([table[0, 1], table[1, 2], table[2, 1], table[2, 2], table[2, 0], table[0, 0]])
  np.testing.assert_allclose(lm.next_token_loss(bigram, tokens), expected, rtol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_factorized_model_at_full_rank_equals_its_dense_twin(variant):
  dense = _model(variant, factorized=False)
  fact = _model(variant, factorized=True, init_method="svd")
  assert not mnnx.capacities(dense)
  x = _tokens((2, TINY["max_len"]))
  y_dense = _forward(dense, x)
  mnnx.factorize(dense)  # SVD of the dense twin's own kernels
  assert mnnx.capacities(dense) == mnnx.capacities(fact)
  expected = {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.query", "attn.key", "attn.value",
                                                                    "attn.out", "fc1", "fc2")}
  assert set(mnnx.capacities(fact)) == expected | ({"head"} if variant == "rotary-head" else set())
  np.testing.assert_allclose(_forward(dense, x), y_dense, atol=1e-5, rtol=0)
  # Keep counts reach the layers: one component each changes the function.
  mnnx.set_keep_counts(dense, {name: 1 for name in mnnx.capacities(dense)})
  assert not np.allclose(_forward(dense, x), y_dense, atol=1e-3)


def test_generation_is_deterministic_per_key_and_follows_the_model():
  model = _model("rotary-head")
  prompt = _tokens((3,), seed=2)
  first = lm.generate(model, prompt, 20, key=jax.random.key(0))
  assert first.shape == (20,) and first.dtype == jnp.int32
  np.testing.assert_array_equal(lm.generate(model, prompt, 20, key=jax.random.key(0)), first)
  assert not np.array_equal(lm.generate(model, prompt, 20, key=jax.random.key(1)), first)

  # Greedy decoding picks, at each step, the argmax of the model's logits on the text so far; past max_len
  # (12) the context is the last 12 tokens.
  batch_prompt = _tokens((2, 4), seed=3)
  greedy = np.asarray(lm.generate(model, batch_prompt, 14, key=jax.random.key(0), temperature=0.0))
  sequence = np.concatenate([np.asarray(batch_prompt), greedy], axis=1)
  for i in range(14):
    position = 4 + i
    context = sequence[:, max(0, position - 12):position]
    np.testing.assert_array_equal(np.argmax(_forward(model, jnp.asarray(context))[:, -1], -1), greedy[:, i])


def test_generation_at_any_truncation_without_recompiling():
  model = _model("learned-tied")
  prompt = _tokens((2, 3), seed=4)
  key = jax.random.key(5)
  full = lm.generate(model, prompt, 8, key=key, temperature=0.0)
  compiled = lm._generate._cache_size()  # pylint: disable=protected-access
  mnnx.set_keep_counts(model, {name: 1 for name in mnnx.capacities(model)})
  small = lm.generate(model, prompt, 8, key=key, temperature=0.0)
  lm.generate(model, prompt, 8, key=key, temperature=0.7)
  assert lm._generate._cache_size() == compiled  # pylint: disable=protected-access
  assert not np.array_equal(small, full)


def test_generate_text_decodes_with_the_vocabulary():
  vocab = text.CharVocab.build("abcdefghij")  # 10 characters + the unknown id = VOCAB
  model = _model("learned-tied")
  out = lm.generate_text(model, vocab, "abc", 9, key=jax.random.key(0))
  assert isinstance(out, str) and len(out) == 9
  assert out == vocab.decode(np.asarray(lm.generate(model, vocab.encode("abc"), 9, key=jax.random.key(0))))


def test_invalid_options_raise():
  with pytest.raises(ValueError, match="positions must be one of"):
    lm.TransformerLM(VOCAB, positions="sinusoidal", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="even head dimension"):
    lm.TransformerLM(VOCAB, d_model=12, num_heads=4, positions="rotary", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds max_len"):
    _model()(_tokens((1, TINY["max_len"] + 1)))
  with pytest.raises(ValueError, match="P >= 1"):
    lm.generate(_model(), jnp.zeros((1, 0), jnp.int32), 3, key=jax.random.key(0))


def test_sweep_evaluates_truncations_with_the_next_token_loss():
  # The sweep's classification metrics are per-label means, so (B, L) targets with a (B, L) mask give the
  # mean per-token loss.
  model = _model("rotary-head")
  fm, params, model_state = training.FunctionalModel.from_module(model)
  tokens = _tokens((3, TINY["max_len"] + 1), seed=6)
  mask = jnp.ones((3, TINY["max_len"]), bool).at[2, 5:].set(False)
  batch = {"image": tokens[:, :-1], "label": tokens[:, 1:], "mask": mask}
  stacked = sweep.fraction_grid(mnnx.capacities(model), [0.25, 0.5, 1.0])
  result = sweep.sweep(fm, params, model_state, [batch], stacked)
  assert result["count"] == int(mask.sum())
  for config, loss in zip(sweep.unstack(stacked), result["loss"]):
    mnnx.set_keep_counts(model, config)
    np.testing.assert_allclose(loss, lm.next_token_loss(model, tokens, mask), rtol=1e-5, atol=1e-6)
  assert len(set(result["loss"].tolist())) == 3  # the truncations differ
