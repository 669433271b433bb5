"""DVC stage prepare: read the image source, split it into train and held-out -> data/prepared/.

A source with a test split of its own (idx) also writes test.npz, which only
the final evaluation reads; the held-out split is then a validation split
carved out of train.

With ``model.pretrained_path`` set, the checkpoint's image size and channels
are checked against the data here, before any training.
"""

from __future__ import annotations

import sys

from dtm_core import data as data_mod
from dtm_core.config import Params
from dtm_core.errors import ModelLoadError
from dtm_core.io import read_unet_config
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import DATA_DIR, main


def check_checkpoint_shape(params: Params) -> None:
    """A user's checkpoint must take the images the data source yields."""
    path = params.model.pretrained_path
    if not path:
        return
    cfg = read_unet_config(path)
    if cfg is None:
        return  # pretrain names the missing or broken checkpoint with its own message
    d = params.data
    size, channels = cfg.get("sample_size"), cfg.get("in_channels")
    if isinstance(size, (list, tuple)):
        size = size[0]
    if (size, channels) != (d.image_size, d.channels):
        raise ModelLoadError(
            f"model.pretrained_path '{path}' takes {channels}-channel {size}x{size} images but the data are "
            f"{d.channels}-channel {d.image_size}x{d.image_size} (data.channels, data.image_size): set "
            f"data.image_size: {size} and data.channels: {channels}, or use a checkpoint made for this data."
        )


def prepare(params: Params, run=NullRun()) -> dict:
    check_checkpoint_shape(params)
    dataset = data_mod.load_source(params.data)
    train_ds, held_ds = data_mod.split(
        dataset, params.data.holdout_fraction, derive_seed(params.data.split_seed, "prepare")
    )
    test_ds = data_mod.load_test_source(params.data)
    info = {
        "train_images": len(train_ds),
        "heldout_images": len(held_ds),
        **({"test_images": len(test_ds)} if test_ds is not None else {}),
        "classes": list(dataset.classes),
        "image_shape": list(dataset.images.shape[1:]),
    }
    data_mod.save_splits(DATA_DIR, train_ds, held_ds, info, test=test_ds)
    return {k: v for k, v in info.items() if k != "classes"} | {"num_classes": len(dataset.classes)}


if __name__ == "__main__":
    sys.exit(main("prepare", prepare))
