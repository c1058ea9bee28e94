"""Reference models built from the factorized layers, with dense twins.

Every model takes ``rngs: nnx.Rngs`` and ``factorized: bool = True``. With
``factorized=False`` the same architecture is built from plain ``nnx.Linear``,
``nnx.Conv`` and ``nnx.MultiHeadAttention`` under the same attribute names, so
a trained dense baseline converts with :func:`maestro_jax.nnx.factorize` into
the factorized model (same layer names, same function at full rank).

All models take NHWC images (the transformer also takes token ids or feature
sequences) and are called as ``model(x, train=False)``. With BatchNorm,
``train=True`` normalizes with batch statistics and updates the running
statistics (``use_running_average = not train``); :func:`recalibrate_batch_norm`
recomputes those statistics exactly for the current keep counts.

Layer names (the keys of keep-count dicts) are dotted module paths, e.g.
``'conv1'``, ``'layer2.0.shortcut'``, ``'blocks.1.attn.query'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maestro_jax import nnx as mnnx
from maestro_jax._src.factorized import INIT_SCALES
from maestro_jax._src.factorized import default_initializers
from maestro_jax._src.rules import COMPUTE_PATHS
# BatchNorm recalibration lives in maestro_jax.batch_norm; re-exported for the zoo's users.
from maestro_jax.batch_norm import batch_norm_statistics
from maestro_jax.batch_norm import recalibrate_batch_norm
from maestro_jax.batch_norm import recalibrate_batch_norm_state

__all__ = ["MLP", "LeNet5", "VGG19", "ResNet18", "BasicBlock", "TransformerEncoder", "TransformerBlock",
           "MODELS", "make_model", "batch_norm_statistics", "recalibrate_batch_norm_state",
           "recalibrate_batch_norm", "GROUP_NORM_GROUPS"]

Array = jax.Array
Norm = str | None

# Groups of GroupNorm per channel count, as in the Maestro reference code (8 or 16 channels per group).
GROUP_NORM_GROUPS = {16: 2, 32: 4, 64: 8, 128: 8, 256: 16, 512: 32, 1024: 32, 2048: 32}

_NORMS = ("batch", "group", None)


def _group_count(channels: int) -> int:
  """GroupNorm groups: the reference table, else the largest divisor giving >= 8 channels per group."""
  if channels in GROUP_NORM_GROUPS:
    return GROUP_NORM_GROUPS[channels]
  for groups in range(max(1, channels // 8), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


class _Layers:
  """Builds factorized or plain layers with shared options."""

  def __init__(self, factorized: bool, init_method: str, dtype, param_dtype, rngs: nnx.Rngs, bn_momentum: float = 0.9,
               init_scale: str = "lecun", compute_path: str = "auto"):
    self.factorized, self.init_method, self.dtype, self.param_dtype = factorized, init_method, dtype, param_dtype
    self.rngs, self.bn_momentum = rngs, bn_momentum
    if init_scale not in INIT_SCALES:
      raise ValueError(f"init_scale must be one of {list(INIT_SCALES)}, got {init_scale!r}")
    if compute_path not in COMPUTE_PATHS:
      raise ValueError(f"compute_path must be one of {list(COMPUTE_PATHS)}, got {compute_path!r}")
    self.init_scale, self.compute_path = init_scale, compute_path
    self.factorized_options = dict(init_method=init_method, init_scale=init_scale, compute_path=compute_path,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _dense_inits(self, kernel_shape: tuple[int, ...]) -> dict[str, Any]:
    """The dense twin's initializers: the same weight scale as the factorized layers' SVD-split kernels."""
    kernel_init, bias_init = default_initializers(self.init_scale, kernel_shape)
    if self.init_scale == "lecun":
      return {}  # Flax's own defaults (LeCun normal, zero bias).
    return dict(kernel_init=kernel_init, bias_init=bias_init)

  def linear(self, d_in: int, d_out: int, *, use_bias: bool = True):
    if self.factorized:
      return mnnx.Linear(d_in, d_out, use_bias=use_bias, **self.factorized_options)
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                      rngs=self.rngs, **self._dense_inits((d_in, d_out)))

  def conv(self, c_in: int, c_out: int, kernel_size: int, strides: int = 1, *, padding: Any = "SAME",
           use_bias: bool = True):
    if self.factorized:
      return mnnx.Conv(c_in, c_out, kernel_size, strides, padding=padding, use_bias=use_bias,
                       **self.factorized_options)
    return nnx.Conv(c_in, c_out, (kernel_size, kernel_size), strides, padding=padding, use_bias=use_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs,
                    **self._dense_inits((kernel_size, kernel_size, c_in, c_out)))

  def attention(self, num_heads: int, d_model: int):
    if self.factorized:
      return mnnx.MultiHeadAttention(num_heads, d_model, **self.factorized_options)
    # The dense twin's attention keeps Flax's init: one kernel_init serves both its (d, heads, head_dim)
    # and (heads, head_dim, d) kernels, whose fan-in axes differ.
    return nnx.MultiHeadAttention(num_heads, d_model, decode=False, keep_rngs=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, rngs=self.rngs)

  def norm(self, kind: Norm, channels: int):
    if kind == "batch":
      return nnx.BatchNorm(channels, momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype,
                           param_dtype=self.param_dtype, rngs=self.rngs)
    if kind == "group":
      return nnx.GroupNorm(channels, num_groups=_group_count(channels), epsilon=1e-5, dtype=self.dtype,
                           param_dtype=self.param_dtype, rngs=self.rngs)
    return None


def _check_norm(norm: Norm, allowed=_NORMS) -> None:
  if norm not in allowed:
    raise ValueError(f"norm must be one of {list(allowed)}, got {norm!r}")


def _apply_norm(norm, x: Array, train: bool) -> Array:
  if norm is None:
    return x
  if isinstance(norm, nnx.BatchNorm):
    return norm(x, use_running_average=not train)
  return norm(x)


def _max_pool(x: Array, size: int, padding: str = "VALID") -> Array:
  """``size x size`` max pooling at stride ``size`` (NHWC), as a reshape and a max.

  The same values as ``nnx.max_pool``; the gradient is a compare and a select, where
  XLA CPU's ``reduce_window`` gradient (select-and-scatter) took 4.5x as long for
  LeNet's pools (3.6 vs 0.8 ms a step). Where a window holds tied maxima the
  gradient is shared between them instead of going to one.
  """
  h, w = x.shape[-3:-1]
  if padding == "VALID":
    x = x[..., :h // size * size, :w // size * size, :]
  else:  # 'SAME' at stride = window pads -n % size, the smaller half first (as XLA does)
    pad_h, pad_w = -h % size, -w % size
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                                               (0, 0)], constant_values=-jnp.inf)
  h, w, c = x.shape[-3:]
  return jnp.max(x.reshape(x.shape[:-3] + (h // size, size, w // size, size, c)), axis=(-4, -2))


# ---------------------------------------------------------------------------------------------- MLP


class MLP(nnx.Module):
  """Multilayer perceptron with ReLU; inputs ``(B, ...)`` are flattened to ``(B, in_features)``.

  Layers are ``layers.0 .. layers.n`` (the last one is the classifier).

  Args:
    in_features: features after flattening (e.g. ``28 * 28`` for MNIST).
    hidden: widths of the hidden layers.
    num_classes: outputs.
    factorized: build from factorized layers (else from ``nnx.Linear``).
    init_method: init method of factorized layers (``'svd'`` or ``'random'``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    init_scale: weight scale of every layer, ``'lecun'`` (Flax's default) or
      ``'pytorch'`` (kernel and bias uniform in ``+-1/sqrt(fan_in)``, the scale of
      the paper's code, which its lambda and shrink threshold assume); the dense
      twin (``factorized=False``) gets the same scale.
    compute_path: ``'auto'``, ``'factors'`` or ``'kernel'`` for every
      factorized layer (see :func:`maestro_jax.dense`).
  """

  def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *, factorized: bool = True,
               init_method: str = "svd", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs,
               init_scale: str = "lecun", compute_path: str = "auto"):
    make = _Layers(factorized, init_method, dtype, param_dtype, rngs, init_scale=init_scale, compute_path=compute_path)
    widths = [int(in_features), *(int(h) for h in hidden), int(num_classes)]
    self.in_features = int(in_features)
    self.layers = nnx.List([make.linear(d_in, d_out) for d_in, d_out in zip(widths[:-1], widths[1:])])

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """``(B, ...)`` with ``prod(...) == in_features`` -> logits ``(B, num_classes)``."""
    del train
    x = x.reshape(x.shape[0], -1)
    if x.shape[-1] != self.in_features:
      raise ValueError(f"MLP: flattened input has {x.shape[-1]} features, expected {self.in_features}")
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


# ------------------------------------------------------------------------------------------- LeNet-5


class LeNet5(nnx.Module):
  """LeNet-5 as in the Maestro paper's MNIST experiments.

  ``conv1`` 5x5 ``in_channels -> 6`` (VALID), ReLU, 2x2 max-pool, ``conv2`` 5x5
  ``6 -> 16`` (VALID), ReLU, 2x2 max-pool, flatten, ``fc1 -> 120``, ReLU,
  ``fc2 120 -> 84``, ReLU, ``fc3 84 -> num_classes``. For 28x28 inputs the
  flattened size is ``16 * 4 * 4 = 256`` (44,426 parameters dense); for 32x32
  it is 400 (the classic 61,706).

  Args:
    num_classes: outputs.
    in_channels: input channels; must match ``image_shape[-1]``.
    image_shape: ``(H, W, C)`` of one input, used to size ``fc1``.
    factorized, init_method, dtype, param_dtype, rngs, init_scale, compute_path: as in :class:`MLP`.
  """

  def __init__(self, num_classes: int = 10, in_channels: int | None = None, *,
               image_shape: Sequence[int] = (28, 28, 1), factorized: bool = True, init_method: str = "svd", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs,
               init_scale: str = "lecun", compute_path: str = "auto"):
    h, w, c = (int(d) for d in image_shape)
    in_channels = c if in_channels is None else int(in_channels)
    if in_channels != c:
      raise ValueError(f"LeNet5: in_channels={in_channels} does not match image_shape {tuple(image_shape)}")
    out_h, out_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if out_h < 1 or out_w < 1:
      raise ValueError(f"LeNet5: image_shape {tuple(image_shape)} is too small (need at least 16x16)")
    make = _Layers(factorized, init_method, dtype, param_dtype, rngs, init_scale=init_scale, compute_path=compute_path)
    self.image_shape = (h, w, c)
    self.conv1 = make.conv(in_channels, 6, 5, padding="VALID")
    self.conv2 = make.conv(6, 16, 5, padding="VALID")
    self.fc1 = make.linear(16 * out_h * out_w, 120)
    self.fc2 = make.linear(120, 84)
    self.fc3 = make.linear(84, num_classes)

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """``(B, H, W, C)`` images of ``image_shape`` -> logits ``(B, num_classes)``."""
    del train
    x = _max_pool(jax.nn.relu(self.conv1(x)), 2)
    x = _max_pool(jax.nn.relu(self.conv2(x)), 2)
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.fc1(x))
    x = jax.nn.relu(self.fc2(x))
    return self.fc3(x)


# ---------------------------------------------------------------------------------------------- VGG19

VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                512, 512, 512, 512, "M")


class VGG19(nnx.Module):
  """VGG-19 in its common CIFAR form (as in the Maestro reference code).

  Sixteen 3x3 convolutions (padding 1, with bias) ``features.0 .. features.15``
  with channels ``[64, 64, M, 128, 128, M, 256 x4, M, 512 x4, M, 512 x4, M]``,
  each followed by a norm (``norms.i``) and ReLU; ``M`` is a 2x2 max-pool; then
  a global average pool and one linear ``classifier`` ``512 -> num_classes``
  (the single-layer CIFAR head; no 4096-wide layers, no dropout). On 32x32
  inputs the last map is 1x1 so the average pool is the usual flatten. Pools use
  ceil mode (SAME padding), which equals floor mode on 32x32 and lets smaller
  inputs such as 28x28 through.

  Args:
    num_classes: outputs.
    in_channels: input channels.
    norm: ``'batch'``, ``'group'`` (groups from :data:`GROUP_NORM_GROUPS`) or ``None``.
    width: channels of the first stage; 64 is VGG-19, smaller values scale every
      stage proportionally (for tests).
    bn_momentum: BatchNorm running-average decay (0.9 is PyTorch's 0.1).
    factorized, init_method, dtype, param_dtype, rngs, init_scale, compute_path: as in :class:`MLP`.
  """

  def __init__(self, num_classes: int = 10, *, in_channels: int = 3, norm: Norm = "batch", width: int = 64,
               bn_momentum: float = 0.9, factorized: bool = True, init_method: str = "svd", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs,
               init_scale: str = "lecun", compute_path: str = "auto"):
    _check_norm(norm)
    make = _Layers(factorized, init_method, dtype, param_dtype, rngs, bn_momentum, init_scale=init_scale,
                   compute_path=compute_path)
    convs, norms, pool_after = [], [], []
    c_in = in_channels
    for item in VGG19_CONFIG:
      if item == "M":
        pool_after.append(len(convs) - 1)
        continue
      c_out = max(1, item * width // 64)
      convs.append(make.conv(c_in, c_out, 3, padding=1, use_bias=True))
      norms.append(make.norm(norm, c_out))
      c_in = c_out
    self.pool_after = tuple(pool_after)
    self.features = nnx.List(convs)
    self.norms = nnx.List(norms) if norm is not None else None
    self.classifier = make.linear(c_in, num_classes)

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """``(B, H, W, in_channels)`` -> logits ``(B, num_classes)``."""
    for i, conv in enumerate(self.features):
      x = conv(x)
      if self.norms is not None:
        x = _apply_norm(self.norms[i], x, train)
      x = jax.nn.relu(x)
      if i in self.pool_after:
        x = _max_pool(x, 2, "SAME")
    x = x.mean(axis=(1, 2))
    return self.classifier(x)


# ------------------------------------------------------------------------------------------- ResNet18


class BasicBlock(nnx.Module):
  """ResNet basic block: ``conv1`` 3x3 (stride), norm, ReLU, ``conv2`` 3x3, norm, + shortcut, ReLU.

  The shortcut is the identity, or ``shortcut`` (1x1 conv with the stride) and
  ``shortcut_norm`` when the stride or width changes. Convs have no bias when a
  norm follows them.
  """

  def __init__(self, make: _Layers, c_in: int, c_out: int, stride: int, norm: Norm):
    use_bias = norm is None
    self.conv1 = make.conv(c_in, c_out, 3, stride, padding=1, use_bias=use_bias)
    self.norm1 = make.norm(norm, c_out)
    self.conv2 = make.conv(c_out, c_out, 3, 1, padding=1, use_bias=use_bias)
    self.norm2 = make.norm(norm, c_out)
    if stride != 1 or c_in != c_out:
      self.shortcut = make.conv(c_in, c_out, 1, stride, padding="VALID", use_bias=use_bias)
      self.shortcut_norm = make.norm(norm, c_out)
    else:
      self.shortcut = None
      self.shortcut_norm = None

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    y = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
    y = _apply_norm(self.norm2, self.conv2(y), train)
    if self.shortcut is not None:
      x = _apply_norm(self.shortcut_norm, self.shortcut(x), train)
    return jax.nn.relu(x + y)


class ResNet18(nnx.Module):
  """ResNet-18, CIFAR form by default.

  ``stem='cifar'``: ``conv1`` 3x3 stride 1 to 64 channels, ``norm1``, ReLU, no
  max-pool. ``stem='imagenet'``: 7x7 stride 2 conv and a 3x3 stride-2 max-pool
  (torchvision's form, which the Maestro reference code used on CIFAR too).
  Then stages ``layer1 .. layer4`` of two :class:`BasicBlock` each with widths
  64, 128, 256, 512 (strides 1, 2, 2, 2), global average pool and ``fc``.

  Args:
    num_classes: outputs.
    in_channels: input channels.
    norm: ``'batch'``, ``'group'`` or ``None`` (then convs get biases).
    stem: ``'cifar'`` or ``'imagenet'``.
    width: channels of the first stage (64 is ResNet-18; smaller for tests).
    bn_momentum: BatchNorm running-average decay (0.9 is PyTorch's 0.1).
    factorized, init_method, dtype, param_dtype, rngs, init_scale, compute_path: as in :class:`MLP`.
  """

  def __init__(self, num_classes: int = 10, *, in_channels: int = 3, norm: Norm = "batch", stem: str = "cifar",
               width: int = 64, bn_momentum: float = 0.9, factorized: bool = True, init_method: str = "svd", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs,
               init_scale: str = "lecun", compute_path: str = "auto"):
    _check_norm(norm)
    if stem not in ("cifar", "imagenet"):
      raise ValueError(f"ResNet18: stem must be 'cifar' or 'imagenet', got {stem!r}")
    make = _Layers(factorized, init_method, dtype, param_dtype, rngs, bn_momentum, init_scale=init_scale,
                   compute_path=compute_path)
    self.stem = stem
    if stem == "cifar":
      self.conv1 = make.conv(in_channels, width, 3, 1, padding=1, use_bias=norm is None)
    else:
      self.conv1 = make.conv(in_channels, width, 7, 2, padding=3, use_bias=norm is None)
    self.norm1 = make.norm(norm, width)
    c_in = width
    stages = []
    for i, stride in enumerate((1, 2, 2, 2)):
      c_out = width * 2**i
      stages.append(nnx.List([BasicBlock(make, c_in, c_out, stride, norm), BasicBlock(make, c_out, c_out, 1, norm)]))
      c_in = c_out
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.fc = make.linear(c_in, num_classes)

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """``(B, H, W, in_channels)`` -> logits ``(B, num_classes)``."""
    x = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
    if self.stem == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train=train)
    x = x.mean(axis=(1, 2))
    return self.fc(x)


# ---------------------------------------------------------------------------------------- Transformer


class TransformerBlock(nnx.Module):
  """Pre-LN encoder block: ``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``."""

  def __init__(self, make: _Layers, d_model: int, num_heads: int, mlp_dim: int):
    self.ln1 = nnx.LayerNorm(d_model, dtype=make.dtype, param_dtype=make.param_dtype, rngs=make.rngs)
    self.attn = make.attention(num_heads, d_model)
    self.ln2 = nnx.LayerNorm(d_model, dtype=make.dtype, param_dtype=make.param_dtype, rngs=make.rngs)
    self.fc1 = make.linear(d_model, mlp_dim)
    self.fc2 = make.linear(mlp_dim, d_model)

  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerEncoder(nnx.Module):
  """A small pre-LN Transformer encoder classifier.

  Inputs, by construction mode:

  * ``vocab_size`` given: int token ids ``(B, L)``, embedded by a plain
    ``nnx.Embed`` (``embed``, never factorized).
  * ``in_features`` given: features ``(B, L, in_features)``, projected by a
    (factorized) linear ``embed``; images ``(B, H, W, C)`` are read row by row
    as ``L = H`` tokens of ``W * C`` features (so MNIST is ``in_features=28``,
    ``max_len=28``).

  Then learned positions ``pos_embed`` ``(max_len, d_model)``, blocks
  ``blocks.i`` (:class:`TransformerBlock`, factorized attention ``attn.query`` /
  ``key`` / ``value`` / ``out`` and MLP ``fc1``/``fc2``), a final LayerNorm
  ``norm``, mean pooling over tokens and the ``head`` linear.

  Args:
    num_classes: outputs.
    vocab_size: token vocabulary (token mode).
    in_features: features per token (feature / image mode).
    d_model: model width.
    num_heads: attention heads; must divide ``d_model``.
    num_layers: encoder blocks.
    mlp_dim: hidden width of the MLPs.
    max_len: longest sequence.
    factorized, init_method, dtype, param_dtype, rngs, init_scale, compute_path: as in :class:`MLP`.
  """

  def __init__(self, num_classes: int, *, vocab_size: int | None = None, in_features: int | None = None,
               d_model: int = 64, num_heads: int = 4, num_layers: int = 2, mlp_dim: int = 128, max_len: int = 128,
               factorized: bool = True, init_method: str = "svd", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs,
               init_scale: str = "lecun", compute_path: str = "auto"):
    if (vocab_size is None) == (in_features is None):
      raise ValueError("TransformerEncoder: give exactly one of vocab_size (tokens) or in_features (features)")
    if d_model % num_heads:
      raise ValueError(f"TransformerEncoder: d_model={d_model} is not divisible by num_heads={num_heads}")
    make = _Layers(factorized, init_method, dtype, param_dtype, rngs, init_scale=init_scale, compute_path=compute_path)
    self.vocab_size, self.in_features, self.max_len, self.d_model = vocab_size, in_features, max_len, d_model
    if vocab_size is not None:
      self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.embed = make.linear(in_features, d_model)
    self.pos_embed = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (max_len, d_model), param_dtype))
    self.blocks = nnx.List([TransformerBlock(make, d_model, num_heads, mlp_dim) for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head = make.linear(d_model, num_classes)

  def __call__(self, x: Array, *, train: bool = False) -> Array:
    """Tokens ``(B, L)``, features ``(B, L, F)`` or images ``(B, H, W, C)`` -> logits ``(B, num_classes)``."""
    del train
    if self.vocab_size is not None:
      if x.ndim != 2:
        raise ValueError(f"TransformerEncoder: token input must be (B, L), got shape {x.shape}")
    else:
      if x.ndim == 4:
        x = x.reshape(x.shape[:2] + (-1,))
      if x.ndim != 3 or x.shape[-1] != self.in_features:
        raise ValueError(f"TransformerEncoder: expected (B, L, {self.in_features}) or images with "
                         f"W * C = {self.in_features}, got shape {x.shape}")
    length = x.shape[1]
    if length > self.max_len:
      raise ValueError(f"TransformerEncoder: sequence length {length} exceeds max_len={self.max_len}")
    h = self.embed(x)
    h = h + self.pos_embed[...][:length].reshape((1, length, self.d_model)).astype(h.dtype)
    for block in self.blocks:
      h = block(h)
    h = self.norm(h).mean(axis=1)
    return self.head(h)


# ------------------------------------------------------------------------------------------- registry

MODELS: dict[str, type[nnx.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "vgg19": VGG19,
    "resnet18": ResNet18,
    "transformer": TransformerEncoder,
}


def make_model(name: str, *, num_classes: int, image_shape: Sequence[int], factorized: bool = True,
               rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds a model of :data:`MODELS` for images of ``image_shape`` ``(H, W, C)``.

  Defaults per name (override through ``kwargs``): ``'mlp'`` has
  ``hidden=(256, 256)`` on the flattened image; ``'lenet5'`` sizes ``fc1`` from
  ``image_shape``; ``'vgg19'``/``'resnet18'`` take ``in_channels=C``;
  ``'transformer'`` reads images row by row (``in_features=W * C``,
  ``max_len=H``).

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)}")
  h, w, c = (int(d) for d in image_shape)
  common = dict(factorized=factorized, rngs=rngs)
  if name == "mlp":
    hidden = kwargs.pop("hidden", (256, 256))
    return MLP(h * w * c, hidden, num_classes, **common, **kwargs)
  if name == "lenet5":
    return LeNet5(num_classes, image_shape=(h, w, c), **common, **kwargs)
  if name in ("vgg19", "resnet18"):
    kwargs.setdefault("in_channels", c)
    return MODELS[name](num_classes, **common, **kwargs)
  if "vocab_size" not in kwargs:
    kwargs.setdefault("in_features", w * c)
  kwargs.setdefault("max_len", h)
  return TransformerEncoder(num_classes, **common, **kwargs)
