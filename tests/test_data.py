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
    seen = torch.cat([x[s.next_indices()] for _ in range(2)]).flatten().tolist()
    assert len(set(seen)) == 8  # no repeats within an epoch
    state = s.state_dict()
    a = [s.next_indices() for _ in range(3)]
    s.load_state_dict(state)
    b = [s.next_indices() for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _write_idx(path, array, gz=True, magic=None):
    import gzip

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) if magic is None else magic
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_dir(tmp_path, n_train=12, n_test=6, size=28):
    from dtm_core.data import IDX_FILES

    rng = np.random.default_rng(0)
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for part, n in (("train", n_train), ("test", n_test)):
        images, labels = IDX_FILES[part]
        _write_idx(root / images, rng.integers(0, 256, (n, size, size)))
        _write_idx(root / labels, np.arange(n) % 10)
    return root


def test_idx_reads_resizes_and_pads(tmp_path):
    from dtm_core.data import load_idx_source, read_idx

    root = _idx_dir(tmp_path)
    raw = read_idx(root / "train-images-idx3-ubyte.gz")
    assert raw.shape == (12, 28, 28) and raw.dtype == np.uint8
    native = load_idx_source(root, 28)
    np.testing.assert_allclose(native.images[:, 0], raw / 127.5 - 1.0, atol=1e-6)
    assert native.labels.tolist() == [i % 10 for i in range(12)]
    assert native.classes[5] == "sandal"  # the Debian directory's name marks Fashion-MNIST
    small = load_idx_source(root, 16)
    assert small.images.shape == (12, 1, 16, 16) and small.images.min() >= -1 and small.images.max() <= 1
    padded = load_idx_source(root, 32)
    assert padded.images.shape == (12, 1, 32, 32)
    assert (padded.images[:, :, :2] == -1).all() and (padded.images[:, :, :, -2:] == -1).all()
    np.testing.assert_array_equal(padded.images[:, :, 2:30, 2:30], native.images)
    test = load_idx_source(root, 16, "test")
    assert len(test) == 6


def test_idx_raw_files_and_class_names(tmp_path):
    from dtm_core.data import load_idx_source

    root = tmp_path / "mine"
    root.mkdir()
    _write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((3, 4, 4)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", [0, 1, 1])
    assert load_idx_source(root, 4).classes == ("0", "1")
    assert load_idx_source(root, 4, classes=["cat", "dog"]).classes == ("cat", "dog")
    with pytest.raises(DataError, match="data.class_names"):
        load_idx_source(root, 4, classes=["cat"])


@pytest.mark.parametrize("damage, message", [
    ("nodir", "apt-get install dataset-fashion-mnist"),
    ("nofile", "t10k-labels-idx1-ubyte.gz"),
    ("magic", "bad magic"),
    ("truncated", "truncated or corrupt"),
    ("notgzip", "cannot be read"),
    ("count", "not N images and N labels"),
])
def test_idx_bad_input_names_the_fix(tmp_path, damage, message):
    from dtm_core.data import load_idx_source

    root = _idx_dir(tmp_path)
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    part = "train"
    if damage == "nodir":
        root = tmp_path / "absent"
    elif damage == "nofile":
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
        part = "test"
    elif damage == "magic":
        _write_idx(images, np.zeros((2, 4, 4)), magic=bytes([0, 0, 0x0D, 3]))
    elif damage == "truncated":
        import gzip

        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-5]))
    elif damage == "notgzip":
        images.write_bytes(b"not a gzip file at all")
    elif damage == "count":
        _write_idx(labels, [0, 1, 2])
    with pytest.raises(DataError, match=message) as info:
        load_idx_source(root, 16, part)
    assert "data.idx_dir" in str(info.value)
    if damage == "nodir":
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
            assert name in str(info.value)


def test_prepare_writes_a_test_split(tmp_path, monkeypatch):
    from dtm_core.config import parse_params
    from stages import prepare

    root = _idx_dir(tmp_path, n_train=40, n_test=10, size=8)
    monkeypatch.chdir(tmp_path)
    params = parse_params({"data": {"source": "idx", "idx_dir": str(root), "image_size": 8,
                                    "holdout_fraction": 0.25}, "model": {"pretrained_path": None}})
    info = prepare.prepare(params)
    assert (info["train_images"], info["heldout_images"], info["test_images"]) == (30, 10, 10)
    test = load_split(tmp_path / "data" / "prepared", "test")
    assert len(test) == 10 and test.images.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize("reference", ["test", "validation"])
def test_a_validation_reference_keeps_the_test_images_out_of_the_classifier_stage(tmp_path_factory, reference):
    import json

    from stagehelp import built_project

    idx = _idx_dir(tmp_path_factory.mktemp("idx"), n_train=200, n_test=60, size=8)
    proj, _ = built_project(tmp_path_factory, f"ref-{reference}", [("prepare", ()), ("classifier", ())], {
        "data.source": "idx", "data.idx_dir": str(idx), "data.image_size": 8, "evaluate.reference": reference})
    with np.load(proj / "models" / "classifier" / "reference_features.npz") as npz:
        ref = {k: npz[k] for k in npz.files}
    assert str(ref["test_name"]) == reference
    if reference == "test":  # the 60 t10k images
        assert len(ref["test"]) == 60 and len(ref["heldout"]) != 60
    else:  # the held-out split in their place: FD of a sweep never sees a test image
        np.testing.assert_array_equal(ref["test"], ref["heldout"])
    clf = json.loads((proj / "metrics" / "classifier.json").read_text())
    assert clf["reference"] == reference
    # the train-test gap of unseen real images exists only where the held-out split is not the reference itself
    from stages.report import test_floor

    assert (test_floor(ref, 40, seed=0)["real_train_test_gap"] is None) == (reference == "validation")
