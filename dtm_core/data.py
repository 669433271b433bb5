"""Image sources, the deterministic train/held-out split, and batching.

Sources:
- ``digits``: scikit-learn's 8x8 handwritten digits (ships inside the
  package; no download). The embedded default.
- ``imagefolder``: ``<root>/<class>/<image>`` (torchvision's ImageFolder
  layout), resized to ``data.image_size``; labels come from the subfolders.

All images are float32 NCHW scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .io import atomic_dir, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # float32, (N, C, H, W), in [-1, 1]
    labels: np.ndarray  # int64, (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def load_digits_source() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return Dataset(images[:, None], digits.target.astype(np.int64), tuple(str(c) for c in range(10)))


def load_imagefolder_source(root: str | Path, image_size: int, channels: int) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    key = "data.image_folder"
    if not root.is_dir():
        raise DataError(f"{key}: '{root}' is not a directory; point it at <root>/<class>/<image> files.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{key}: '{root}' has no class subfolders; put images in <root>/<class>/ "
            "(a single folder such as <root>/all/ is fine for one class)."
        )
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{key}: '{file}' is not an image file (suffix {file.suffix or 'none'}); "
                    f"remove it or keep only {sorted(IMAGE_SUFFIXES)} files."
                )
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((image_size, image_size), Image.BICUBIC)
                    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{key}: '{file}' cannot be read as an image ({exc}); remove or replace it.") from exc
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{key}: '{root}' contains no images; add files under its class subfolders.")
    return Dataset(
        np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs)
    )


def load_source(cfg: DataConfig) -> Dataset:
    if cfg.source == "digits":
        return load_digits_source()
    return load_imagefolder_source(cfg.image_folder, cfg.image_size, cfg.channels)


def split(dataset: Dataset, holdout_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic stratified split: each class contributes its share."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(dataset.labels):
        idx = np.flatnonzero(dataset.labels == label)
        idx = rng.permutation(idx)
        n_held = int(round(len(idx) * holdout_fraction))
        held.extend(idx[:n_held].tolist())
    mask = np.zeros(len(dataset), dtype=bool)
    mask[held] = True
    if mask.all() or not mask.any():
        raise DataError(
            f"data.holdout_fraction={holdout_fraction} leaves an empty split for {len(dataset)} images; "
            "use more images or a fraction nearer 0.2."
        )
    pick = lambda m: Dataset(dataset.images[m], dataset.labels[m], dataset.classes)  # noqa: E731
    return pick(~mask), pick(mask)


def save_splits(out_dir: str | Path, train: Dataset, heldout: Dataset, info: Optional[dict] = None) -> None:
    """``train.npz`` and ``heldout.npz`` (and ``info.json`` when given), atomically."""
    with atomic_dir(out_dir) as tmp:
        for name, ds in (("train", train), ("heldout", heldout)):
            np.savez(tmp / f"{name}.npz", images=ds.images, labels=ds.labels, classes=np.asarray(ds.classes))
        if info is not None:
            write_json(tmp / "info.json", info)


def load_split(data_dir: str | Path, name: str) -> Dataset:
    path = Path(data_dir) / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"'{path}' is missing: run the prepare stage (dvc repro prepare).")
    try:
        with np.load(path) as npz:
            return Dataset(npz["images"], npz["labels"], tuple(str(c) for c in npz["classes"]))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"'{path}' is corrupt ({exc}); re-run dvc repro prepare.") from exc


class BatchSampler:
    """Endless shuffled minibatches from a tensor, driven by its own generator."""

    def __init__(self, images: np.ndarray | torch.Tensor, batch_size: int, generator: torch.Generator):
        self.images = torch.as_tensor(images)
        self.batch_size = min(batch_size, len(self.images))
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.images), generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.images[idx]

    def state_dict(self) -> dict:
        return {"order": self._order.clone(), "pos": self._pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._order = state["order"].clone()
        self._pos = int(state["pos"])
        self.generator.set_state(state["generator"])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW floats to uint8 NHWC."""
    arr = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)
