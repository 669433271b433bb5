"""DVC stage classifier: the feature classifier, the real data's reference features, the real-vs-real floor.

-> models/classifier/ (weights, reference_features.npz) and metrics/classifier.json.
"""

from __future__ import annotations

import sys

import numpy as np

from dtm_core import data as data_mod
from dtm_core import distances, features
from dtm_core.config import Params
from dtm_core.io import atomic_dir
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import CLASSIFIER_DIR, DATA_DIR, REFERENCE_FILE, log_data_version, main


def classifier(params: Params, run=NullRun()) -> dict:
    ev = params.evaluate
    if ev.features == "inception":
        features.inception_weights(ev.inception_dir)  # fail before any work
    train_ds = data_mod.load_split(DATA_DIR, "train")
    held_ds = data_mod.load_split(DATA_DIR, "heldout")
    # the real-vs-real floor compares the held-out images with the train set
    distances.check_fd_sample_count(
        len(held_ds), ev.feature_dim, f"the held-out split ({len(held_ds)} images)",
        "lower evaluate.classifier.feature_dim, or raise data.holdout_fraction (or add images)",
    )
    res = features.train_classifier(
        train_ds.images, train_ds.labels, held_ds.images, held_ds.labels,
        len(train_ds.classes), ev.classifier, derive_seed(ev.classifier.seed, "classifier"),
    )
    extract = features.feature_extractor(ev.features, res.model, ev.inception_dir)
    train_feats, held_feats = extract(train_ds.images), extract(held_ds.images)
    # a source with a test split of its own (idx) is scored against it: the models never trained on it;
    # evaluate.reference validation puts the held-out split in its place, so a sweep never sees the test images
    test_ds = data_mod.load_split(DATA_DIR, "test") if (DATA_DIR / "test.npz").is_file() else None
    if test_ds is not None and ev.reference == "validation":
        test_ds = held_ds
    test = {} if test_ds is None else {"test": extract(test_ds.images), "test_name": np.asarray(ev.reference)}
    class_freq = np.bincount(train_ds.labels, minlength=len(train_ds.classes)) / len(train_ds)
    with atomic_dir(CLASSIFIER_DIR) as tmp:
        features.save_classifier(res.model, tmp / "classifier", {"classes": list(train_ds.classes)})
        # Reference statistics of the real data, once per data version; the
        # classifier-space features also score choices on validation noise
        # (stages.common.validation_reference: train, or held-out on an idx source).
        np.savez(tmp / REFERENCE_FILE.name, train=train_feats, heldout=held_feats, class_freq=class_freq,
                 features=np.asarray(ev.features),
                 train_classifier=features.extract_features(res.model, train_ds.images),
                 heldout_classifier=features.extract_features(res.model, held_ds.images), **test)
    floor = distances.distances(held_feats, train_feats, ev.kid_subsets, ev.kid_subset_size,
                                ev.bootstrap_rounds, derive_seed(ev.seed, "kid"))
    log_data_version(run, params, "evaluation reference")
    run.log_metrics({"train_accuracy": res.train_accuracy, "dead_feature_fraction": res.dead_feature_fraction,
                     "floor_kid": floor["kid"]})
    # the real-vs-real floor: held-out vs train images, same features
    out = {"heldout_accuracy": res.heldout_accuracy, "floor_fd": floor["fd"], "floor_num_samples": len(held_feats)}
    if test_ds is not None:
        out["reference"] = ev.reference
        out["test_accuracy"] = features.accuracy(res.model, test_ds.images, test_ds.labels)
    return out


if __name__ == "__main__":
    sys.exit(main("classifier", classifier))
