"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), written for iwd_fast.

``dsa_augment(x, strategy, seed)`` applies a chain of differentiable transforms to a batch x
[B, C, H, W]. Every random number comes from a ``torch.Generator`` seeded with ``seed``, and ONE
parameter set is drawn per call and applied to every image of the batch (DSA's Siamese mode), so the
real batch and the synthetic batch see the identical transformation when given the same seed, whatever
their batch sizes. The output is differentiable w.r.t. ``x`` (gradients reach the synthetic images).

Strategy: op names joined by "_", applied left to right. Ops: ``color`` (= brightness, saturation,
contrast), ``brightness``, ``saturation``, ``contrast``, ``crop`` (translation with zero fill),
``cutout``, ``flip`` (horizontal), ``scale``, ``rotate``. "" or "none" is the identity.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

__all__ = ["DSAParams", "dsa_augment", "parse_strategy", "default_strategy", "DSA_OPS", "DEFAULT_STRATEGY"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_NO_FLIP_DATASETS = ("digits", "mnist", "fashion-mnist", "fashion_mnist", "fmnist", "svhn")


@dataclass
class DSAParams:
    """Magnitudes of the DSA transforms (the DSA paper's defaults).

    brightness: additive shift uniform in [-b/2, b/2]; saturation: chroma scaled by U[0, s];
    contrast: deviation from the image mean scaled by U[c, 1 + c]; crop_pad: max translation as a
    fraction of the side; cutout: side of the erased square as a fraction of the side; scale: each axis
    scaled by U[1/s, s]; rotate: angle uniform in [-r, r] degrees; flip: probability of a flip.
    """

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_pad: float = 0.125
    cutout: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0
    flip: float = 0.5

    def __post_init__(self) -> None:
        for field in ("brightness", "saturation", "contrast", "crop_pad", "cutout", "rotate"):
            if getattr(self, field) < 0:
                raise ValueError(f"DSAParams.{field} must be >= 0, got {getattr(self, field)}")
        if self.scale < 1.0:
            raise ValueError(f"DSAParams.scale must be >= 1 (range [1/scale, scale]), got {self.scale}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"DSAParams.flip is a probability in [0, 1], got {self.flip}")
        if not 0.0 <= self.crop_pad < 1.0 or not 0.0 <= self.cutout <= 1.0:
            raise ValueError(f"DSAParams: crop_pad must be in [0, 1) and cutout in [0, 1], "
                             f"got {self.crop_pad} and {self.cutout}")


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Integer uniform in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


# Each op: (x [B, C, H, W], generator, params) -> x'; one draw for the whole batch.
def _brightness(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    return x + (_uniform(gen) - 0.5) * p.brightness


def _saturation(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * (_uniform(gen) * p.saturation) + grey


def _contrast(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(gen) + p.contrast) + mean


def _crop(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    """Translate by up to crop_pad * side pixels in each axis; uncovered pixels become 0."""
    h, w = x.shape[2], x.shape[3]
    max_y, max_x = int(h * p.crop_pad + 0.5), int(w * p.crop_pad + 0.5)
    dy, dx = _randint(gen, -max_y, max_y), _randint(gen, -max_x, max_x)
    if dy == 0 and dx == 0:
        return x
    padded = F.pad(x, (max_x, max_x, max_y, max_y))
    return padded[:, :, max_y - dy: max_y - dy + h, max_x - dx: max_x - dx + w]


def _cutout(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    """Zero a square of side round(cutout * side) centred at a random pixel (clipped at the border)."""
    h, w = x.shape[2], x.shape[3]
    sy, sx = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
    cy, cx = _randint(gen, 0, h - 1), _randint(gen, 0, w - 1)
    if sy == 0 or sx == 0:
        return x
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_y = (rows >= cy - sy // 2) & (rows < cy - sy // 2 + sy)
    in_x = (cols >= cx - sx // 2) & (cols < cx - sx // 2 + sx)
    keep = ~(in_y[:, None] & in_x[None, :])
    return x * keep.to(x.dtype)


def _flip(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    return x.flip(3) if _uniform(gen) < p.flip else x


def _affine(x: torch.Tensor, theta: List[List[float]]) -> torch.Tensor:
    """Resample x [B, C, H, W] with one 2x3 affine matrix (normalised coordinates), zero padding."""
    mat = torch.tensor(theta, dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scale(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    lo = 1.0 / p.scale
    sx, sy = lo + _uniform(gen) * (p.scale - lo), lo + _uniform(gen) * (p.scale - lo)
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def _rotate(x: torch.Tensor, gen: torch.Generator, p: DSAParams) -> torch.Tensor:
    angle = (_uniform(gen) - 0.5) * 2.0 * p.rotate * math.pi / 180.0
    c, s = math.cos(angle), math.sin(angle)
    return _affine(x, [[c, s, 0.0], [-s, c, 0.0]])


_Op = Callable[[torch.Tensor, torch.Generator, DSAParams], torch.Tensor]
DSA_OPS: Dict[str, List[_Op]] = {
    "color": [_brightness, _saturation, _contrast],
    "brightness": [_brightness],
    "saturation": [_saturation],
    "contrast": [_contrast],
    "crop": [_crop],
    "cutout": [_cutout],
    "flip": [_flip],
    "scale": [_scale],
    "rotate": [_rotate],
}


def parse_strategy(strategy: str) -> List[str]:
    """Split a strategy string such as "color_crop_cutout" into op names; "" or "none" -> []."""
    if not isinstance(strategy, str):
        raise ValueError(f"DSA strategy must be a string of ops joined by '_', got {type(strategy).__name__}")
    if strategy.strip().lower() in ("", "none"):
        return []
    ops = strategy.strip().lower().split("_")
    bad = [op for op in ops if op not in DSA_OPS]
    if bad:
        raise ValueError(f"unknown DSA op {bad[0]!r} in strategy {strategy!r}; "
                         f"valid ops: {', '.join(DSA_OPS)}")
    return ops


def dsa_augment(x: torch.Tensor, strategy: str = DEFAULT_STRATEGY, seed: Optional[int] = None,
                params: Optional[DSAParams] = None, device=None) -> torch.Tensor:
    """Apply the DSA ``strategy`` to x [B, C, H, W] with one random draw per op shared by the batch.

    Same ``seed`` -> same transformation (for any batch size); the result [B, C, H, W] keeps x's dtype
    and is differentiable w.r.t. x. ``device``: where to compute (default x.device); the random draws
    always come from a CPU generator so results do not depend on the device. ``seed`` is required: a
    silent default would give every call the same transformation.
    """
    if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"dsa_augment needs an explicit integer seed (shared by the real and synthetic "
                         f"batch of one step), got {seed!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(getattr(x, "shape", ()))
        raise ValueError(f"dsa_augment expects a tensor [B, C, H, W], got shape {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"dsa_augment expects floating-point images, got {x.dtype}")
    ops = parse_strategy(strategy)
    params = DSAParams() if params is None else params
    if device is not None:
        x = x.to(device)
    gen = torch.Generator().manual_seed(int(seed))
    for op in ops:
        for fn in DSA_OPS[op]:
            x = fn(x, gen, params)
    return x


def default_strategy(dataset_name: str) -> str:
    """DSA strategy for a dataset: without flip for digits, MNIST, Fashion-MNIST and SVHN (a mirrored
    digit is not the same digit), the full ``DEFAULT_STRATEGY`` otherwise."""
    if dataset_name.lower() in _NO_FLIP_DATASETS:
        return "color_crop_cutout_scale_rotate"
    return DEFAULT_STRATEGY
