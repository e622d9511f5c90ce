"""Shared test setup.

The Triton interpreter must be switched on before triton is first imported, so it is set here for
machines without CUDA (tests marked `interpreter` then run the Triton launchers on CPU tensors).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def error_budget(fast: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, eps: float = 1e-6) -> tuple:
    """(error of ``fast``, allowed error): twice the error of plain PyTorch in the same dtype, plus eps.

    ``plain`` is the eager formula evaluated in the dtype of ``fast``; both are compared with the
    float64 reference ``ref64`` (STYLE.md habit 6). ``eps`` scales with the reference's magnitude.
    """
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err_fast = (fast.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    err_plain = (plain.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    return err_fast, 2.0 * err_plain + eps * max(1.0, scale)


@pytest.fixture(scope="module")
def tiny_splits():
    """(distillation tests) A learnable 4-class 8x8 problem (class c has a bright quadrant c), small enough for seconds."""
    return make_tiny_splits()


def make_tiny_splits():
    """The data of the ``tiny_splits`` fixture (also for subprocesses a test starts)."""
    from iwd_fast.data import DatasetSplits, from_tensors  # after the interpreter switch above

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
