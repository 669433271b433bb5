"""classifier: the feature classifier, the real data's reference features, the real-vs-real floor."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import data as data_mod
from .. import metrics as metrics_mod
from ..config import Params, derive_seed
from ..io import atomic_dir
from .common import CLASSIFIER_DIR, DATA_DIR, REFERENCE_FILE, NullRun


def classifier(params: Params, run: Any = NullRun()) -> dict:
    """Train the feature classifier; reference features of the real data; the floor."""
    ev = params.evaluate
    if ev.features == "inception":
        metrics_mod.inception_weights(ev.inception_dir)  # fail before any work
    train_ds = data_mod.load_split(DATA_DIR, "train")
    held_ds = data_mod.load_split(DATA_DIR, "heldout")
    cfg = ev.classifier
    res = metrics_mod.train_classifier(
        train_ds.images, train_ds.labels, held_ds.images, held_ds.labels,
        len(train_ds.classes), cfg, derive_seed(params.seed, "classifier"),
    )
    extract = metrics_mod.feature_extractor(ev.features, res.model, ev.inception_dir)
    train_feats, held_feats = extract(train_ds.images), extract(held_ds.images)
    class_freq = np.bincount(train_ds.labels, minlength=len(train_ds.classes)) / len(train_ds)
    with atomic_dir(CLASSIFIER_DIR) as tmp:
        metrics_mod.save_classifier(res.model, tmp / "classifier", {"classes": list(train_ds.classes)})
        # Reference statistics of the real data, once per data version.
        np.savez(tmp / REFERENCE_FILE.name, train=train_feats, heldout=held_feats, class_freq=class_freq,
                 features=np.asarray(ev.features))
    floor = metrics_mod.distances(held_feats, train_feats, ev.kid_subsets, ev.kid_subset_size,
                                  ev.bootstrap_rounds, derive_seed(params.seed, "kid"))
    return {
        "heldout_accuracy": res.heldout_accuracy,
        "train_accuracy": res.train_accuracy,
        "dead_feature_fraction": res.dead_feature_fraction,
        "features": ev.features,
        "feature_dim": int(train_feats.shape[1]),
        # the real-vs-real floor: held-out vs train images, same features
        **{f"floor_{k}": v for k, v in floor.items()},
        "floor_num_samples": len(held_feats),
    }
