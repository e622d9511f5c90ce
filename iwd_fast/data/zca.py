"""ZCA whitening fitted on a training pool (MTT and DATM whiten CIFAR this way), via kornia.

kornia is an optional dependency (``pip install torch==<your torch version> kornia``; pin torch in the
same command so pip keeps the installed build). The transform is fitted once on the training images and
then applied unchanged to every other split (held-out, test), as the reference repositories do.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["fit_zca"]


def fit_zca(images: torch.Tensor, eps: float = 0.1, batch: int = 4096) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit ZCA whitening on images [N, C, H, W]; returns ``transform(x [M, C, H, W]) -> [M, C, H, W]``.

    ``eps`` regularises the covariance's eigenvalues (kornia's ``ZCAWhitening(eps=...)``; MTT uses 0.1).
    The transform runs under no_grad in batches of ``batch`` and keeps x's device and dtype.
    """
    try:
        from kornia.enhance import ZCAWhitening
    except ImportError as err:  # optional dependency: one clear line
        raise ValueError("ZCA whitening needs kornia: pip install torch==%s kornia" % torch.__version__.split("+")[0]) \
            from err
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"fit_zca: need images [N >= 2, C, H, W], got {tuple(images.shape)}")
    if not eps > 0:
        raise ValueError(f"fit_zca: eps must be > 0, got {eps}")
    zca = ZCAWhitening(eps=float(eps), compute_inv=False)
    with torch.no_grad():
        zca.fit(images.float())

    def transform(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        with torch.no_grad():
            parts = [zca(x[i:i + batch].to(images.device, torch.float32)) for i in range(0, x.shape[0], batch)]
        return torch.cat(parts).to(x.device, x.dtype).contiguous()

    return transform
