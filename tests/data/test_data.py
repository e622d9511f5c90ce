"""Tests for iwd_fast.data: file formats, normalisation, label noise, splits. No network."""
import gzip
import pickle
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from iwd_fast.data import (DatasetSplits, ImageSet, add_label_noise, class_indices, from_tensors,
                           from_torch_dataset, load_dataset, read_idx, stratified_split)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Fail loudly if anything opens a connection; point the cache at an empty folder."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("IWD_FAST_CACHE", str(tmp_path / "empty_cache"))


# ------------------------------------------------------------------------------------ file writers
def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx_set(folder: Path, rng, n_train=12, n_test=5, gz=True, size=28):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def write_cifar10(folder: Path, rng, per_batch=3, n_test=4):
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):  # bytes keys, as in the real (python 2) pickles
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
        xs.append(x)
        ys += y
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": test_x, b"labels": [1, 2, 3, 4][:n_test]}, f)
    return np.concatenate(xs), np.array(ys), test_x


def write_cifar100(folder: Path, rng, n_train=6, n_test=3):
    base = folder / "cifar-100-python"
    base.mkdir(parents=True)
    train = {"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
             "fine_labels": [0, 99, 50, 7, 7, 3][:n_train], "coarse_labels": [0] * n_train}
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            "fine_labels": [98, 1, 2][:n_test], "coarse_labels": [0] * n_test}
    for name, d in (("train", train), ("test", test)):  # str keys: both spellings must load
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return train, test


def write_svhn(folder: Path, rng, n_train=5, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # labels 1..10, 10 means digit 0
        scipy.io.savemat(str(folder / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


def assert_normalised_like(split: DatasetSplits, raw_train: np.ndarray, raw_test: np.ndarray, scale=255.0):
    """raw_* are [N, C, H, W] pixel arrays; check the train statistics and the test transform."""
    tr = torch.as_tensor(raw_train, dtype=torch.float64) / scale
    mean = tr.transpose(0, 1).reshape(tr.shape[1], -1).mean(1)
    std = tr.transpose(0, 1).reshape(tr.shape[1], -1).std(1, unbiased=False)
    assert torch.allclose(torch.tensor(split.train.mean, dtype=torch.float64), mean, atol=1e-6)
    assert torch.allclose(torch.tensor(split.train.std, dtype=torch.float64), std, atol=1e-6)
    assert split.test.mean == split.train.mean and split.test.std == split.train.std
    te = torch.as_tensor(raw_test, dtype=torch.float64) / scale
    expect_test = (te - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert torch.allclose(split.test.images.double(), expect_test, atol=1e-4)
    assert split.train.images.dtype == torch.float32 and split.train.labels.dtype == torch.int64
    assert torch.allclose(split.train.denormalize(split.train.images).double(), tr, atol=1e-5)


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_formats(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path / name, np.random.default_rng(0), gz=gz)
    splits = load_dataset(name, root=tmp_path)
    assert splits.train.images.shape == (12, 1, 28, 28) and splits.test.images.shape == (5, 1, 28, 28)
    assert splits.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert splits.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert splits.train.num_classes == 10 and splits.train.name == name and len(splits.train.class_names) == 10
    assert_normalised_like(splits, arrays["train-images-idx3-ubyte"][:, None],
                           arrays["t10k-images-idx3-ubyte"][:, None])


def test_idx_corrupt_magic_and_truncation(tmp_path):
    good = idx_bytes(np.zeros((2, 3, 3)))
    (tmp_path / "bad_magic").write_bytes(b"\x00\x00\x0d\x03" + good[4:])
    with pytest.raises(ValueError, match="corrupt idx.*magic"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "short").write_bytes(good[:-3])
    with pytest.raises(ValueError, match="corrupt idx"):
        read_idx(tmp_path / "short")
    (tmp_path / "notgz.gz").write_bytes(good)
    with pytest.raises(ValueError, match="corrupt idx"):
        read_idx(tmp_path / "notgz.gz")
    # a corrupt file inside a dataset folder surfaces as the same error
    write_idx_set(tmp_path / "mnist", np.random.default_rng(1), gz=False)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (99).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="corrupt idx"):
        load_dataset("mnist", root=tmp_path)


def test_cifar10(tmp_path):
    x, y, test_x = write_cifar10(tmp_path, np.random.default_rng(2))
    splits = load_dataset("cifar10", root=tmp_path)
    assert splits.train.images.shape == (15, 3, 32, 32) and splits.test.images.shape == (4, 3, 32, 32)
    assert splits.train.labels.tolist() == y.tolist() and splits.test.labels.tolist() == [1, 2, 3, 4]
    assert splits.train.class_names[0] == "airplane" and splits.train.num_classes == 10
    assert_normalised_like(splits, x.reshape(-1, 3, 32, 32), test_x.reshape(-1, 3, 32, 32))


def test_cifar100_fine_labels(tmp_path):
    train, test = write_cifar100(tmp_path / "cifar100", np.random.default_rng(3))
    splits = load_dataset("cifar100", root=tmp_path)  # found under root/cifar100
    assert splits.train.num_classes == 100
    assert splits.train.labels.tolist() == train["fine_labels"]
    assert splits.test.labels.tolist() == test["fine_labels"]
    assert splits.train.class_names[99] == "class99"
    assert_normalised_like(splits, train["data"].reshape(-1, 3, 32, 32), test["data"].reshape(-1, 3, 32, 32))


def test_svhn_label_10_is_zero_and_layout(tmp_path):
    raw = write_svhn(tmp_path, np.random.default_rng(4))
    splits = load_dataset("svhn", root=tmp_path)
    assert splits.train.labels.tolist() == [1, 2, 3, 4, 5] and splits.test.labels.tolist() == [1, 2, 3]
    x_train = raw["train"][0].transpose(3, 2, 0, 1)
    x_test = raw["test"][0].transpose(3, 2, 0, 1)
    assert_normalised_like(splits, x_train, x_test)
    y = np.array([[10], [3]], dtype=np.uint8)
    scipy.io.savemat(str(tmp_path / "train_32x32.mat"), {"X": raw["train"][0][..., :2], "y": y})
    assert load_dataset("svhn", root=tmp_path).train.labels.tolist() == [0, 3]


def test_digits():
    splits = load_dataset("digits")
    assert splits.train.images.shape[1:] == (1, 8, 8)
    assert len(splits.train) + len(splits.test) == 1797
    assert abs(len(splits.test) / 1797 - 0.2) < 0.01
    assert set(splits.test.labels.tolist()) == set(range(10))
    assert abs(float(splits.train.images.mean())) < 1e-5 and abs(float(splits.train.images.std()) - 1) < 1e-3
    raw_max = float(splits.train.denormalize(splits.train.images).max())
    assert abs(raw_max - 1.0) < 1e-5  # pixel values were divided by 16
    again = load_dataset("digits")
    assert torch.equal(again.test.labels, splits.test.labels)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn"])
def test_missing_files_never_touch_network(tmp_path, name):
    if (Path("/usr/share/datasets") / name).is_dir():
        pytest.skip(f"/usr/share/datasets/{name} exists on this machine")
    with pytest.raises(FileNotFoundError, match="download") as err:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path) in str(err.value) and "empty_cache" in str(err.value)
    assert "\n" not in str(err.value)


def test_download_writes_into_root(tmp_path, monkeypatch):
    """The download path, with urlretrieve faked by a local writer (no network)."""
    fetched = []

    def fake_retrieve(url, dest):
        fetched.append(url)
        name = url.rsplit("/", 1)[1]
        n = 4 if name.startswith("train") else 2
        x = np.random.default_rng(len(fetched)).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        with open(dest, "wb") as f:
            scipy.io.savemat(f, {"X": x, "y": np.full((n, 1), 10, dtype=np.uint8)})

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_retrieve)
    splits = load_dataset("svhn", root=tmp_path / "dl", download=True)
    assert len(fetched) == 2 and all(u.startswith("http") for u in fetched)
    assert (tmp_path / "dl" / "train_32x32.mat").is_file()
    assert splits.train.labels.tolist() == [0, 0, 0, 0]


def test_unknown_name():
    with pytest.raises(ValueError, match="valid names"):
        load_dataset("imagenet-1k")


def test_real_fashion_mnist_idx_if_installed():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist not installed")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    assert labels.shape == (10000,) and images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------ wrappers
def test_from_tensors_and_torch_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 2, 5, 5, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    y = torch.arange(20) % 4
    s = from_tensors(x, y, "toy")
    assert s.num_classes == 4 and s.channels == 2 and s.im_size == (5, 5)
    per_channel = s.images.transpose(0, 1).reshape(2, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.allclose(s.denormalize(s.images), x, atol=1e-5)
    kept = from_tensors(x, y, "toy", num_classes=7, normalize=False)
    assert torch.equal(kept.images, x) and kept.num_classes == 7 and kept.mean == (0.0, 0.0)
    ds = torch.utils.data.TensorDataset(x, y)
    wrapped = from_torch_dataset(ds, "toy")
    assert torch.allclose(wrapped.images, s.images) and torch.equal(wrapped.labels, y)
    with pytest.raises(ValueError, match="num_classes"):
        from_tensors(x, y, "toy", num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        from_tensors(x, y.float(), "toy")
    with pytest.raises(ValueError, match="images"):
        ImageSet(x[0], y, 4, "bad", (0.0,), (1.0,))


# ------------------------------------------------------------------------------------- label noise
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37])
def test_symmetric_noise_exact_count_and_all_really_flipped(rate):
    labels = torch.arange(1000) % 10
    noisy, flipped = add_label_noise(labels, rate, "symmetric", 10, seed=3)
    assert int(flipped.sum()) == round(rate * 1000)
    assert torch.all(noisy[flipped] != labels[flipped])
    assert torch.equal(noisy[~flipped], labels[~flipped])
    assert noisy.dtype == torch.int64 and flipped.dtype == torch.bool
    assert noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_noise_is_uniform_over_other_classes():
    labels = torch.zeros(6000, dtype=torch.long)
    noisy, flipped = add_label_noise(labels, 0.6, "symmetric", 4, seed=0)
    counts = torch.bincount(noisy[flipped], minlength=4).tolist()
    assert counts[0] == 0 and all(abs(c - 1200) < 150 for c in counts[1:])  # sd ~ 28


def test_pairflip_mapping():
    labels = torch.arange(50) % 5
    noisy, flipped = add_label_noise(labels, 0.4, "pairflip", 5, seed=1)
    assert int(flipped.sum()) == 20
    assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 5)
    assert torch.equal(noisy[~flipped], labels[~flipped])


def test_noise_determinism_and_errors():
    labels = torch.arange(200) % 10
    a = add_label_noise(labels, 0.3, seed=5, num_classes=10)
    b = add_label_noise(labels, 0.3, seed=5, num_classes=10)
    c = add_label_noise(labels, 0.3, seed=6, num_classes=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            add_label_noise(labels, bad, num_classes=10)
    with pytest.raises(ValueError, match="kind"):
        add_label_noise(labels, 0.1, kind="asymmetric", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        add_label_noise(labels, 0.1, num_classes=5)


# ------------------------------------------------------------------------------------------ splits
def test_stratified_split_counts_disjoint_deterministic():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([10, 7, 2, 1, 33])])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert keep.dtype == torch.int64 and held.dtype == torch.int64
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    held_counts = torch.bincount(labels[held], minlength=5).tolist()
    assert held_counts == [2, 1, 1, 0, 7]  # round(0.2 n), >= 1 when n >= 2, a single instance stays
    keep2, held2 = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(keep, keep2) and torch.equal(held, held2)
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=1)[1])
    assert stratified_split(labels, 0.0, seed=0)[1].numel() == 0
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(labels, 1.0)


def test_class_indices():
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    idx = class_indices(labels, 4)
    assert [i.tolist() for i in idx] == [[1, 4], [3], [0, 2, 5], []]
    assert all(i.dtype == torch.int64 for i in idx)
    with pytest.raises(ValueError, match="num_classes"):
        class_indices(labels, 2)
