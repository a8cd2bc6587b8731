"""Embedding networks in Flax NNX: ResNets and GoogLeNet in torchvision's layout, ViTs in timm's.

Module and attribute names follow torchvision (`conv1`, `bn1`, `layer1[0].downsample`,
`inception3a.branch2[1].conv`, ...) or timm (`patch_embed.proj`, `blocks[0].attn.qkv`, ...)
so that their state dicts map onto the parameters key by key (hn_jax.pretrained). The stride of a
downsampling bottleneck sits on its 3x3 convolution, and padding is explicit and symmetric,
as in PyTorch (XLA's "SAME" pads stride-2 convolutions asymmetrically). The classifier is
replaced by a linear embedding head.

Parameters are always float32; `dtype` sets the compute precision (bfloat16 for speed).
The model returns float32 embeddings whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torchvision initialises convolutions with Kaiming-normal (fan_out) and its default Linear
# layer with U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

MODEL_NAMES = ("small", "resnet18", "resnet50", "googlenet", "googlenet_mini",
               "vit_small_patch16", "vit_base_patch16", "vit_mini")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  pad = (kernel - 1) // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  use_bias=False, dtype=dtype, kernel_init=_conv_init, rngs=rngs)


def _bn(channels: int, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # PyTorch's momentum 0.1 is Flax's 0.9 (the weight of the old running value).
  return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class Downsample(nnx.Module):
  """1x1 strided projection of the shortcut (torchvision's `downsample` Sequential)."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, dtype: Any, rngs: nnx.Rngs):
    self.conv = _conv(in_ch, out_ch, 1, stride, dtype, rngs)
    self.bn = _bn(out_ch, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions (ResNet18/34)."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int, dtype: Any, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 3, stride, dtype, rngs)
    self.bn1 = _bn(width, dtype, rngs)
    self.conv2 = _conv(width, out_ch, 3, 1, dtype, rngs)
    self.bn2 = _bn(out_ch, dtype, rngs)
    needs_projection = stride != 1 or in_ch != out_ch
    self.downsample = Downsample(in_ch, out_ch, stride, dtype, rngs) if needs_projection else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck (ResNet50 and deeper)."""

  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int, dtype: Any, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 1, 1, dtype, rngs)
    self.bn1 = _bn(width, dtype, rngs)
    self.conv2 = _conv(width, width, 3, stride, dtype, rngs)
    self.bn2 = _bn(width, dtype, rngs)
    self.conv3 = _conv(width, out_ch, 1, 1, dtype, rngs)
    self.bn3 = _bn(out_ch, dtype, rngs)
    needs_projection = stride != 1 or in_ch != out_ch
    self.downsample = Downsample(in_ch, out_ch, stride, dtype, rngs) if needs_projection else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return nnx.relu(y + shortcut)


class ResNetEmbedding(nnx.Module):
  """A ResNet backbone followed by a linear embedding head.

  Input: images (N, H, W, 3) in NHWC, normalized. Output: (N, embedding_dim) float32,
  unnormalized (the loss and the evaluation normalize).
  """

  def __init__(self, block: type[BasicBlock] | type[Bottleneck], stage_sizes: Sequence[int],
               embedding_dim: int, *, base_width: int = 64, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, base_width, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                          use_bias=False, dtype=dtype, kernel_init=_conv_init, rngs=rngs)
    self.bn1 = _bn(base_width, dtype, rngs)
    in_ch = base_width
    for stage, num_blocks in enumerate(stage_sizes):
      width = base_width * 2**stage
      blocks = []
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(block(in_ch, width, stride, dtype, rngs))
        in_ch = width * block.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(blocks))
    self.num_stages = len(stage_sizes)
    self.feature_dim = in_ch
    self.embedding = nnx.Linear(in_ch, embedding_dim, dtype=dtype, kernel_init=_linear_init,
                                bias_init=_fan_in_uniform_bias(in_ch), rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The backbone's globally average-pooled features (torchvision's input to `fc`)."""
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in range(self.num_stages):
      for blk in getattr(self, f"layer{stage + 1}"):
        x = blk(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.embedding(self.features(x)).astype(jnp.float32)


def _fan_in_uniform_bias(fan_in: int):
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ---------------------------------------------------------------------------------------------
# GoogLeNet (Inception v1) in torchvision's layout: the release's third backbone ("GBN",
# torchvision's googlenet with aux_logits=False and transform_input=False).

# torchvision's GoogLeNet initialises convolutions and linear layers with a normal of std 0.01
# truncated at +-2, i.e. at 200 std: a plain normal (whose program compiles far faster).
_googlenet_init = nnx.initializers.normal(stddev=0.01)

# (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of each inception block, in order.
_INCEPTION = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """PyTorch's MaxPool2d(window, stride, padding, ceil_mode=True) on NHWC.

  The output has ceil((n + 2 padding - window) / stride) + 1 rows (and columns), less one when
  the last window would start in the right padding; windows past the edge see -inf.
  """
  pads = []
  for n in x.shape[1:3]:
    out = -(-(n + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= n + padding:
      out -= 1
    extra = (out - 1) * stride + window - (n + 2 * padding)
    pads.append((padding, padding + max(extra, 0)))
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


class BasicConv2d(nnx.Module):
  """Convolution without bias, BatchNorm (eps 0.001), ReLU: torchvision's `BasicConv2d`."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, dtype: Any, rngs: nnx.Rngs, *,
               stride: int = 1, padding: int = 0):
    self.conv = nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride,
                         padding=((padding, padding), (padding, padding)), use_bias=False,
                         dtype=dtype, kernel_init=_googlenet_init, rngs=rngs)
    self.bn = nnx.BatchNorm(out_ch, momentum=0.9, epsilon=1e-3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x)))


class Inception(nnx.Module):
  """Four branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's
  "5x5" branch, a 3x3 there too); 3x3 max-pool (stride 1) -> 1x1."""

  def __init__(self, in_ch: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
               ch5x5: int, pool_proj: int, dtype: Any, rngs: nnx.Rngs):
    self.branch1 = BasicConv2d(in_ch, ch1x1, 1, dtype, rngs)
    self.branch2 = nnx.List([BasicConv2d(in_ch, ch3x3red, 1, dtype, rngs),
                             BasicConv2d(ch3x3red, ch3x3, 3, dtype, rngs, padding=1)])
    self.branch3 = nnx.List([BasicConv2d(in_ch, ch5x5red, 1, dtype, rngs),
                             BasicConv2d(ch5x5red, ch5x5, 3, dtype, rngs, padding=1)])
    # torchvision's branch4 is Sequential(MaxPool2d, BasicConv2d): this is its `branch4.1`.
    self.branch4 = BasicConv2d(in_ch, pool_proj, 1, dtype, rngs)
    self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

  def __call__(self, x: jax.Array) -> jax.Array:
    b2 = self.branch2[1](self.branch2[0](x))
    b3 = self.branch3[1](self.branch3[0](x))
    b4 = self.branch4(max_pool_ceil(x, 3, 1, 1))
    return jnp.concatenate([self.branch1(x), b2, b3, b4], axis=-1)


class DropoutState(nnx.BatchStat):
  """The key and step count of a `StepDropout`: kept with the BatchNorm statistics, so the
  train step carries them, a skipped step leaves them alone and a checkpoint holds them."""


class StepDropout(nnx.Module):
  """Inverted dropout whose masks come from a stored key folded with a step counter.

  The train step passes no random keys; this layer keeps its own (seeded at init) and counts
  the training calls, so a resumed run draws the same masks as an uninterrupted one.
  `deterministic` (set by `model.eval()` / `model.train()`) turns it off.
  """

  def __init__(self, rate: float, rngs: nnx.Rngs):
    self.rate = rate
    self.deterministic = False
    self.key = DropoutState(jax.random.key_data(rngs.dropout()))
    self.count = DropoutState(jnp.zeros((), jnp.uint32))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0:
      return x
    key = jax.random.fold_in(jax.random.wrap_key_data(self.key[...]), self.count[...])
    self.count[...] = self.count[...] + 1
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class GoogLeNetEmbedding(nnx.Module):
  """torchvision's GoogLeNet backbone (no aux heads, transform_input=False), then dropout
  (0.2, as torchvision's before `fc`) and the linear embedding head.

  `width` divides every channel count and `blocks` names the inception blocks built (default
  all nine; the max-pools before inception4a and inception5a stay where they are), for the
  tiny `googlenet_mini`.
  """

  def __init__(self, embedding_dim: int, *, width: int = 1, blocks: Sequence[str] | None = None,
               dropout: float = 0.2, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    def w(c: int) -> int:
      return max(1, c // width)

    self.conv1 = BasicConv2d(3, w(64), 7, dtype, rngs, stride=2, padding=3)
    self.conv2 = BasicConv2d(w(64), w(64), 1, dtype, rngs)
    self.conv3 = BasicConv2d(w(64), w(192), 3, dtype, rngs, padding=1)
    in_ch = w(192)
    self.block_names = tuple(_INCEPTION) if blocks is None else tuple(blocks)
    for name in self.block_names:
      _, *widths = _INCEPTION[name]
      block = Inception(in_ch, *[w(c) for c in widths], dtype=dtype, rngs=rngs)
      setattr(self, name, block)
      in_ch = block.out_channels
    self.feature_dim = in_ch
    self.dropout = StepDropout(dropout, rngs)
    self.embedding = nnx.Linear(in_ch, embedding_dim, dtype=dtype, kernel_init=_linear_init,
                                bias_init=_fan_in_uniform_bias(in_ch), rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The globally average-pooled 1024-d features (torchvision's input to dropout and `fc`)."""
    x = max_pool_ceil(self.conv1(x), 3, 2)
    x = max_pool_ceil(self.conv3(self.conv2(x)), 3, 2)
    stage = "3"
    for name in self.block_names:
      if name[-2] != stage:  # torchvision's maxpool3 (3, stride 2) and maxpool4 (2, stride 2)
        x = max_pool_ceil(x, 3, 2) if stage == "3" else max_pool_ceil(x, 2, 2)
        stage = name[-2]
      x = getattr(self, name)(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.embedding(self.dropout(self.features(x))).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Vision Transformers in timm's layout (timm's VisionTransformer with a class token,
# global_pool="token", num_classes=0), also DINO's.

# timm: Linear weights normal std 0.02 truncated at +-2 (100 std: a plain normal), biases 0;
# pos_embed the same, cls_token normal 1e-6; the patch convolution keeps PyTorch's default.
_vit_linear_init = nnx.initializers.normal(stddev=0.02)

# name -> (patch, width, depth, heads)
VIT_SPECS = {
    "vit_small_patch16": (16, 384, 12, 6),
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_mini": (8, 32, 2, 2),  # tests and tiny images
}


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 weights of PyTorch's bicubic interpolation with
  antialias=True, align_corners=False (PIL's kernel, a = -0.5, widened when shrinking; weights
  normalized to sum 1 at the borders): what timm's resample_abs_pos_embed applies per axis."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    j = np.arange(lo, hi)
    weights = _cubic((j - center + 0.5) * invscale)
    matrix[i, lo:hi] = weights / weights.sum()
  return matrix


def resample_pos_embed(pos_embed: Any, grid: tuple[int, int], num_prefix: int = 1) -> Any:
  """Position embeddings (1, prefix + g*g, D) resized to `grid` (h, w) as timm does it: the
  square grid of patch embeddings resized bicubically (antialiased), the class token kept.

  Works on numpy (float64 arithmetic) and on jax arrays (a fixed linear map, jit-friendly).
  """
  n = pos_embed.shape[1] - num_prefix
  g = int(round(n**0.5))
  if g * g != n:
    raise ValueError(f"position embeddings of {n} patches do not form a square grid")
  if (g, g) == tuple(grid):
    return pos_embed
  rows, cols = bicubic_resize_matrix(g, grid[0]), bicubic_resize_matrix(g, grid[1])
  xp = np if isinstance(pos_embed, np.ndarray) else jnp
  patches = pos_embed[0, num_prefix:].reshape(g, g, -1)
  if xp is jnp:
    rows, cols = jnp.asarray(rows, pos_embed.dtype), jnp.asarray(cols, pos_embed.dtype)
    resized = jnp.einsum("ih,hwd,jw->ijd", rows, patches, cols,
                         precision=jax.lax.Precision.HIGHEST)
  else:
    resized = np.einsum("ih,hwd,jw->ijd", rows, patches.astype(np.float64), cols)
    resized = resized.astype(pos_embed.dtype)
  resized = resized.reshape(1, grid[0] * grid[1], -1)
  return xp.concatenate([pos_embed[:, :num_prefix], resized], axis=1)


def _vit_linear(i: int, o: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(i, o, dtype=dtype, kernel_init=_vit_linear_init,
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping patch x patch convolution (with bias) to tokens: timm's `patch_embed`."""

  def __init__(self, patch: int, width: int, dtype: Any, rngs: nnx.Rngs):
    self.patch = patch
    self.proj = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID",
                         dtype=dtype, kernel_init=_conv_pytorch_default(3 * patch * patch),
                         bias_init=_fan_in_uniform_bias(3 * patch * patch), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)  # (N, H/p, W/p, D), rows then columns: timm's token order
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (timm's `attn`)."""

  def __init__(self, width: int, heads: int, dtype: Any, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = _vit_linear(width, 3 * width, dtype, rngs)
    self.proj = _vit_linear(width, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    head_dim = d // self.heads
    qkv = self.qkv(x).reshape(n, t, 3, self.heads, head_dim)  # timm's (3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q * head_dim**-0.5, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
    return self.proj(out)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 (timm's `mlp`)."""

  def __init__(self, width: int, hidden: int, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _vit_linear(width, hidden, dtype, rngs)
    self.fc2 = _vit_linear(hidden, width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, width: int, heads: int, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.attn = Attention(width, heads, dtype, rngs)
    self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, 4 * width, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViTEmbedding(nnx.Module):
  """timm's VisionTransformer (class token, no register tokens) and a linear embedding head.

  `pos_embed` covers the grid of `image_size` (default 224, timm's); images of another size
  (a multiple of the patch) use it resized to their grid on the fly, as timm's
  `dynamic_img_size=True` does. Features: the class token after the final norm.
  """

  def __init__(self, embedding_dim: int, *, patch: int, width: int, depth: int, heads: int,
               image_size: int = 224, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.patch_embed = PatchEmbed(patch, width, dtype, rngs)
    grid = image_size // patch
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, width)))
    self.pos_embed = nnx.Param(
        _vit_linear_init(rngs.params(), (1, 1 + grid * grid, width), jnp.float32))
    self.blocks = nnx.List([Block(width, heads, dtype, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.feature_dim = width
    self.embedding = nnx.Linear(width, embedding_dim, dtype=dtype, kernel_init=_linear_init,
                                bias_init=_fan_in_uniform_bias(width), rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The class token after the final LayerNorm (timm's output with num_classes=0)."""
    p = self.patch_embed.patch
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the "
                       f"patch size {p}")
    tokens = self.patch_embed(x)
    pos = resample_pos_embed(self.pos_embed[...], (x.shape[1] // p, x.shape[2] // p))
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, tokens.shape[-1]))
    x = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1) + pos.astype(tokens.dtype)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)[:, 0]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.embedding(self.features(x)).astype(jnp.float32)


def _conv_pytorch_default(fan_in: int):
  """PyTorch's default Conv/Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _jit_init(build: Any, rngs: nnx.Rngs) -> nnx.Module:
  """`build(rngs)` as one compiled program, with the classic (non-partitionable) threefry.

  Eagerly, each initializer of a deep network is a program of its own, and XLA's CPU backend
  takes seconds to compile each partitionable-threefry draw: minutes for a GoogLeNet on a small
  CPU. The draws do not depend on the global `jax_threefry_partitionable` setting.
  Under `nnx.eval_shape` this only traces.
  """
  with jax.threefry_partitionable(False):
    return nnx.jit(build)(rngs)


Embedding = ResNetEmbedding | GoogLeNetEmbedding | ViTEmbedding


def create_model(name: str, embedding_dim: int, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, image_size: int | None = None) -> Embedding:
  """Builds a backbone of `MODEL_NAMES` with a linear embedding head.

  `small` (a narrow ResNet10), `googlenet_mini` (GoogLeNet at 1/8 width, inception3a and 4a
  only, so one max-pool between stages) and `vit_mini`
  (patch 8, width 32, 2 blocks) are for tests and tiny images. `image_size` sets the grid of a
  ViT's position embeddings (None: 224 px, timm's; 32 for vit_mini; images of other sizes use
  them resized on the fly); the other models ignore it.
  """
  if name == "resnet50":
    return ResNetEmbedding(Bottleneck, (3, 4, 6, 3), embedding_dim, dtype=dtype, rngs=rngs)
  if name == "resnet18":
    return ResNetEmbedding(BasicBlock, (2, 2, 2, 2), embedding_dim, dtype=dtype, rngs=rngs)
  if name == "small":
    return ResNetEmbedding(BasicBlock, (1, 1, 1, 1), embedding_dim, base_width=16, dtype=dtype,
                           rngs=rngs)
  if name == "googlenet":
    return _jit_init(lambda r: GoogLeNetEmbedding(embedding_dim, dtype=dtype, rngs=r), rngs)
  if name == "googlenet_mini":
    return _jit_init(lambda r: GoogLeNetEmbedding(
        embedding_dim, width=8, blocks=("inception3a", "inception4a"),
        dtype=dtype, rngs=r), rngs)
  if name in VIT_SPECS:
    patch, width, depth, heads = VIT_SPECS[name]
    if image_size is None:
      image_size = 32 if name == "vit_mini" else 224
    return _jit_init(lambda r: ViTEmbedding(embedding_dim, patch=patch, width=width, depth=depth,
                                            heads=heads, image_size=image_size, dtype=dtype,
                                            rngs=r), rngs)
  raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
