"""Fixtures shared by the distillation tests."""
import pytest
import torch

from iwd_fast.data import DatasetSplits, from_tensors


@pytest.fixture(scope="module")
def tiny_splits():
    """A learnable 4-class 8x8 problem (class c has a bright quadrant c), small enough for seconds."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(4).repeat(n // 4)
        x = 0.3 * torch.randn(len(y), 1, 8, 8, generator=g)
        for c in range(4):
            r, col = divmod(c, 2)
            x[y == c, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 1.0
        return x, y

    (xt, yt), (xs, ys) = make(160), make(80)
    train = from_tensors(xt, yt, "digits", num_classes=4)
    test = from_tensors(xs, ys, "digits", num_classes=4, mean=train.mean, std=train.std)
    return DatasetSplits(train=train, test=test)
