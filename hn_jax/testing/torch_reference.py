"""PyTorch references for tests and benchmarks: the release's loss, a torchvision-layout ResNet.

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
