"""prepare: the image source split into train and held-out sets."""

from __future__ import annotations

from typing import Any

from .. import data as data_mod
from ..config import Params, derive_seed
from .common import DATA_DIR, NullRun


def prepare(params: Params, run: Any = NullRun()) -> dict:
    dataset = data_mod.load_source(params.data)
    train_ds, held_ds = data_mod.split(dataset, params.data.holdout_fraction, derive_seed(params.seed, "prepare"))
    data_mod.save_splits(DATA_DIR, train_ds, held_ds)
    return {
        "train_images": len(train_ds),
        "heldout_images": len(held_ds),
        "classes": len(dataset.classes),
        "image_shape": list(dataset.images.shape[1:]),
    }
