"""ZCA whitening fitted on a training pool (MTT and DATM whiten CIFAR this way), via kornia.

kornia is an optional dependency (``pip install torch==<your torch version> kornia``; pin torch in the
same command so pip keeps the installed build). The transform is fitted once on the training images and
then applied unchanged to every other split (held-out, test), as the reference repositories do. The
fitted mean and matrix are plain tensors, so a run folder can store them and a later evaluation can
whiten the test set the same way without kornia.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ZCATransform", "fit_zca"]


@dataclass
class ZCATransform:
    """x -> ((x.flatten(1) - mean) @ matrix).view_as(x); mean float [1, D], matrix float [D, D], D = C*H*W."""

    mean: torch.Tensor
    matrix: torch.Tensor
    batch: int = 4096

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten x [M, C, H, W] (no gradient, in batches); keeps x's device and dtype."""
        if x.shape[0] == 0:
            return x
        if x[0].numel() != self.matrix.shape[0]:
            raise ValueError(f"ZCATransform: fitted for {self.matrix.shape[0]} values per image, got "
                             f"{tuple(x.shape[1:])}")
        mean, matrix = self.mean.to(x.device, torch.float32), self.matrix.to(x.device, torch.float32)
        with torch.no_grad():
            parts = [((x[i:i + self.batch].float().flatten(1) - mean) @ matrix).view_as(x[i:i + self.batch])
                     for i in range(0, x.shape[0], self.batch)]
        return torch.cat(parts).to(x.dtype).contiguous()

    def tensors(self) -> dict:
        return {"zca_mean": self.mean.detach().cpu(), "zca_matrix": self.matrix.detach().cpu()}


def fit_zca(images: torch.Tensor, eps: float = 0.1) -> ZCATransform:
    """Fit ZCA whitening on images [N, C, H, W] with kornia's ``ZCAWhitening(eps=...)`` (MTT uses eps 0.1;
    eps regularises the covariance's eigenvalues)."""
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
    return ZCATransform(zca.mean_vector.detach().clone(), zca.transform_matrix.detach().clone())
