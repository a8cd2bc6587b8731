"""PyTorch references for tests and benchmarks: the release's loss, torchvision-layout ResNets
and GoogLeNet, a timm-layout ViT.

Independent implementations to check hn_jax against (tests/test_benchmark_train_step.py,
tests/test_pretrained.py) and to time beside it (benchmarks/train_step.py). PyTorch is
imported inside each function, so importing this module needs none.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------------------------
# The release's loss in PyTorch (docs/protocol.md section 1), vectorized.




def triplet_loss_torch(embeddings, labels, *, method: str = "sct", lam: float = 1.0,
                       temperature: float = 0.1, hard_threshold: float = 0.8,
                       with_aux: bool = False):
  """hn / shn / sct with batch-hard mining, as `hn_jax.losses.triplet_loss`, in float32.

  Cosine similarities of the rows normalized by max(||f||, 1e-12), diagonal -1; easiest
  positive among same-label others with similarity <= 0.9999; hardest negative (for shn: no
  more similar than the positive); selection without gradient; an anchor is valid when both
  chosen similarities lie in (-1, 1). hn/shn: mean softplus((neg - pos) / t) over valid
  anchors; sct: softplus on easy triplets, lam * neg on hard ones, over n_easy + n_hard.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  f = embeddings.float()
  norm = torch.sqrt(torch.clamp((f * f).sum(dim=1, keepdim=True), min=1e-24))
  u = f / norm
  n = u.shape[0]
  eye = torch.eye(n, dtype=torch.bool, device=u.device)
  sims = (u @ u.T).masked_fill(eye, -1.0)
  fixed = sims.detach()

  same = labels[:, None] == labels[None, :]
  pos_candidates = torch.where(same & ~eye & (fixed <= 0.9999), fixed, -1.0)
  pos_value, pos_idx = pos_candidates.max(dim=1)
  neg_ok = ~same
  if method == "shn":
    neg_ok = neg_ok & (fixed <= pos_value[:, None])
  elif method not in ("hn", "sct"):
    raise ValueError(f"unknown loss method {method!r}")
  neg_value, neg_idx = torch.where(neg_ok, fixed, -1.0).max(dim=1)

  valid = (pos_value > -1) & (pos_value < 1) & (neg_value > -1) & (neg_value < 1)
  pos = sims.gather(1, pos_idx[:, None])[:, 0]
  neg = sims.gather(1, neg_idx[:, None])[:, 0]
  contrastive = F.softplus((neg - pos) / temperature)
  zero = torch.zeros((), device=u.device)
  if method == "sct":
    hard = valid & ((neg > pos) | (neg > hard_threshold))
    easy = valid & (neg < pos) & (neg < hard_threshold)
    total = (torch.where(easy, contrastive, zero).sum()
             + lam * torch.where(hard, neg, zero).sum())
    loss = total / torch.clamp(easy.sum() + hard.sum(), min=1)
  else:
    loss = torch.where(valid, contrastive, zero).sum() / torch.clamp(valid.sum(), min=1)
  if not with_aux:
    return loss
  with torch.no_grad():
    hard = valid & ((neg > pos) | (neg > hard_threshold))
    easy = valid & (neg < pos) & (neg < hard_threshold)
    per_valid = torch.clamp(valid.sum(), min=1).float()
    aux = {
        "hn_ratio": (valid & (neg > pos)).sum() / per_valid,
        "num_valid": valid.sum().float(),
        "num_hard": hard.sum().float(),
        "num_easy": easy.sum().float(),
        "pos_sim": torch.where(valid, pos, zero).sum() / per_valid,
        "neg_sim": torch.where(valid, neg, zero).sum() / per_valid,
        "embedding_mean_sim": torch.where(eye, zero, fixed).sum() / max(1, n * (n - 1)),
    }
  return loss, aux


# ---------------------------------------------------------------------------------------------
# A torch ResNet in torchvision's layout (torchvision/models/resnet.py, v1.5), for hosts
# without torchvision and as the reference network of tests/test_pretrained.py. `small` mirrors
# hn_jax.models' small (BasicBlock x 1 per stage, base width 16).


def build_torch_resnet(name: str, embedding_dim: int, impl: str = "auto"):
  """(model, description): `name`'s ResNet with `fc` = Linear(features, embedding_dim)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  if impl in ("auto", "torchvision") and name != "small":
    try:
      import torchvision  # pylint: disable=g-import-not-at-top
    except ImportError:
      if impl == "torchvision":
        raise
    else:
      model = getattr(torchvision.models, name)(weights=None)
      model.fc = nn.Linear(model.fc.in_features, embedding_dim)
      return model, f"torchvision {torchvision.__version__} models.{name}(weights=None)"
  elif impl == "torchvision":
    raise ValueError("torchvision has no 'small' ResNet")

  def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False)

  def conv1x1(i, o, stride=1):
    return nn.Conv2d(i, o, 1, stride=stride, bias=False)

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = conv3x3(inplanes, planes, stride)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = conv3x3(planes, planes)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return self.relu(out + identity)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = conv1x1(inplanes, planes)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = conv3x3(planes, planes, stride)  # v1.5: the stride sits on the 3x3
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = conv1x1(planes, planes * self.expansion)
      self.bn3 = nn.BatchNorm2d(planes * self.expansion)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return self.relu(out + identity)

  class ResNet(nn.Module):

    def __init__(self, block, layers, num_outputs, base_width=64):
      super().__init__()
      self.inplanes = base_width
      self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
      self.bn1 = nn.BatchNorm2d(base_width)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
      for stage, blocks in enumerate(layers):
        setattr(self, f"layer{stage + 1}",
                self._make_layer(block, base_width * 2**stage, blocks, 1 if stage == 0 else 2))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(self.inplanes, num_outputs)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.ones_(m.weight)
          nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def features(self, x):
      """avgpool + flatten output: the input of `fc`."""
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
      return self.fc(self.features(x))

  specs = {"resnet50": (Bottleneck, (3, 4, 6, 3), 64), "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
           "small": (BasicBlock, (1, 1, 1, 1), 16)}
  block, layers, width = specs[name]
  return (ResNet(block, layers, embedding_dim, width),
          f"{name} in torchvision's layout (this file: hn_jax.testing.torch_reference)")


# ---------------------------------------------------------------------------------------------
# GoogLeNet in torchvision's layout (torchvision/models/googlenet.py: BasicConv2d, Inception,
# InceptionAux; its state-dict keys), written here from that layout for hosts without
# torchvision. `width` divides the channels, as hn_jax.models' googlenet_mini (width 8).

_INCEPTION_TORCH = (  # name, in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj
    ("inception3a", 192, 64, 96, 128, 16, 32, 32),
    ("inception3b", 256, 128, 128, 192, 32, 96, 64),
    ("inception4a", 480, 192, 96, 208, 16, 48, 64),
    ("inception4b", 512, 160, 112, 224, 24, 64, 64),
    ("inception4c", 512, 128, 128, 256, 24, 64, 64),
    ("inception4d", 512, 112, 144, 288, 32, 64, 64),
    ("inception4e", 528, 256, 160, 320, 32, 128, 128),
    ("inception5a", 832, 256, 160, 320, 32, 128, 128),
    ("inception5b", 832, 384, 192, 384, 48, 128, 128),
)


def build_torch_googlenet(num_classes: int = 1000, *, aux_logits: bool = True, width: int = 1):
  """A torch GoogLeNet with torchvision's keys (aux1/aux2 included when `aux_logits`, as in
  torchvision's IMAGENET1K_V1 file), transform_input=False. `.features(x)` returns the pooled
  1024-d features (the input of dropout and `fc`); eval-mode `forward` the logits."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def w(c):
    return max(1, c // width)

  class BasicConv2d(nn.Module):

    def __init__(self, i, o, **kwargs):
      super().__init__()
      self.conv = nn.Conv2d(i, o, bias=False, **kwargs)
      self.bn = nn.BatchNorm2d(o, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  class Inception(nn.Module):

    def __init__(self, i, c1, c3r, c3, c5r, c5, pp):
      super().__init__()
      self.branch1 = BasicConv2d(i, c1, kernel_size=1)
      self.branch2 = nn.Sequential(BasicConv2d(i, c3r, kernel_size=1),
                                   BasicConv2d(c3r, c3, kernel_size=3, padding=1))
      self.branch3 = nn.Sequential(BasicConv2d(i, c5r, kernel_size=1),
                                   BasicConv2d(c5r, c5, kernel_size=3, padding=1))
      self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                   BasicConv2d(i, pp, kernel_size=1))

    def forward(self, x):
      return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)

  class InceptionAux(nn.Module):

    def __init__(self, i, classes):
      super().__init__()
      self.conv = BasicConv2d(i, 128, kernel_size=1)
      self.fc1 = nn.Linear(2048, 1024)
      self.fc2 = nn.Linear(1024, classes)

  class GoogLeNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = BasicConv2d(3, w(64), kernel_size=7, stride=2, padding=3)
      self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
      self.conv2 = BasicConv2d(w(64), w(64), kernel_size=1)
      self.conv3 = BasicConv2d(w(64), w(192), kernel_size=3, padding=1)
      self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
      in_ch = w(192)
      for name, _, c1, c3r, c3, c5r, c5, pp in _INCEPTION_TORCH:
        setattr(self, name, Inception(in_ch, w(c1), w(c3r), w(c3), w(c5r), w(c5), w(pp)))
        in_ch = w(c1) + w(c3) + w(c5) + w(pp)
        if name == "inception3b":
          self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        elif name == "inception4e":
          self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
      if aux_logits:  # built only for their keys: torchvision uses them in training only
        self.aux1 = InceptionAux(w(512), num_classes)
        self.aux2 = InceptionAux(w(528), num_classes)
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.dropout = nn.Dropout(p=0.2)
      self.fc = nn.Linear(w(1024), num_classes)
      for m in self.modules():  # torchvision's init_weights
        if isinstance(m, (nn.Conv2d, nn.Linear)):
          nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)

    def features(self, x):
      x = self.maxpool1(self.conv1(x))
      x = self.maxpool2(self.conv3(self.conv2(x)))
      x = self.inception3b(self.inception3a(x))
      x = self.maxpool3(x)
      for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
        x = getattr(self, name)(x)
      x = self.maxpool4(x)
      x = self.inception5b(self.inception5a(x))
      return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
      return self.fc(self.dropout(self.features(x)))

  return GoogLeNet()


# ---------------------------------------------------------------------------------------------
# A Vision Transformer in timm's layout (timm/models/vision_transformer.py with a class token,
# global_pool="token", num_classes=0; DINO's files use the same keys), written from that
# layout. Position embeddings are resized as timm's resample_abs_pos_embed does (bicubic with
# antialias, class token kept): at load time (`load_state_dict_resized`) or, for images
# of another size, at every forward (timm's dynamic_img_size=True).


def build_torch_vit(*, patch: int = 16, width: int = 384, depth: int = 12, heads: int = 6,
                    image_size: int = 224, num_classes: int = 0):
  """A torch ViT with timm's state-dict keys; `.features(x)` is the normed class token."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def resample(pos, grid):
    n = pos.shape[1] - 1
    g = int(round(n**0.5))
    if (g, g) == tuple(grid):
      return pos
    patches = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", antialias=True,
                            align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)

  class PatchEmbed(nn.Module):

    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x):
      return self.proj(x).flatten(2).transpose(1, 2)

  class Attention(nn.Module):

    def __init__(self):
      super().__init__()
      self.qkv = nn.Linear(width, 3 * width)
      self.proj = nn.Linear(width, width)

    def forward(self, x):
      b, t, d = x.shape
      qkv = self.qkv(x).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
      return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))

  class Mlp(nn.Module):

    def __init__(self):
      super().__init__()
      self.fc1 = nn.Linear(width, 4 * width)
      self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x)))

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.attn = Attention()
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.mlp = Mlp()

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class VisionTransformer(nn.Module):

    def __init__(self):
      super().__init__()
      grid = image_size // patch
      self.patch_embed = PatchEmbed()
      self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 1e-6)
      self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, width) * 0.02)
      self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
      for m in self.modules():
        if isinstance(m, nn.Linear):
          nn.init.trunc_normal_(m.weight, std=0.02)
          nn.init.zeros_(m.bias)

    def features(self, x):
      tokens = self.patch_embed(x)
      pos = resample(self.pos_embed, (x.shape[2] // patch, x.shape[3] // patch))
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + pos
      return self.norm(self.blocks(x))[:, 0]

    def forward(self, x):
      return self.head(self.features(x))

    def load_state_dict_resized(self, state_dict):
      """load_state_dict with `pos_embed` resized to this model's grid (timm's filter)."""
      state_dict = dict(state_dict)
      grid = int(round((self.pos_embed.shape[1] - 1) ** 0.5))
      state_dict["pos_embed"] = resample(state_dict["pos_embed"], (grid, grid))
      return self.load_state_dict(state_dict)

  return VisionTransformer()


def randomize_norms(model, seed: int = 1) -> None:
  """Random affine parameters for every BatchNorm2d and LayerNorm of `model`, random running
  statistics for the BatchNorms (at their init values a comparison would test less)."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(0.1 * torch.randn(c, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
      elif isinstance(m, torch.nn.LayerNorm):
        c = m.normalized_shape[0]
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(0.1 * torch.randn(c, generator=gen))
