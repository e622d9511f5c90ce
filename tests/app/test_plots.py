"""Tests for iwd_fast.plots: every figure writes a valid, non-empty PNG and rejects bad input."""
import pytest
import torch

from iwd_fast.app import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return path.suffix == ".png" and len(data) > 1000 and data[:8] == PNG_MAGIC


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_grid(tmp_path, channels):
    images = torch.randn(12, channels, 8, 8)
    labels = torch.arange(12) % 4
    mean, std = (0.5,) * channels, (0.25,) * channels
    path = plots.plot_synthetic_grid(images, labels, mean, std, tmp_path / "sub" / "grid.png",
                                     class_names=list("abcd"), title="IPC 3")
    assert _is_png(path)


def test_to_display_undoes_normalisation():
    pix = plots.to_display(torch.tensor([[[[0.0, 2.0, -4.0]]]]), (0.5,), (0.25,))
    assert pix.shape == (1, 1, 3)
    assert pix.tolist() == [[[0.5, 1.0, 0.0]]]  # 0.5 + 0.25 * x, clamped to [0, 1]
    with pytest.raises(ValueError, match="channels"):
        plots.to_display(torch.zeros(1, 2, 4, 4), (0.0, 0.0), (1.0, 1.0))


def test_weight_histogram_with_and_without_mask(tmp_path):
    w = torch.rand(200) * 2
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:60] = True
    assert _is_png(plots.plot_weight_histogram(w, mask, tmp_path / "hist_split.png"))
    assert _is_png(plots.plot_weight_histogram(w, None, tmp_path / "hist.png"))
    with pytest.raises(ValueError, match="flipped_mask"):
        plots.plot_weight_histogram(w, mask[:10], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="finite"):
        plots.plot_weight_histogram(torch.tensor([1.0, float("nan")]), None, tmp_path / "bad.png")


def test_extreme_images(tmp_path):
    images = torch.randn(30, 1, 8, 8)
    weights = torch.linspace(0.1, 3.0, 30)
    labels = torch.arange(30) % 10
    assert _is_png(plots.plot_extreme_images(images, weights, labels, (0.0,), (1.0,), tmp_path / "ext.png", k=4))
    # k larger than N is clipped
    assert _is_png(plots.plot_extreme_images(images[:3], weights[:3], labels[:3], (0.0,), (1.0,),
                                             tmp_path / "ext3.png", k=8))
    with pytest.raises(ValueError, match="weights"):
        plots.plot_extreme_images(images, weights[:5], labels, (0.0,), (1.0,), tmp_path / "bad.png")


def test_accuracy_curve(tmp_path):
    history = [{"iteration": i, "acc_mean": 0.5 + 0.01 * i, "acc_std": 0.02} for i in (20, 0, 10)]
    assert _is_png(plots.plot_accuracy_curve(history, tmp_path / "curve.png"))
    assert _is_png(plots.plot_accuracy_curve([{"iteration": 0, "acc_mean": 0.3}], tmp_path / "one.png"))
    with pytest.raises(ValueError, match="acc_mean"):
        plots.plot_accuracy_curve([{"iteration": 0}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_accuracy_curve([], tmp_path / "bad.png")
