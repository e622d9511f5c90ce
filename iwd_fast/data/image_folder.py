"""A folder of images in class subfolders (``root/<class>/<file>``) as a map-style dataset, read lazily.

Classes are the subfolder names in sorted order (label = position); files are taken in sorted order
inside each class, so positions are stable. Every image is decoded with Pillow when read (DataLoader
workers parallelise that), converted to the dataset's mode (1 channel "L" or 3 channels "RGB"),
optionally resized, scaled to [0, 1] and normalised per channel. Every file is opened and verified when
the folder is opened (sizes from the headers, the format's own integrity check), so an unreadable or
truncated file, or a mixed-size folder, is refused by position and path before any scoring work.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..scoring.checks import format_indices

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "channel_stats"]

GREYSCALE_MODES = {"1", "L", "I", "I;16", "F"}  # Pillow modes of one channel
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFolder(Dataset):
    """``root/<class>/<image>`` -> items (float32 image [C, H, W], int label).

    Args:
        root: the folder whose subfolders are the classes.
        size: (H, W) to resize every image to (bilinear); None: all images must share one size.
        channels: 1 or 3; None: 1 if every image is greyscale, else 3 (a colour image anywhere in the folder
            makes it a colour dataset; greyscale images are then read as RGB).
        mean, std: per-channel normalisation of the [0, 1] pixels (default 0 and 1: none).
    Attributes: ``classes`` (names), ``samples`` [(path, label)], ``targets`` (labels, no image read).
    """

    def __init__(self, root, size: Optional[Tuple[int, int]] = None, channels: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a folder")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"ImageFolder: {self.root} has no class subfolders (expected root/<class>/<image>)")
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(f for f in (self.root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples += [(f, label) for f in files]
        if not self.samples:
            raise ValueError(f"ImageFolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        empty = [c for i, c in enumerate(self.classes) if not any(lab == i for _, lab in self.samples)]
        if empty:
            raise ValueError(f"ImageFolder: class folders without images: {empty[:5]}")
        self.targets = [lab for _, lab in self.samples]
        sizes, modes = self._headers(Image)
        self.channels = channels or (1 if modes <= GREYSCALE_MODES else 3)
        if self.channels not in (1, 3):
            raise ValueError(f"ImageFolder: channels must be 1 or 3, got {self.channels}")
        if size is not None and (len(tuple(size)) != 2 or min(int(v) for v in size) < 1):
            raise ValueError(f"ImageFolder: size must be (H, W) of positive ints, got {size!r}")
        self.size = tuple(int(v) for v in size) if size is not None else self._common_size(sizes)
        self.mean = tuple(mean) if mean is not None else (0.0,) * self.channels
        self.std = tuple(std) if std is not None else (1.0,) * self.channels
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError(f"ImageFolder: mean/std need {self.channels} entries and std > 0")

    def _headers(self, image_module) -> Tuple[List[Tuple[int, int]], Set[str]]:
        """(H, W) of every file and the set of their modes; refuses an unreadable or damaged file by position."""
        sizes, modes = [], set()
        for i, (path, _) in enumerate(self.samples):
            try:
                with image_module.open(path) as im:
                    sizes.append((im.height, im.width))
                    modes.add(im.mode)
                    im.verify()  # the format's integrity check (PNG: every chunk's CRC), without decoding
            except Exception as err:  # noqa: BLE001 - Pillow's errors for a bad file vary by format
                raise ValueError(f"ImageFolder: image at position {i} ({path}) cannot be read: "
                                 f"{type(err).__name__}: {str(err).strip()[:160] or 'no detail'}") from None
        return sizes, modes

    def _common_size(self, sizes: List[Tuple[int, int]]) -> Tuple[int, int]:
        """(H, W) shared by every image; refuses a mixed folder by position."""
        odd = [i for i, s in enumerate(sizes) if s != sizes[0]]
        if odd:
            raise ValueError(f"ImageFolder: images at positions {format_indices(odd)} (e.g. {self.samples[odd[0]][0]}, "
                             f"{sizes[odd[0]][0]}x{sizes[odd[0]][1]}) differ from the first image's "
                             f"{sizes[0][0]}x{sizes[0][1]}; pass size= (CLI: --image-size H W)")
        return sizes[0]

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 [C, H, W] in [0, 1] (converted and resized, not normalised)."""
        from PIL import Image

        try:
            with Image.open(self.samples[i][0]) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if (im.height, im.width) != self.size:
                    im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as err:  # damaged after the folder was opened, or undetectable then
            raise ValueError(f"ImageFolder: image at position {i} ({self.samples[i][0]}) cannot be decoded: "
                             f"{type(err).__name__}: {str(err).strip()[:160]}") from None
        return torch.from_numpy(arr.reshape(self.size[0], self.size[1], -1).transpose(2, 0, 1).copy())

    def __getitem__(self, i: int):
        m = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (self.pixels(i) - m) / s, self.samples[i][1]


def channel_stats(folder: ImageFolder, max_images: int = 1000) -> Tuple[tuple, tuple]:
    """Per-channel (mean, std) of the [0, 1] pixels of up to ``max_images`` images spread evenly over
    ``folder`` (deterministic), for normalising a network trained here."""
    n = len(folder)
    picks = sorted({(i * (n - 1)) // max(1, min(n, max_images) - 1) for i in range(min(n, max_images))})
    x = torch.stack([folder.pixels(i) for i in picks]).double().transpose(0, 1).reshape(folder.channels, -1)
    return tuple(float(v) for v in x.mean(1)), tuple(float(v) for v in x.std(1, unbiased=False).clamp_min(1e-8))
