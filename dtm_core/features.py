"""Feature spaces for FD/KID: a small classifier trained on the data, or clean-fid's Inception.

The embedded feature space is a small classifier trained on the train
split (digits by default, or the user's image-folder classes). Its features
are the *pre-activation* penultimate layer: a ReLU'd layer leaves a share of
dimensions dead (constant zero), which makes the covariance singular and the
distance blind to them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import ClassifierConfig
from .data import to_uint8
from .errors import MissingInputError, WeightsMissingError
from .io import atomic_dir

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class FeatureClassifier(torch.nn.Module):
    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int):
        super().__init__()
        self.hparams = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, feature_dim=feature_dim
        )
        self.conv1 = torch.nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(64 * 16, feature_dim)
        self.head = torch.nn.Linear(feature_dim, num_classes)
        # Fixed after training so that train features have unit mean variance
        # per dimension: an isotropic rescale (FD's geometry is unchanged)
        # that keeps KID's cubic kernel in a sane numeric range.
        self.register_buffer("feature_scale", torch.ones(()))

    def _penultimate(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = self.pool(h).flatten(1)
        return self.fc(h)  # pre-activation: no dead dimensions

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._penultimate(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self._penultimate(x)))


@dataclass
class ClassifierResult:
    model: FeatureClassifier
    heldout_accuracy: float
    train_accuracy: float
    dead_feature_fraction: float


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    num_classes: int,
    cfg: ClassifierConfig,
    seed: int,
) -> ClassifierResult:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train_images)
    y = torch.as_tensor(train_labels)
    model = FeatureClassifier(x.shape[1], x.shape[-1], num_classes, cfg.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    model.train()
    for _ in tqdm(range(cfg.steps), desc="classifier", file=sys.stderr, mininterval=2.0, disable=None):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen)
        # light augmentation: one-pixel shifts, so the classifier reads shape not position
        batch = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
        loss = F.cross_entropy(model(batch), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        raw = extract_features(model, train_images)
        model.feature_scale.fill_(float(1.0 / np.sqrt(raw.var(axis=0).mean())))
    feats = extract_features(model, heldout_images)
    dead = float((feats.std(axis=0) < 1e-6).mean())
    return ClassifierResult(
        model=model,
        heldout_accuracy=accuracy(model, heldout_images, heldout_labels),
        train_accuracy=accuracy(model, train_images, train_labels),
        dead_feature_fraction=dead,
    )


@torch.no_grad()
def predict(model: FeatureClassifier, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    x = torch.as_tensor(images)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def accuracy(model: FeatureClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images).argmax(1) == labels).mean())


@torch.no_grad()
def extract_features(model: FeatureClassifier, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    x = torch.as_tensor(images, dtype=torch.float32)
    feats = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(feats).double().numpy()


def save_classifier(model: FeatureClassifier, path: str | Path, extra: dict | None = None) -> None:
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / CLASSIFIER_WEIGHTS))
        (tmp / CLASSIFIER_CONFIG).write_text(json.dumps({**model.hparams, **(extra or {})}, indent=2) + "\n")


def load_classifier(path: str | Path) -> FeatureClassifier:
    path = Path(path)
    cfg_file, weights = path / CLASSIFIER_CONFIG, path / CLASSIFIER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise MissingInputError(
            f"feature classifier missing in '{path}' (need {CLASSIFIER_CONFIG} and {CLASSIFIER_WEIGHTS}): "
            "run dvc repro classifier"
        )
    hp = json.loads(cfg_file.read_text())
    model = FeatureClassifier(hp["in_channels"], hp["image_size"], hp["num_classes"], hp["feature_dim"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MissingInputError(
            f"'{weights}' is corrupt or does not fit its config ({exc}); re-run dvc repro classifier"
        ) from exc
    return model.eval()


# ------------------------------------------------------------- Inception
INCEPTION_FILE = "inception-2015-12-05.pt"
CLEANFID_DIR = Path("/tmp")  # where clean-fid itself looks for (and downloads) the file


def inception_weights(directory: Optional[str] = None) -> Path:
    """The weight file clean-fid's ``mode="clean"`` Inception loads; checked, never downloaded."""
    path = (Path(directory).expanduser() if directory else CLEANFID_DIR) / INCEPTION_FILE
    if not path.is_file():
        from cleanfid.downloads_helper import inception_url

        raise WeightsMissingError(
            f"evaluate.features is 'inception' but the Inception weight file '{path}' is missing, and this "
            f"machine cannot download it. On a connected machine run `curl -L -o {INCEPTION_FILE} "
            f"{inception_url}` (or let clean-fid fetch it: python -c \"from cleanfid.features import "
            f"build_feature_extractor as b; b('clean', use_dataparallel=False)\" puts it in /tmp), copy it to "
            f"'{path}', or set evaluate.inception_dir to the directory that holds it."
        )
    return path


class InceptionFeatures:
    """clean-fid's standard ``mode="clean"`` pipeline: uint8 images, PIL bicubic resize
    to 299x299 per channel (grayscale repeated to RGB), the TorchScript Inception's
    2048-d pool features."""

    dim = 2048

    def __init__(self, weights: Path, batch_size: int = 64, device: Optional[str] = None):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(self.device).eval()
        self.resize = build_resizer("clean")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        u8 = to_uint8(images)
        if u8.shape[-1] == 1:
            u8 = np.repeat(u8, 3, axis=-1)
        feats = []
        for i in tqdm(range(0, len(u8), self.batch_size), desc="inception", file=sys.stderr,
                      mininterval=2.0, disable=None):
            batch = np.stack([self.resize(img) for img in u8[i : i + self.batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
            feats.append(self.model(x).double().cpu())
        return torch.cat(feats).numpy()


def feature_extractor(features: str, classifier: "FeatureClassifier", inception_dir: Optional[str] = None):
    """images ([-1, 1] NCHW) -> features, in the space ``evaluate.features`` names."""
    if features == "inception":
        return InceptionFeatures(inception_weights(inception_dir))
    return lambda images: extract_features(classifier, images)


