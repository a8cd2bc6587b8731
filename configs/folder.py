"""One's own images: `--config.folder=DIR` (DIR/<class>/<image>) or `=FILE.csv` (a listing).

  python -m hn_jax.main --config=configs/folder.py --config.folder=/path/to/photos \
      --workdir=/tmp/mine

The classes sorted by name, the first half train and the rest test (CUB's and CARS'
convention), unless DIR has train/ and test/ folders or the CSV a split column. The first run
prepares the images once (TFDS ArrayRecord files under --config.data_dir, $HN_DATA_DIR or
~/.cache/hn_jax/datasets, a copy per folder) and says so in one line, with the files it could
not read. docs/folder.md shows it end to end. The recipe is the paper's CUB one at 224 px
from torchvision's ImageNet ResNet50 (downloaded once), with a smaller batch and fewer epochs
for small collections; override any of it on the command line.
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "folder"
  config.folder = ""  # required: --config.folder=DIR or =FILE.csv
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.image_size = 224
  config.embedding_dim = 128
  config.batch_size = 32
  config.num_epochs = 30
  config.lr_drop_epochs = (20,)
  config.eval_every = 5
  config.eval_batch_size = 128
  return config
