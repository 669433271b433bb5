"""Image sources, the deterministic train/held-out split, and batching.

Sources:
- ``digits``: scikit-learn's 8x8 handwritten digits (ships inside the
  package; no download). The embedded default.
- ``imagefolder``: ``<root>/<class>/<image>`` (torchvision's ImageFolder
  layout), resized to ``data.image_size``; labels come from the subfolders.
- ``idx``: the four IDX files of MNIST-style data sets in ``data.idx_dir``
  (Fashion-MNIST: Debian's ``dataset-fashion-mnist`` puts them in
  /usr/share/datasets/fashion-mnist). Its ``t10k`` files are a test split of
  their own, which only the final evaluation reads.

All images are float32 NCHW scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

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


IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _idx_missing(root: Path, what: str) -> DataError:
    names = ", ".join(n for pair in IDX_FILES.values() for n in pair)
    return DataError(
        f"data.idx_dir: {what}. The idx source needs the four IDX files {names} in that directory; "
        f"for Fashion-MNIST run `apt-get install {IDX_PACKAGE}` (they land in /usr/share/datasets/fashion-mnist) "
        "or set data.idx_dir to where yours are. Nothing is downloaded."
    )


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzip or raw) of unsigned bytes as an array of its declared shape."""
    import gzip

    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"data.idx_dir: '{path}' cannot be read ({exc}); reinstall {IDX_PACKAGE} or replace it.") \
            from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"data.idx_dir: '{path}' is not an IDX file of unsigned bytes (bad magic number); "
                        f"reinstall {IDX_PACKAGE} or replace it.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"data.idx_dir: '{path}' has a truncated IDX header; reinstall {IDX_PACKAGE} or replace it.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"data.idx_dir: '{path}' declares shape {shape} ({int(np.prod(shape))} bytes) but holds "
                        f"{len(raw) - header}; the file is truncated or corrupt: reinstall {IDX_PACKAGE}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W) to float32 (N, 1, size, size) in [-1, 1]: native size as is, a larger size padded with
    background, a smaller one by antialiased bilinear resampling."""
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    h = x.shape[-1]
    if size > h:
        lo = (size - h) // 2
        x = torch.nn.functional.pad(x, (lo, size - h - lo, lo, size - h - lo), value=-1.0)
    elif size < h:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp_(-1.0, 1.0)
    return x.numpy()


def load_idx_source(root: str | Path, image_size: int, part: str = "train",
                    classes: Optional[Sequence[str]] = None) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise _idx_missing(root, f"'{root}' is not a directory")
    image_file, label_file = (root / name for name in IDX_FILES[part])
    for f in (image_file, label_file):
        if not f.is_file():
            raise _idx_missing(root, f"'{f}' is missing")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"data.idx_dir: '{image_file}' (shape {images.shape}) and '{label_file}' (shape "
                        f"{labels.shape}) are not N images and N labels; reinstall {IDX_PACKAGE}.")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if classes is None:
        classes = FASHION_CLASSES if n_classes <= len(FASHION_CLASSES) and root.name == "fashion-mnist" else \
            tuple(str(c) for c in range(n_classes))
    if n_classes > len(classes):
        raise DataError(f"data.idx_dir: '{label_file}' has label {n_classes - 1} but only {len(classes)} class "
                        "names are known; set data.class_names to one name per label.")
    return Dataset(resize_images(images, image_size), labels.astype(np.int64), tuple(classes))


def load_source(cfg: DataConfig) -> Dataset:
    if cfg.source == "digits":
        return load_digits_source()
    if cfg.source == "idx":
        return load_idx_source(cfg.idx_dir, cfg.image_size, "train", cfg.class_names)
    return load_imagefolder_source(cfg.image_folder, cfg.image_size, cfg.channels)


def load_test_source(cfg: DataConfig) -> Optional[Dataset]:
    """The source's own test split (idx: the t10k files), or None when it has none."""
    if cfg.source == "idx":
        return load_idx_source(cfg.idx_dir, cfg.image_size, "test", cfg.class_names)
    return None


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


def save_splits(out_dir: str | Path, train: Dataset, heldout: Dataset, info: Optional[dict] = None,
                test: Optional[Dataset] = None) -> None:
    """``train.npz``, ``heldout.npz`` and, when given, ``test.npz`` and ``info.json``, atomically."""
    with atomic_dir(out_dir) as tmp:
        for name, ds in (("train", train), ("heldout", heldout), ("test", test)):
            if ds is None:
                continue
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
    """Endless shuffled minibatches of a tensor's rows (their indices, so labels can follow), driven by its own
    generator."""

    def __init__(self, images: np.ndarray | torch.Tensor, batch_size: int, generator: torch.Generator):
        self.images = torch.as_tensor(images)
        self.batch_size = min(batch_size, len(self.images))
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next_indices(self) -> torch.Tensor:
        """The next batch's row indices."""
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.images), generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

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
