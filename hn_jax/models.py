"""ResNet embedding networks in Flax NNX, in torchvision's layout (ResNet v1.5).

Module and attribute names follow torchvision (`conv1`, `bn1`, `layer1[0].downsample`, ...)
so that a torchvision state dict maps onto the parameters key by key. The stride of a
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
from flax import nnx

# torchvision initialises convolutions with Kaiming-normal (fan_out) and its default Linear
# layer with U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

MODEL_NAMES = ("small", "resnet18", "resnet50")


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


def create_model(name: str, embedding_dim: int, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs) -> ResNetEmbedding:
  """Builds `small` (a narrow ResNet10 for tests and tiny images), `resnet18` or `resnet50`."""
  if name == "resnet50":
    return ResNetEmbedding(Bottleneck, (3, 4, 6, 3), embedding_dim, dtype=dtype, rngs=rngs)
  if name == "resnet18":
    return ResNetEmbedding(BasicBlock, (2, 2, 2, 2), embedding_dim, dtype=dtype, rngs=rngs)
  if name == "small":
    return ResNetEmbedding(BasicBlock, (1, 1, 1, 1), embedding_dim, base_width=16, dtype=dtype,
                           rngs=rngs)
  raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
