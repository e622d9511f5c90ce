"""A tensors file holding images and labels: ``.pt``/``.pth`` (torch.save), ``.safetensors`` or ``.npz``.

Keys: ``images`` (or ``x``, ``inputs``, ``data``) [N, C, H, W], [N, H, W] (one channel) or channels-last
[N, H, W, C] (recognised when C is 1, 3 or 4 and the second dimension is not); uint8 pixels are scaled to [0, 1], floats are taken as they are.
``labels`` (or ``y``, ``targets``) integer [N]. Optional ``test_images`` / ``test_labels`` give a test
split. A ``.pt`` file may also hold the pair ``(images, labels)``. Files are read with
``weights_only=True``: no code runs when loading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..scoring.checks import as_labels

__all__ = ["read_tensor_file", "TENSOR_FILE_SUFFIXES"]

TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
_IMAGE_KEYS = ("images", "x", "inputs", "data")
_LABEL_KEYS = ("labels", "y", "targets")


def _read_raw(path: Path) -> Dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            obj = {"images": obj[0], "labels": obj[1]}
        if not isinstance(obj, dict):
            raise ValueError(f"tensor file {path}: expected a dict of tensors or an (images, labels) pair, "
                             f"got {type(obj).__name__}")
        return {k: torch.as_tensor(v) for k, v in obj.items() if isinstance(v, (torch.Tensor, np.ndarray, list))}
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    raise ValueError(f"tensor file {path}: unknown suffix {suffix!r}; use one of {', '.join(TENSOR_FILE_SUFFIXES)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _pick(raw: Dict[str, torch.Tensor], keys, path: Path, what: str, prefix: str = "") -> Optional[torch.Tensor]:
    for k in keys:
        if prefix + k in raw:
            return raw[prefix + k]
    if prefix:
        return None
    raise ValueError(f"tensor file {path}: no {what} (looked for keys {', '.join(keys)}; found {sorted(raw)[:8]})")


def _images(t: torch.Tensor, path: Path, what: str) -> torch.Tensor:
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)  # channels-last
    if t.dim() != 4:
        raise ValueError(f"tensor file {path}: {what} must be [N, C, H, W], [N, H, W] or [N, H, W, C], "
                         f"got shape {tuple(t.shape)}")
    if min(t.shape[1:]) == 0:
        raise ValueError(f"tensor file {path}: {what} of shape {tuple(t.shape)} have an empty channel or side")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        raise ValueError(f"tensor file {path}: {what} must be uint8 pixels or floats, got {t.dtype}")
    return t.float().contiguous()


def read_tensor_file(path) -> Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """(images float32 [N, C, H, W], labels int64 [N], (test images, test labels) or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file {path} does not exist")
    if path.suffix.lower() not in TENSOR_FILE_SUFFIXES:
        raise ValueError(f"tensor file {path}: unknown suffix {path.suffix!r}; use one of "
                         f"{', '.join(TENSOR_FILE_SUFFIXES)}")
    try:
        raw = _read_raw(path)
    except ValueError as err:
        if str(err).startswith(f"tensor file {path}"):
            raise
        raise ValueError(f"tensor file {path}: cannot read it ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or not this format: the readers' errors vary
        raise ValueError(f"tensor file {path}: cannot read it, truncated or not a {path.suffix} file "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    images = _images(_pick(raw, _IMAGE_KEYS, path, "images"), path, "images")
    labels = as_labels(_pick(raw, _LABEL_KEYS, path, "labels"), f"tensor file {path}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"tensor file {path}: {images.shape[0]} images but {labels.shape[0]} labels")
    test_x, test_y = _pick(raw, _IMAGE_KEYS, path, "", "test_"), _pick(raw, _LABEL_KEYS, path, "", "test_")
    test = None
    if test_x is not None and test_y is not None:
        test = (_images(test_x, path, "test_images"), as_labels(test_y, f"tensor file {path} (test)"))
    return images, labels, test
