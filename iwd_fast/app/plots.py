"""PNG figures of a run: synthetic images, weight histograms, extreme-weight images, accuracy curves.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no window, no global
state), so plotting works headless and from several threads. Every function writes one PNG, creating
the parent folder, and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_synthetic_grid", "plot_weight_histogram", "plot_extreme_images", "plot_accuracy_curve", "plot_lines",
           "plot_accuracy_curves",
           "to_display"]

PathLike = Union[str, Path]


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images [N, C, H, W] -> pixel arrays in [0, 1]: [N, H, W] (C == 1) or [N, H, W, 3]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(getattr(images, 'shape', ()))}")
    c = images.shape[1]
    if c not in (1, 3) or len(mean) != c or len(std) != c:
        raise ValueError(f"images need 1 or 3 channels with one mean/std per channel, got C={c}, "
                         f"{len(mean)} means and {len(std)} stds")
    x = images.detach().cpu().double()
    x = x * torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1) + torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    x = x.clamp(0.0, 1.0).numpy()
    return x[:, 0] if c == 1 else x.transpose(0, 2, 3, 1)


def _show(ax, img: np.ndarray) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _labels_1d(labels: torch.Tensor, n: int, who: str) -> np.ndarray:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{who}: labels must be [{n}], got {tuple(labels.shape)}")
    return labels.detach().cpu().long().numpy()


def plot_synthetic_grid(images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float], path: PathLike, class_names: Optional[List[str]] = None,
                        title: Optional[str] = None) -> Path:
    """One row per class, its synthetic images side by side. images [M, C, H, W] normalised with
    ``mean``/``std`` (per channel), labels [M] int."""
    pix = to_display(images, mean, std)
    lab = _labels_1d(labels, pix.shape[0], "plot_synthetic_grid")
    classes = sorted(set(lab.tolist()))
    per_class = [np.flatnonzero(lab == c) for c in classes]
    cols = max(len(ix) for ix in per_class)
    fig = Figure(figsize=(max(1.2 * cols, 2.0), 1.2 * len(classes) + (0.4 if title else 0.0)))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    for r, (c, ix) in enumerate(zip(classes, per_class)):
        for k in range(cols):
            ax = axes[r][k]
            if k < len(ix):
                _show(ax, pix[ix[k]])
            else:
                ax.axis("off")
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_weight_histogram(weights: torch.Tensor, flipped_mask: Optional[torch.Tensor], path: PathLike,
                          bins: int = 50, title: Optional[str] = None) -> Path:
    """Histogram of instance weights [N]; with ``flipped_mask`` [N] bool, clean and flipped-label
    instances are drawn as two overlaid histograms with their counts and weight shares in the legend."""
    w = torch.as_tensor(weights).detach().cpu().double().reshape(-1).numpy()
    if w.size == 0 or not np.isfinite(w).all():
        raise ValueError("plot_weight_histogram: weights must be a non-empty tensor of finite values")
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    edges = np.histogram_bin_edges(w, bins=bins)
    if flipped_mask is None:
        ax.hist(w, bins=edges, color="tab:blue", alpha=0.8, label=f"all (n={w.size})")
    else:
        mask = torch.as_tensor(flipped_mask).detach().cpu().reshape(-1).bool().numpy()
        if mask.shape != w.shape:
            raise ValueError(f"plot_weight_histogram: flipped_mask must be [{w.size}], got {mask.shape}")
        total = w.sum() if w.sum() != 0 else 1.0
        ax.hist(w[~mask], bins=edges, color="tab:blue", alpha=0.6,
                label=f"clean (n={int((~mask).sum())}, weight share {w[~mask].sum() / total:.2f})")
        ax.hist(w[mask], bins=edges, color="tab:red", alpha=0.6,
                label=f"flipped (n={int(mask.sum())}, weight share {w[mask].sum() / total:.2f})")
    ax.set_xlabel("instance weight")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.set_title(title or "instance weights")
    return _save(fig, path)


def plot_extreme_images(images: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                        mean: Sequence[float], std: Sequence[float], path: PathLike, k: int = 8,
                        class_names: Optional[List[str]] = None) -> Path:
    """Top row: the ``k`` highest-weight real images overall; bottom row: the ``k`` lowest. Each is
    titled with its label and weight. images [N, C, H, W] normalised, weights [N], labels [N]."""
    if k < 1:
        raise ValueError(f"plot_extreme_images: k must be >= 1, got {k}")
    n = images.shape[0] if isinstance(images, torch.Tensor) else 0
    w = torch.as_tensor(weights).detach().cpu().double().reshape(-1)
    if n == 0 or w.shape[0] != n:
        raise ValueError(f"plot_extreme_images: need N >= 1 images and weights [N], got {n} images and "
                         f"{tuple(w.shape)} weights")
    lab = _labels_1d(labels, n, "plot_extreme_images")
    k = min(k, n)
    order = torch.argsort(w, descending=True, stable=True)
    rows = [("highest weight", order[:k]), ("lowest weight", order.flip(0)[:k])]
    pix = to_display(images[torch.cat([r[1] for r in rows])], mean, std)
    fig = Figure(figsize=(1.4 * k, 3.4))
    axes = fig.subplots(2, k, squeeze=False)
    for r, (name, idx) in enumerate(rows):
        for j, i in enumerate(idx.tolist()):
            ax = axes[r][j]
            _show(ax, pix[r * k + j])
            c = int(lab[i])
            cname = class_names[c] if class_names and c < len(class_names) else str(c)
            ax.set_title(f"{cname}\nw={float(w[i]):.3g}", fontsize=7)
        axes[r][0].set_ylabel(name, fontsize=8)
    return _save(fig, path)


def plot_accuracy_curve(history: List[Dict[str, float]], path: PathLike, title: Optional[str] = None,
                        label: str = "synthetic set") -> Path:
    """Test accuracy against distillation iteration. Each record needs "iteration" and "acc_mean"
    (accuracy in [0, 1] or percent); an "acc_std" draws error bars."""
    if not history:
        raise ValueError("plot_accuracy_curve: history is empty")
    missing = [i for i, h in enumerate(history) if "iteration" not in h or "acc_mean" not in h]
    if missing:
        raise ValueError(f"plot_accuracy_curve: records {missing[:5]} lack 'iteration' or 'acc_mean'")
    hist = sorted(history, key=lambda h: h["iteration"])
    it = np.array([float(h["iteration"]) for h in hist])
    acc = np.array([float(h["acc_mean"]) for h in hist])
    std = np.array([float(h.get("acc_std", 0.0)) for h in hist])
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    ax.errorbar(it, acc, yerr=std if std.any() else None, marker="o", capsize=3, label=label)
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "evaluation accuracy")
    return _save(fig, path)


def plot_lines(series: Dict[str, Sequence[Sequence[float]]], path: PathLike, xlabel: str, ylabel: str,
               title: Optional[str] = None) -> Path:
    """Several labelled curves on one figure: ``series`` maps a label to points (x, y) or (x, y, yerr)."""
    if not series or not any(len(p) for p in series.values()):
        raise ValueError("plot_lines: no points to draw")
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for label, points in series.items():
        pts = sorted((tuple(p) for p in points), key=lambda p: p[0])
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        err = np.array([p[2] if len(p) > 2 else 0.0 for p in pts], dtype=float)
        ax.errorbar(x, y, yerr=err if err.any() else None, marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or ylabel, fontsize=9)
    return _save(fig, path)


def plot_accuracy_curves(histories: Dict[str, List[Dict[str, float]]], path: PathLike,
                         title: Optional[str] = None) -> Path:
    """Test accuracy against distillation iteration for several runs on one figure (paired runs side by
    side). Each history is a list of records with "iteration" and "acc_mean" (optionally "acc_std")."""
    series = {}
    for label, hist in histories.items():
        pts = [(h["iteration"], h["acc_mean"], h.get("acc_std", 0.0)) for h in hist if "acc_mean" in h]
        if pts:
            series[label] = pts
    return plot_lines(series, path, "distillation iteration", "test accuracy",
                      title or "test accuracy over the distillation (iteration 0: the initial images)")
