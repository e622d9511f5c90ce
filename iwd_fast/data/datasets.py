"""Datasets as normalised tensors, label noise and stratified splits.

Every loader returns :class:`DatasetSplits` of two :class:`ImageSet`: float32 images ``[N, C, H, W]``
normalised with the per-channel mean/std of the train split, int64 labels ``[N]``. Files are read from
local folders only; ``download=True`` is the one path that touches the network.

Supported names: ``digits`` (scikit-learn, bundled), ``mnist``, ``fashion-mnist`` (idx files, gzipped
or not), ``cifar10``, ``cifar100`` (python pickle batches), ``svhn`` (``.mat`` files).
"""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.request
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["ImageSet", "DatasetSplits", "DATASET_NAMES", "load_dataset", "from_tensors", "from_torch_dataset",
           "add_label_noise", "stratified_split", "stratified_subset", "class_indices", "read_idx"]

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


@dataclass
class ImageSet:
    """One split. ``images`` float32 [N, C, H, W] (normalised), ``labels`` int64 [N].

    ``mean``/``std`` are the per-channel statistics used for normalisation (length C), so that
    ``denormalize`` recovers pixel values in [0, 1] for plots.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    mean: tuple
    std: tuple
    class_names: Optional[List[str]] = None

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dim() != 4 or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"ImageSet {self.name!r}: need images [N, C, H, W] and labels [N], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if len(self.mean) != x.shape[1] or len(self.std) != x.shape[1]:
            raise ValueError(f"ImageSet {self.name!r}: mean/std need {x.shape[1]} entries")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def im_size(self) -> Tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of ``x`` [..., C, H, W]; returns pixel values (not clamped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean


@dataclass
class DatasetSplits:
    """The train and test :class:`ImageSet` of one dataset (test normalised with train statistics)."""

    train: ImageSet
    test: ImageSet


# ----------------------------------------------------------------------------------------- builders
def _channel_stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    """Per-channel mean and std of ``images`` [N, C, H, W] (std floored so constant channels work)."""
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False).clamp_min(1e-8) if x.shape[1] > 0 else torch.ones_like(mean)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images.float() - m) / s).contiguous()


def _make_splits(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, class_names: Optional[List[str]], scale: float = 255.0) -> DatasetSplits:
    """Raw pixel arrays [N, C, H, W] in [0, scale] -> DatasetSplits normalised with train statistics."""
    tx = torch.from_numpy(np.require(train_x, requirements=["C", "W"])).float() / scale
    vx = torch.from_numpy(np.require(test_x, requirements=["C", "W"])).float() / scale
    mean, std = _channel_stats(tx)
    sets = [ImageSet(_normalise(x, mean, std), torch.as_tensor(np.asarray(y).reshape(-1).astype(np.int64)),
                     num_classes, name, mean, std, class_names) for x, y in ((tx, train_y), (vx, test_y))]
    return DatasetSplits(train=sets[0], test=sets[1])


def from_tensors(images: torch.Tensor, labels: torch.Tensor, name: str, num_classes: Optional[int] = None,
                 *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 normalize: bool = True, class_names: Optional[List[str]] = None) -> ImageSet:
    """Wrap tensors as an :class:`ImageSet`.

    images: [N, C, H, W] (or [N, H, W], read as one channel); labels: integer [N].
    ``normalize=True``: images are raw; they are normalised with ``mean``/``std`` (computed per channel
    from ``images`` when not given). ``normalize=False``: images are already normalised; ``mean``/``std``
    (default 0 and 1) are only stored for de-normalisation.
    """
    images = torch.as_tensor(images)
    images = images.unsqueeze(1) if images.dim() == 3 else images
    if images.dim() != 4:
        raise ValueError(f"from_tensors: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    labels = _check_labels(labels, "from_tensors")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"from_tensors: labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
    inferred = int(labels.max()) + 1 if labels.numel() else 0
    num_classes = inferred if num_classes is None else int(num_classes)
    if num_classes < inferred:
        raise ValueError(f"from_tensors: num_classes={num_classes} but labels go up to {inferred - 1}")
    c = images.shape[1]
    if normalize:
        if mean is None or std is None:
            mean, std = _channel_stats(images)
        images = _normalise(images, mean, std)
    else:
        mean = (0.0,) * c if mean is None else mean
        std = (1.0,) * c if std is None else std
        images = images.float().contiguous()
    return ImageSet(images, labels, num_classes, name, tuple(float(v) for v in mean),
                    tuple(float(v) for v in std), class_names)


def from_torch_dataset(ds, name: str, num_classes: Optional[int] = None, **kwargs) -> ImageSet:
    """Materialise a torch Dataset yielding ``(image [C, H, W], int label)`` into an :class:`ImageSet`.

    Keyword arguments (``mean``, ``std``, ``normalize``, ``class_names``) go to :func:`from_tensors`.
    """
    if len(ds) == 0:
        raise ValueError(f"from_torch_dataset: dataset {name!r} is empty")
    pairs = [ds[i] for i in range(len(ds))]
    xs, ys = [torch.as_tensor(p[0]) for p in pairs], [int(p[1]) for p in pairs]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"from_torch_dataset: images of {name!r} have different shapes {sorted(shapes)[:3]}")
    return from_tensors(torch.stack(xs), torch.tensor(ys, dtype=torch.long), name, num_classes, **kwargs)


# ------------------------------------------------------------------------------------------ readers
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
    return _make_splits(name, arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3], 10, names)


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
    return _make_splits(name, xs[0], ys[0], xs[1], ys[1], classes, names)


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
    return _make_splits("svhn", out[0], out[1], out[2], out[3], 10, [str(i) for i in range(10)])


def _load_digits() -> DatasetSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.images[:, None], np.asarray(d.target, dtype=np.int64)
    keep, held = (i.numpy() for i in stratified_split(torch.from_numpy(labels), 0.2, seed=0))
    return _make_splits("digits", images[keep], labels[keep], images[held], labels[held], 10,
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
    """Fetch the standard files of ``name`` into ``target`` (archives are extracted there)."""
    target.mkdir(parents=True, exist_ok=True)
    for url in _URLS[name]:
        dest = target / url.rsplit("/", 1)[1]
        if not dest.is_file():
            tmp = dest.with_suffix(dest.suffix + ".part")
            urllib.request.urlretrieve(url, tmp)
            tmp.replace(dest)
        if dest.name.endswith(".tar.gz"):
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(dest, "r:gz") as tar:
                tar.extractall(target, **safe)


def load_dataset(name: str, root=None, download: bool = False) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASET_NAMES`) as normalised train/test :class:`ImageSet`.

    Searched in order: ``root``, ``root/<name>``, ``$IWD_FAST_CACHE`` or ``~/.cache/iwd_fast/<name>``,
    ``/usr/share/datasets/<name>``. ``download=True`` fetches missing files into ``root`` (or the cache
    folder); without it the network is never touched.
    """
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
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


# ------------------------------------------------------------------------------- labels and splits
def _check_labels(labels: torch.Tensor, fn: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be a 1-D integer tensor, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{fn}: labels must be non-negative")
    return labels.long()


def add_label_noise(labels: torch.Tensor, rate: float, kind: str = "symmetric",
                    num_classes: Optional[int] = None, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(rate * N)`` labels chosen at random.

    labels: int [N]. ``symmetric``: a flipped label is drawn uniformly from the other classes;
    ``pairflip``: y -> (y + 1) % num_classes. Returns (noisy int64 [N], flipped bool [N]).
    """
    labels = _check_labels(labels, "add_label_noise").cpu()
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"add_label_noise: rate must be in [0, 1), got {rate}")
    if kind not in ("symmetric", "pairflip"):
        raise ValueError(f"add_label_noise: kind must be 'symmetric' or 'pairflip', got {kind!r}")
    n = labels.numel()
    c = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if n else 0)
    if n and int(labels.max()) >= c:
        raise ValueError(f"add_label_noise: labels go up to {int(labels.max())} but num_classes={c}")
    k = int(round(float(rate) * n))
    if k > 0 and c < 2:
        raise ValueError("add_label_noise: flipping labels needs num_classes >= 2")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[:k]
    noisy = labels.clone()
    if kind == "symmetric":
        offset = torch.randint(1, max(c, 2), (k,), generator=gen)
        noisy[chosen] = (labels[chosen] + offset) % c
    else:
        noisy[chosen] = (labels[chosen] + 1) % c
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def stratified_split(labels: torch.Tensor, fraction: float,
                     seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``round(fraction * n_c)`` instances of every class c.

    A class with >= 2 instances gives at least 1 (when fraction > 0) and keeps at least 1.
    Returns (keep_idx, heldout_idx), sorted int64 indices into ``labels`` [N]; same seed, same split.
    """
    labels = _check_labels(labels, "stratified_split").cpu()
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"stratified_split: fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n_c = idx.numel()
        k = int(round(float(fraction) * n_c))
        if fraction > 0 and n_c >= 2:
            k = max(k, 1)
        k = min(k, max(n_c - 1, 0))
        perm = idx[torch.randperm(n_c, generator=gen)]
        held.append(perm[:k])
        keep.append(perm[k:])
    empty = [torch.zeros(0, dtype=torch.long)]
    return torch.sort(torch.cat(keep + empty)).values, torch.sort(torch.cat(held + empty)).values


def class_indices(labels: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """Indices of each class: a list of ``num_classes`` int64 tensors into ``labels`` [N]."""
    labels = _check_labels(labels, "class_indices")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"class_indices: labels go up to {int(labels.max())} but num_classes={num_classes}")
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def stratified_subset(s: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """A class-stratified subset of about ``n`` instances of ``s`` (deterministic for a seed)."""
    _, picked = stratified_split(s.labels, min(1.0, n / len(s)), seed=seed)
    return dataclasses.replace(s, images=s.images[picked], labels=s.labels[picked])
