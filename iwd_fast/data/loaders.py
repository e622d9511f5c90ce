"""Reading the named datasets from their standard files: idx (MNIST, Fashion-MNIST), CIFAR python
pickles, SVHN ``.mat``, and scikit-learn's bundled digits.

Files are read from local folders only; ``download=True`` is the one path that touches the network.
"""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .datasets import DatasetSplits, make_splits
from .splits import stratified_split

__all__ = ["DATASET_NAMES", "builtin_name", "dataset_key", "load_dataset", "read_idx"]

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")

_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                    "Bag", "Ankle boot"]
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# name: (folder, train files, test file, label key, meta file, class-name key, classes)
_CIFAR = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                      "batches.meta", "label_names", 10),
          "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names", 100)}
_IDX_FILES = tuple(f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_URLS = {"mnist": [_MNIST_URL + f + ".gz" for f in _IDX_FILES],
         "fashion-mnist": [_FMNIST_URL + f + ".gz" for f in _IDX_FILES],
         "cifar10": ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
         "cifar100": ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"],
         "svhn": [_SVHN_URL + "train_32x32.mat", _SVHN_URL + "test_32x32.mat"]}


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (gzipped or raw) of unsigned bytes; returns uint8 array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"corrupt idx file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"corrupt idx file {path}: bad magic number {data[:4].hex()} (want 0000 08 <ndim>)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"corrupt idx file {path}: header says {dims} = {int(np.prod(dims))} bytes, "
                         f"found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _unpickle(path: Path, *keys: str) -> list:
    """Entries ``keys`` of a CIFAR pickle whose dict keys may be bytes (python2 pickles) or str."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    missing = [k for k in keys if k not in d and k.encode() not in d]
    if missing:
        raise ValueError(f"CIFAR file {path} has no {missing[0]!r} entry (keys: {list(d)[:6]})")
    return [d[k.encode()] if k.encode() in d else d[k] for k in keys]


def _load_idx(name: str, folder: Path) -> Optional[DatasetSplits]:
    paths = [next((p for p in (folder / (s + ".gz"), folder / s) if p.is_file()), None) for s in _IDX_FILES]
    if any(p is None for p in paths):
        return None
    arrays = [read_idx(p) for p in paths]
    for img, lab, split in ((arrays[0], arrays[1], "train"), (arrays[2], arrays[3], "t10k")):
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise ValueError(f"{name} {split} idx files in {folder} disagree: "
                             f"images {img.shape}, labels {lab.shape}")
    names = _FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return make_splits(name, arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3], 10, names)


def _load_cifar(name: str, folder: Path) -> Optional[DatasetSplits]:
    """CIFAR python batches: data uint8 [n, 3072] (channel-major), labels / fine_labels [n]."""
    sub, train_names, test_name, label_key, meta, names_key, classes = _CIFAR[name]
    base = folder / sub
    train_files, test_file = [base / f for f in train_names], base / test_name
    if not all(f.is_file() for f in train_files + [test_file]):
        return None
    xs, ys = [], []
    for files in (train_files, [test_file]):
        batches = [_unpickle(f, "data", label_key) for f in files]
        xs.append(np.concatenate([np.asarray(b[0], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches]))
        ys.append(np.concatenate([np.asarray(b[1]) for b in batches]))
    names = _CIFAR10_CLASSES if name == "cifar10" else None
    if (base / meta).is_file():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(base / meta, names_key)[0]]
    return make_splits(name, xs[0], ys[0], xs[1], ys[1], classes, names)


def _load_svhn(folder: Path) -> Optional[DatasetSplits]:
    files = [folder / "train_32x32.mat", folder / "test_32x32.mat"]
    if not all(f.is_file() for f in files):
        return None
    from scipy.io import loadmat

    out = []
    for f in files:
        mat = loadmat(str(f))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
        if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0]:
            raise ValueError(f"SVHN file {f}: X must be [32, 32, 3, N] matching y, "
                             f"got {x.shape} and {y.shape}")
        y[y == 10] = 0
        out += [x.transpose(3, 2, 0, 1), y]
    return make_splits("svhn", out[0], out[1], out[2], out[3], 10, [str(i) for i in range(10)])


def _load_digits() -> DatasetSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.images[:, None], np.asarray(d.target, dtype=np.int64)
    keep, held = (i.numpy() for i in stratified_split(torch.from_numpy(labels), 0.2, seed=0))
    return make_splits("digits", images[keep], labels[keep], images[held], labels[held], 10,
                        [str(i) for i in range(10)], scale=16.0)


_READERS = {"mnist": _load_idx, "fashion-mnist": _load_idx, "cifar10": _load_cifar, "cifar100": _load_cifar,
            "svhn": lambda name, folder: _load_svhn(folder)}
_ALIASES = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}


def _cache_dir(name: str) -> Path:
    base = os.environ.get("IWD_FAST_CACHE") or str(Path.home() / ".cache" / "iwd_fast")
    return Path(base) / name


def _search_dirs(name: str, root) -> List[Path]:
    dirs = [Path(root), Path(root) / name] if root is not None else []
    # /usr/share/datasets/fashion-mnist is where Debian's dataset-fashion-mnist puts the idx files
    return dirs + [_cache_dir(name), Path("/usr/share/datasets") / name]


def _download(name: str, target: Path) -> None:
    """Fetch the standard files of ``name`` into ``target`` (archives are extracted there).

    A failed download (no network, a dead URL) raises FileNotFoundError with one line naming the URL and
    the reason, and leaves nothing behind: partial files are removed, and so are the folders this call
    created (the cache folder is never left empty)."""
    created = [d for d in [target, *target.parents] if not d.exists()]
    target.mkdir(parents=True, exist_ok=True)
    for url in _URLS[name]:
        dest = target / url.rsplit("/", 1)[1]
        if not dest.is_file():
            tmp = dest.with_suffix(dest.suffix + ".part")
            try:
                urllib.request.urlretrieve(url, tmp)
            except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts and refused connections are OSErrors
                if tmp.exists():
                    tmp.unlink()
                for d in created:  # innermost first; only folders this call made, and only if still empty
                    if d.is_dir() and not any(d.iterdir()):
                        d.rmdir()
                reason = getattr(err, "reason", None) or err
                raise FileNotFoundError(f"{name}: download of {url} failed ({reason}); put the standard files in "
                                        f"--data-root instead") from None
            tmp.replace(dest)
        if dest.name.endswith(".tar.gz"):
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(dest, "r:gz") as tar:
                tar.extractall(target, **safe)


def builtin_name(name: str) -> Optional[str]:
    """The built-in dataset ``name`` refers to (aliases such as "fmnist" resolved), or None."""
    key = str(name).lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in DATASET_NAMES else None


def dataset_key(name: str) -> str:
    """The built-in dataset ``name`` refers to; refuses a name that is none of :data:`DATASET_NAMES`."""
    key = builtin_name(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def load_dataset(name: str, root=None, download: bool = False) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASET_NAMES`) as normalised train/test :class:`ImageSet`.

    Searched in order: ``root``, ``root/<name>``, ``$IWD_FAST_CACHE`` or ``~/.cache/iwd_fast/<name>``,
    ``/usr/share/datasets/<name>``. ``download=True`` fetches missing files into ``root`` (or the cache
    folder); without it the network is never touched.
    """
    key = dataset_key(name)
    if key == "digits":
        return _load_digits()
    dirs = _search_dirs(key, root)
    for folder in dirs:
        if folder.is_dir():
            splits = _READERS[key](key, folder)
            if splits is not None:
                return splits
    if download:
        target = Path(root) if root is not None else _cache_dir(key)
        _download(key, target)
        splits = _READERS[key](key, target)
        if splits is not None:
            return splits
        raise FileNotFoundError(f"{key}: downloaded into {target} but the expected files are still missing")
    raise FileNotFoundError(f"{key} files not found in {', '.join(str(d) for d in dirs)}; "
                            f"pass --download (download=True) to fetch them")
