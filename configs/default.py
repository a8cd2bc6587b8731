"""Every setting of a run, with its default (the CUB settings of the paper on ResNet50).

Dataset configs start from this one and change what differs. Override any value on the
command line: `--config.loss=shn --config.learning_rate=0.002`. What the settings reproduce
(losses, samplers, transforms, the paper's per-dataset values) is in docs/protocol.md. On a
resumed run only the settings in `hn_jax/run_config.py`'s CHANGEABLE may change.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  config.dataset = "digits"  # digits, synthetic (no download) or cub, cars, sop, inshop, hotels50k.
  config.data_dir = ""  # Where prepared datasets live; empty: $HN_DATA_DIR (unused by digits, synthetic).
  # Decoded-image cache (README, "Datasets"): "auto" (memory if it fits cache_memory_gb, else a
  # memory-mapped file if it fits the disk, else off), "memory", "disk" or "off".
  config.cache = "auto"
  config.cache_dir = ""  # Folder of cache files; empty: <data_dir>/image_cache (prepared sets).
  config.cache_memory_gb = 0.0  # RAM "auto" may fill with decoded images; 0: a quarter of it.
  config.synthetic_classes = 200  # synthetic: classes generated; the first half train, the rest test.
  config.synthetic_images_per_class = 10  # synthetic: images per class.
  config.image_size = 256  # Side of the square crop fed to the model.
  config.mean = (0.485, 0.456, 0.406)  # Per-channel RGB mean of the dataset, images in [0, 1].
  config.std = (0.229, 0.224, 0.225)  # Per-channel RGB standard deviation.
  config.sampler = "filled"  # Batch sampler: "filled" (CUB, CARS) or "sample" (SOP, ...).
  config.images_per_class = 2  # Images of each class in a batch, side by side.
  config.repeat = 1  # Rounds over the classes per epoch ("sample" sampler only).
  # Model.
  config.model = "resnet50"  # Backbone: "resnet50", "resnet18" or "small" (tests, tiny images).
  config.embedding_dim = 64  # Output dimension of the embedding head.
  config.pretrained = ""  # Path of torchvision backbone weights; empty: random init.
  config.half_precision = False  # Compute in bfloat16 (parameters, loss, optimizer stay float32).
  # Loss.
  config.loss = "sct"  # "hn" (hardest negative), "shn" (semi-hard) or "sct" (selective).
  config.lam = 1.0  # Weight of sct's hard-triplet term.
  config.temperature = 0.1  # Softmax temperature of the triplet term.
  config.hard_threshold = 0.8  # sct: a negative more similar than this makes a hard triplet.
  # Optimization.
  config.learning_rate = 0.009  # SGD learning rate (sct on CUB; shn uses 0.002).
  config.lr_drop_epochs = (40,)  # Epochs after which the learning rate is multiplied by 0.1.
  config.momentum = 0.0  # SGD momentum (the release used none).
  config.batch_size = 128  # Global batch size, over all devices and hosts.
  config.num_epochs = 80  # Epochs of training.
  config.seed = 0  # Seeds the initialization, the batch order and the augmentation.
  # Evaluation and bookkeeping.
  config.eval_every = 10  # Evaluate (and checkpoint) every this many epochs, and at epoch 0.
  config.eval_batch_size = 256  # Global batch size when embedding for evaluation.
  # Bytes of similarities in flight while ranking (over all devices); bounds evaluation memory.
  config.eval_max_bytes = 2 * 1024**3
  config.max_consecutive_skips = 10  # Stop after this many non-finite steps in a row.
  config.checkpoints_to_keep = 2  # Orbax keeps this many of the latest checkpoints.
  return config
