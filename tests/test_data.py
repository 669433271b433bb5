import numpy as np
import pytest
import torch
from PIL import Image

from dtm_core.data import (
    BatchSampler,
    DataError,
    load_digits_source,
    load_imagefolder_source,
    load_split,
    save_splits,
    split,
)


def test_digits_source():
    ds = load_digits_source()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert set(ds.labels.tolist()) == set(range(10))


def test_split_deterministic_disjoint_stratified():
    ds = load_digits_source()
    tr1, ho1 = split(ds, 0.2, seed=5)
    tr2, ho2 = split(ds, 0.2, seed=5)
    np.testing.assert_array_equal(tr1.images, tr2.images)
    assert len(tr1) + len(ho1) == len(ds)
    assert abs(len(ho1) / len(ds) - 0.2) < 0.01
    # each class is represented in the held-out split in proportion
    counts = np.bincount(ho1.labels, minlength=10)
    assert counts.min() >= 30
    _, ho3 = split(ds, 0.2, seed=6)
    assert not np.array_equal(ho1.labels, ho3.labels) or not np.array_equal(ho1.images, ho3.images)


def test_save_load_splits(tmp_path):
    ds = load_digits_source()
    tr, ho = split(ds, 0.2, seed=0)
    save_splits(tmp_path / "d", tr, ho)
    back = load_split(tmp_path / "d", "heldout")
    np.testing.assert_array_equal(back.images, ho.images)
    assert back.classes == ds.classes
    with pytest.raises(DataError, match="prepare"):
        load_split(tmp_path / "nowhere", "train")


def _folder(tmp_path, classes=("a", "b"), n=3):
    root = tmp_path / "imgs"
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((12, 12), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_reads_and_resizes(tmp_path):
    ds = load_imagefolder_source(_folder(tmp_path), 8, 1)
    assert ds.images.shape == (6, 1, 8, 8)
    assert ds.classes == ("a", "b") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert -1.0 <= ds.images.min() and ds.images.max() <= 1.0
    rgb = load_imagefolder_source(_folder(tmp_path / "x"), 16, 3)
    assert rgb.images.shape == (6, 3, 16, 16)


def test_imagefolder_non_image_file(tmp_path):
    root = _folder(tmp_path)
    (root / "a" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt.*not an image"):
        load_imagefolder_source(root, 8, 1)


def test_imagefolder_corrupt_image(tmp_path):
    root = _folder(tmp_path)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png.*cannot be read"):
        load_imagefolder_source(root, 8, 1)


def test_imagefolder_empty(tmp_path):
    (tmp_path / "e" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        load_imagefolder_source(tmp_path / "e", 8, 1)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_imagefolder_source(tmp_path / "flat", 8, 1)
    with pytest.raises(DataError, match="not a directory"):
        load_imagefolder_source(tmp_path / "missing", 8, 1)


def test_batch_sampler_epochs_and_state():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    s = BatchSampler(x, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([s.next() for _ in range(2)]).flatten().tolist()
    assert len(set(seen)) == 8  # no repeats within an epoch
    state = s.state_dict()
    a = [s.next() for _ in range(3)]
    s.load_state_dict(state)
    b = [s.next() for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
