"""Feature extractors and distribution metrics (Frechet distance, KID).

The statistics themselves are clean-fid's (``cleanfid.fid.frechet_distance``
and ``cleanfid.fid.kernel_distance``), computed on features extracted at the
images' native resolution: clean-fid's ``compute_fid`` would resize every
image to 299x299 first, which changes the numbers for a custom extractor.

The embedded feature space is a small digit classifier trained on the train
split. Its features are the *pre-activation* penultimate layer: a ReLU'd
layer leaves a share of dimensions dead (constant zero), which makes the
covariance singular and the distance blind to them.
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
from .io import atomic_dir

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class DigitClassifier(torch.nn.Module):
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
    model: DigitClassifier
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
    model = DigitClassifier(x.shape[1], x.shape[-1], num_classes, cfg.feature_dim)
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
def predict(model: DigitClassifier, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    x = torch.as_tensor(images)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images).argmax(1) == labels).mean())


@torch.no_grad()
def extract_features(model: DigitClassifier, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    x = torch.as_tensor(images, dtype=torch.float32)
    feats = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(feats).double().numpy()


def save_classifier(model: DigitClassifier, path: str | Path, extra: dict | None = None) -> None:
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / CLASSIFIER_WEIGHTS))
        (tmp / CLASSIFIER_CONFIG).write_text(json.dumps({**model.hparams, **(extra or {})}, indent=2) + "\n")


def load_classifier(path: str | Path) -> DigitClassifier:
    path = Path(path)
    cfg_file, weights = path / CLASSIFIER_CONFIG, path / CLASSIFIER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"feature classifier missing in '{path}' (need {CLASSIFIER_CONFIG} and {CLASSIFIER_WEIGHTS}): "
            "run dvc repro classifier"
        )
    hp = json.loads(cfg_file.read_text())
    model = DigitClassifier(hp["in_channels"], hp["image_size"], hp["num_classes"], hp["feature_dim"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"'{weights}' is corrupt or does not fit its config ({exc}); re-run dvc repro classifier") from exc
    return model.eval()


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between two feature sets, by clean-fid's formula."""
    from cleanfid.fid import frechet_distance as _fd

    if len(feats_a) <= feats_a.shape[1] or len(feats_b) <= feats_b.shape[1]:
        raise ValueError(
            f"Frechet distance needs more samples than feature dimensions ({feats_a.shape[1]}); "
            f"got {len(feats_a)} and {len(feats_b)}. Raise evaluate.num_samples."
        )
    mu_a, sigma_a = feature_stats(feats_a)
    mu_b, sigma_b = feature_stats(feats_b)
    return float(_fd(mu_a, sigma_a, mu_b, sigma_b))


def kernel_distance(feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int, subset_size: int, seed: int) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel) by clean-fid, with a fixed subset seed."""
    from cleanfid.fid import kernel_distance as _kid

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(_kid(feats_a, feats_b, num_subsets=num_subsets, max_subset_size=subset_size))
    finally:
        np.random.set_state(state)


# ------------------------------------------------------------- Inception
INCEPTION_FILE = "inception-2015-12-05.pt"
CLEANFID_DIR = Path("/tmp")  # where clean-fid itself looks for (and downloads) the file


class InceptionWeightsMissing(FileNotFoundError):
    """clean-fid's Inception weights are not on disk, and nothing can be downloaded."""


def inception_weights(directory: Optional[str] = None) -> Path:
    """The weight file clean-fid's ``mode="clean"`` Inception loads; checked, never downloaded."""
    path = (Path(directory).expanduser() if directory else CLEANFID_DIR) / INCEPTION_FILE
    if not path.is_file():
        from cleanfid.downloads_helper import inception_url

        raise InceptionWeightsMissing(
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
        u8 = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
        if u8.shape[-1] == 1:
            u8 = np.repeat(u8, 3, axis=-1)
        feats = []
        for i in tqdm(range(0, len(u8), self.batch_size), desc="inception", file=sys.stderr,
                      mininterval=2.0, disable=None):
            batch = np.stack([self.resize(img) for img in u8[i : i + self.batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
            feats.append(self.model(x).double().cpu())
        return torch.cat(feats).numpy()


# ------------------------------------------------------------ uncertainty
def bootstrap_ci(
    feats: np.ndarray,
    reference: np.ndarray,
    statistic,
    rounds: int,
    seed: int,
    paired_with: Optional[np.ndarray] = None,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(feats, reference)`` over the generated samples.

    Resampling with replacement duplicates samples, which inflates FD and
    KID (both are biased upwards as the number of distinct samples falls), so
    the raw bootstrap distribution sits above the estimate. The interval is
    therefore the bootstrap distribution's percentile spread re-centred on
    the estimate: ``estimate + quantiles(boot - mean(boot))``.

    With ``paired_with`` (features of another model sampled from the same
    noise) the statistic is the difference ``stat(feats) - stat(paired_with)``
    and both sets are resampled with the same indices: common random numbers
    carry into the interval.
    """

    def stat(idx=None) -> float:
        a = feats if idx is None else feats[idx]
        value = statistic(a, reference)
        if paired_with is not None:
            value -= statistic(paired_with if idx is None else paired_with[idx], reference)
        return value

    rng = np.random.default_rng(seed)
    boot = np.array([stat(rng.integers(0, len(feats), len(feats))) for _ in range(rounds)])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot - boot.mean(), [tail, 100 - tail]) + stat()
    return float(low), float(high)


def feature_extractor(features: str, classifier: "DigitClassifier", inception_dir: Optional[str] = None):
    """images ([-1, 1] NCHW) -> features, in the space ``evaluate.features`` names."""
    if features == "inception":
        return InceptionFeatures(inception_weights(inception_dir))
    return lambda images: extract_features(classifier, images)


def distances(feats: np.ndarray, reference: np.ndarray, kid_subsets: int, kid_subset_size: int,
              bootstrap_rounds: int, seed: int) -> dict:
    """FD and KID against the reference, each with a 95% bootstrap interval.

    The KID inside the bootstrap uses a tenth of the subsets (at least 5) to
    keep the cost bounded; the point estimate uses all of them.
    """
    kid = lambda a, b, n=kid_subsets: kernel_distance(a, b, n, kid_subset_size, seed)  # noqa: E731
    kid_boot = lambda a, b: kid(a, b, max(5, kid_subsets // 10))  # noqa: E731
    return {
        "fd": frechet_distance(feats, reference),
        "kid": kid(feats, reference),
        "fd_ci": list(bootstrap_ci(feats, reference, frechet_distance, bootstrap_rounds, seed)),
        "kid_ci": list(bootstrap_ci(feats, reference, kid_boot, bootstrap_rounds, seed + 1)),
    }


def class_coverage(probs: np.ndarray, class_freq: np.ndarray) -> dict:
    """Predicted-class histogram vs the real class frequencies: mode dropping and sharpness."""
    hist = np.bincount(probs.argmax(1), minlength=len(class_freq)) / len(probs)
    eps = 1e-6
    p, q = class_freq + eps, hist + eps
    return {
        "class_histogram": hist.tolist(),
        "class_tv_distance": float(0.5 * np.abs(hist - class_freq).sum()),
        "class_kl_divergence": float(np.sum(p / p.sum() * np.log((p / p.sum()) / (q / q.sum())))),
        "mean_confidence": float(probs.max(1).mean()),
    }
