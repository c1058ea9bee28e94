"""A decoder-only Transformer language model with factorized projections, its loss and sampling.

:class:`TransformerLM` is a pre-LayerNorm causal Transformer in the style of the
zoo in :mod:`maestro_jax.models`: the query, key, value and output projections
(``blocks.i.attn.query`` / ``key`` / ``value`` / ``out``, a
:class:`maestro_jax.nnx.MultiHeadAttention`), both MLP matrices
(``blocks.i.fc1`` / ``fc2``) and an untied output ``head`` are factorized
layers; the token embedding ``embed`` (and a learned ``pos_embed``) stay dense.
``factorized=False`` builds the dense twin from ``nnx.Linear`` and
``nnx.MultiHeadAttention`` under the same names, so
:func:`maestro_jax.nnx.factorize` turns a trained dense twin into the
factorized model computing the same function.

The model maps tokens ``(B, L)`` to next-token logits ``(B, L, V)``: position
``t`` sees tokens ``0..t`` only. :func:`cross_entropy` is the mean per-token
loss in nats, :func:`bits_per_char` and :func:`perplexity` convert it, and
:func:`generate` samples continuations at whatever keep counts the model holds
(set them with :func:`maestro_jax.nnx.set_keep_counts`).

A window of ``L + 1`` tokens (see :mod:`maestro_jax.text`) is one training
example: the model reads ``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``
(:func:`next_token_loss`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maestro_jax import models
from maestro_jax import nnx as mnnx
from maestro_jax._src import factorized as core

__all__ = ["TransformerLM", "DecoderBlock", "POSITIONS", "causal_mask", "rotary_embedding", "token_losses",
           "cross_entropy", "next_token_loss", "bits_per_char", "perplexity", "generate", "generate_text"]

Array = jax.Array
POSITIONS = ("learned", "rotary")


def causal_mask(length: int) -> Array:
  """``bool (1, 1, length, length)``: query ``i`` may attend to key ``j`` iff ``j <= i``."""
  return jnp.tril(jnp.ones((length, length), bool)).reshape(1, 1, length, length)


def rotary_embedding(x: Array, *, base: float = 10000.0) -> Array:
  """Rotary position embedding (RoFormer, "rotate half" form) of ``(B, L, H, D)`` queries or keys.

  Position ``t`` rotates the pairs ``(x[..., k], x[..., k + D/2])`` by the angle
  ``t * base ** (-2k / D)``, so a query-key dot product depends on positions only
  through their difference.
  """
  length, depth = x.shape[-3], x.shape[-1]
  if depth % 2:
    raise ValueError(f"rotary positions need an even head dimension, got {depth}")
  half = depth // 2
  frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * frequencies[None, :]
  shape = (1,) * (x.ndim - 3) + (length, 1, half)
  cos, sin = jnp.cos(angles).reshape(shape).astype(x.dtype), jnp.sin(angles).reshape(shape).astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _heads(y: Array, x: Array, num_heads: int) -> Array:
  """A projection's output as ``(..., L, H, D)``: flax's attention projections already split heads."""
  return y if y.ndim == x.ndim + 1 else core.split_heads(y, num_heads)


def _self_attention(attn: nnx.Module, x: Array, mask: Array, rotary: bool) -> Array:
  """Causal self-attention with either a factorized or a flax ``MultiHeadAttention``'s projections.

  The projections are called one by one (instead of the module's ``__call__``) so
  that rotary positions can act on queries and keys; both kinds share
  :func:`maestro_jax.dot_product_attention`, hence the same function.
  """
  q = _heads(attn.query(x), x, attn.num_heads)
  k = _heads(attn.key(x), x, attn.num_heads)
  v = _heads(attn.value(x), x, attn.num_heads)
  if rotary:
    q, k = rotary_embedding(q), rotary_embedding(k)
  out = core.dot_product_attention(q, k, v, mask)
  # A LinearGeneral output projection (flax's) contracts (heads, head_dim); a Linear takes them flattened.
  if len(np.atleast_1d(getattr(attn.out, "in_features", 0))) == 2:
    return attn.out(out)
  return attn.out(out.reshape(out.shape[:-2] + (-1,)))


class DecoderBlock(nnx.Module):
  """Pre-LN causal block: ``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``."""

  def __init__(self, make, d_model: int, num_heads: int, mlp_dim: int, *, rotary: bool):
    """``make`` is the zoo's layer builder (``maestro_jax.models._Layers``)."""
    self.rotary = rotary
    self.ln1 = nnx.LayerNorm(d_model, dtype=make.dtype, param_dtype=make.param_dtype, rngs=make.rngs)
    self.attn = make.attention(num_heads, d_model)
    self.ln2 = nnx.LayerNorm(d_model, dtype=make.dtype, param_dtype=make.param_dtype, rngs=make.rngs)
    self.fc1 = make.linear(d_model, mlp_dim)
    self.fc2 = make.linear(mlp_dim, d_model)

  def __call__(self, x: Array, mask: Array) -> Array:
    x = x + _self_attention(self.attn, self.ln1(x), mask, self.rotary)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nnx.Module):
  """A decoder-only (GPT-style) Transformer language model.

  ``embed`` (``nnx.Embed``, dense), learned positions ``pos_embed``
  ``(max_len, d_model)`` or rotary positions in every attention, blocks
  ``blocks.i`` (:class:`DecoderBlock`), a final LayerNorm ``norm``, and the
  output: ``embed.attend`` (tied, dense) or a factorized linear ``head``.

  Args:
    vocab_size: token ids are in ``0..vocab_size - 1``.
    d_model: model width.
    num_heads: attention heads; must divide ``d_model`` (and give an even head
      dimension with rotary positions).
    num_layers: blocks.
    mlp_dim: hidden width of the MLPs.
    max_len: longest input (learned positions; :func:`generate` also crops its
      context to it).
    positions: ``'learned'`` or ``'rotary'``.
    tie_embeddings: compute logits with the embedding matrix instead of a ``head``.
    factorized: build from factorized layers (else the dense twin).
    init_method: init method of factorized layers (``'svd'`` or ``'random'``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, vocab_size: int, *, d_model: int = 128, num_heads: int = 4, num_layers: int = 4,
               mlp_dim: int = 512, max_len: int = 256, positions: str = "learned", tie_embeddings: bool = True,
               factorized: bool = True, init_method: str = "svd", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if positions not in POSITIONS:
      raise ValueError(f"TransformerLM: positions must be one of {list(POSITIONS)}, got {positions!r}")
    if d_model % num_heads:
      raise ValueError(f"TransformerLM: d_model={d_model} is not divisible by num_heads={num_heads}")
    if positions == "rotary" and (d_model // num_heads) % 2:
      raise ValueError(f"TransformerLM: rotary positions need an even head dimension, got {d_model // num_heads}")
    make = models._Layers(factorized, init_method, dtype, param_dtype, rngs)  # pylint: disable=protected-access
    self.vocab_size, self.d_model, self.max_len, self.positions = vocab_size, d_model, max_len, positions
    # GPT-2's small embedding scale: with a tied head the initial logits are near zero (loss near log V).
    small = jax.nn.initializers.normal(0.02)
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=small, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.pos_embed = nnx.Param(small(rngs.params(), (max_len, d_model), param_dtype)) if positions == "learned" \
        else None
    self.blocks = nnx.List([DecoderBlock(make, d_model, num_heads, mlp_dim, rotary=positions == "rotary")
                            for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head = None if tie_embeddings else make.linear(d_model, vocab_size)

  def __call__(self, tokens: Array, *, train: bool = False) -> Array:
    """Token ids ``(B, L)`` -> next-token logits ``(B, L, vocab_size)``; ``train`` is unused (no dropout)."""
    del train
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"TransformerLM: tokens must be integer ids (B, L), got {tokens.dtype} {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"TransformerLM: sequence length {length} exceeds max_len={self.max_len}")
    h = self.embed(tokens)
    if self.pos_embed is not None:
      h = h + mnnx.get_value(self.pos_embed)[:length].reshape(1, length, self.d_model).astype(h.dtype)
    mask = causal_mask(length)
    for block in self.blocks:
      h = block(h, mask)
    h = self.norm(h)
    return self.embed.attend(h) if self.head is None else self.head(h)


# ------------------------------------------------------------------------------------------------- loss


def token_losses(logits: Array, targets: Array) -> Array:
  """Per-token softmax cross-entropy in nats, ``(..., L)``, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def cross_entropy(logits: Array, targets: Array, mask: Array | None = None) -> Array:
  """Mean next-token cross-entropy in nats over the (masked) tokens.

  Args:
    logits: ``(B, L, V)``.
    targets: int ``(B, L)``.
    mask: optional ``(B, L)`` bool or float weights; the mean is over tokens
      where it is set (0 when none is).

  Returns:
    A float32 scalar.
  """
  losses = token_losses(logits, targets)
  if mask is None:
    return jnp.mean(losses)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(model: nnx.Module, tokens: Array, mask: Array | None = None, *, train: bool = False) -> Array:
  """:func:`cross_entropy` of ``model(tokens[:, :-1])`` against ``tokens[:, 1:]`` for windows ``(B, L + 1)``."""
  logits = model(tokens[:, :-1], train=train)
  return cross_entropy(logits, tokens[:, 1:], mask)


def bits_per_char(nats):
  """A per-token loss in nats as bits (bits per character for a character model): ``nats / ln 2``."""
  return nats / math.log(2.0)


def perplexity(nats):
  """``exp(nats)``; a jax array stays a jax array (usable under ``jit``)."""
  return jnp.exp(nats) if isinstance(nats, jax.Array) else np.exp(nats)


# -------------------------------------------------------------------------------------------- sampling


def _sample(key: Array, logits: Array, temperature: Array) -> Array:
  """One token per row of ``logits (B, V)``: softmax(logits / temperature), or the argmax at temperature 0."""
  logits = logits.astype(jnp.float32)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "window"))
def _generate(graphdef, state, prompt: Array, key: Array, temperature: Array, *, num_tokens: int,
              window: int) -> Array:
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  tokens = jnp.zeros((batch, prompt_len + num_tokens), jnp.int32).at[:, :prompt_len].set(prompt)

  def step(i, tokens):
    position = prompt_len + i  # the token drawn now
    # The last `window` tokens before `position`; positions from `position` on are still zeros, which the
    # causal model cannot see from the row it is read at.
    start = jnp.maximum(position - window, 0)
    context = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)
    logits = jax.lax.dynamic_index_in_dim(model(context), position - 1 - start, axis=1, keepdims=False)
    token = _sample(jax.random.fold_in(key, i), logits, temperature)
    return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, axis=1)

  tokens = jax.lax.fori_loop(0, num_tokens, step, tokens)
  return tokens[:, prompt_len:]


def generate(model: TransformerLM, prompt_tokens: Any, num_tokens: int, *, key: Array,
             temperature: float = 1.0) -> Array:
  """Samples ``num_tokens`` tokens after a prompt, one compiled loop, at the model's current keep counts.

  The result is a pure function of the model, the prompt, ``key`` and
  ``temperature``: token ``i`` is drawn with ``jax.random.fold_in(key, i)``. The
  context is cropped to the last ``model.max_len`` tokens. Keep counts and the
  temperature are traced, so a new truncation or temperature does not recompile.

  Args:
    model: a :class:`TransformerLM` (or any model mapping ``(B, L)`` ids to
      ``(B, L, V)`` logits with a ``max_len`` attribute).
    prompt_tokens: int ids ``(P,)`` or ``(B, P)``, ``P >= 1``.
    num_tokens: tokens to draw.
    key: PRNG key.
    temperature: softmax temperature; 0 takes the most likely token.

  Returns:
    int32 ``(num_tokens,)`` or ``(B, num_tokens)``: the continuation only.
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  single = prompt.ndim == 1
  prompt = prompt[None] if single else prompt
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"generate: prompt_tokens must be (P,) or (B, P) with P >= 1, got shape {prompt.shape}")
  if num_tokens < 0:
    raise ValueError(f"generate: num_tokens must be non-negative, got {num_tokens}")
  if temperature < 0:
    raise ValueError(f"generate: temperature must be non-negative, got {temperature}")
  window = min(int(model.max_len), prompt.shape[1] + num_tokens)
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, prompt, key, jnp.asarray(temperature, jnp.float32), num_tokens=int(num_tokens),
                  window=window)
  return out[0] if single else out


def generate_text(model: TransformerLM, vocab, prompt: str, num_tokens: int, *, key: Array,
                  temperature: float = 1.0) -> str:
  """:func:`generate` from a text prompt, decoded with ``vocab`` (a :class:`maestro_jax.text.CharVocab`).

  Returns:
    The continuation (without the prompt).
  """
  ids = vocab.encode(prompt)
  return vocab.decode(np.asarray(generate(model, ids, num_tokens, key=key, temperature=temperature)))
