"""TFDS builders of the paper's five benchmarks, read from their published layouts, and of a
folder of one's own images.

Importing this package registers `hn_cub`, `hn_cars`, `hn_sop`, `hn_inshop`, `hn_hotels50k`
and `hn_folder` with TFDS (manual download: `python -m hn_jax.tools.prepare`).
"""

from hn_jax.data.tfds_builders.cars import HnCars
from hn_jax.data.tfds_builders.common import LayoutBuilder, LayoutError
from hn_jax.data.tfds_builders.cub import HnCub
from hn_jax.data.tfds_builders.folder import HnFolder
from hn_jax.data.tfds_builders.hotels50k import HnHotels50k
from hn_jax.data.tfds_builders.inshop import HnInshop
from hn_jax.data.tfds_builders.sop import HnSop

# Dataset name (config.dataset, prepare --dataset) -> builder.
BUILDERS: dict[str, type[LayoutBuilder]] = {
    "cub": HnCub,
    "cars": HnCars,
    "sop": HnSop,
    "inshop": HnInshop,
    "hotels50k": HnHotels50k,
    "folder": HnFolder,  # one's own images (config.folder), not a paper dataset
}
