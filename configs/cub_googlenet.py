"""CUB-200-2011 on the release's third backbone, GoogLeNet ("GBN"): configs/cub.py otherwise.

The release's `setModel('GBN')` is torchvision's `googlenet(pretrained=True,
transform_input=False)` with `aux_logits=False` and `fc` replaced by Linear(1024, dim); here
`--config.model=googlenet` (hn_jax.models: dropout 0.2 before the embedding head, as
torchvision's before `fc`). Starts from torchvision's ImageNet weights, `googlenet-1378be20.pth`
(`pretrained="imagenet"`: downloaded once, docs/weights.md; its aux1/aux2 keys are read and
ignored). The learning rates are the ResNet50
ones of docs/protocol.md (the release lists none of its own for GoogLeNet): sct 0.009, shn 0.002.
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "cub"
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.mean = (0.4707, 0.4601, 0.4549)
  config.std = (0.2767, 0.2760, 0.2850)
  config.model = "googlenet"
  return config
