"""Dataset formats for scoring: an image folder in class subfolders, a tensors file; and a download
without network failing in one line without leaving an empty cache folder."""
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from iwd_fast.data import load_dataset
from iwd_fast.data.image_folder import ImageFolder, channel_stats
from iwd_fast.data.tensor_file import read_tensor_file


def write_folder(root, sizes=None, mode="L"):
    """3 classes x 2 images of 5x4 pixels (pixel value = 10 * class + image)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "ant", "bee"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            h, w = (sizes or {}).get((c, i), (5, 4))
            arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")


def test_image_folder_classes_positions_and_pixels(tmp_path):
    write_folder(tmp_path)
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["ant", "bee", "cat"] and len(ds) == 6 and ds.targets == [0, 0, 1, 1, 2, 2]
    x, y = ds[3]
    expect = np.asarray(Image.open(tmp_path / "bee" / "1.png"), dtype=np.float32) / 255.0
    assert y == 1 and x.shape == (1, 5, 4) and torch.allclose(x[0], torch.from_numpy(expect))
    mean, std = channel_stats(ds)
    normed = ImageFolder(tmp_path, mean=mean, std=std)
    stacked = torch.stack([normed[i][0] for i in range(6)])
    assert abs(stacked.mean().item()) < 1e-5 and abs(stacked.std(unbiased=False).item() - 1) < 1e-4
    rgb = ImageFolder(tmp_path, channels=3, size=(8, 6))
    assert rgb[0][0].shape == (3, 8, 6)


def test_image_folder_refuses_mixed_sizes_by_position_and_empty_folders(tmp_path):
    write_folder(tmp_path / "a", sizes={(1, 1): (7, 4), (2, 0): (5, 5)})
    with pytest.raises(ValueError, match=r"positions \[1, 2\] .*ant/1.png, 7x4\) differ from the first image's 5x4; pass size="):
        ImageFolder(tmp_path / "a")
    assert ImageFolder(tmp_path / "a", size=(5, 4))[3][0].shape == (1, 5, 4)
    (tmp_path / "b" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "missing")


@pytest.mark.parametrize("form", ["pt_dict", "pt_pair", "safetensors", "npz_channels_last"])
def test_tensor_file_forms(tmp_path, form):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 1, 6, 5), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    path = tmp_path / {"pt_dict": "d.pt", "pt_pair": "p.pt", "safetensors": "s.safetensors",
                       "npz_channels_last": "n.npz"}[form]
    if form == "pt_dict":
        torch.save({"images": pixels, "labels": labels, "test_images": pixels[:2], "test_labels": labels[:2]}, path)
    elif form == "pt_pair":
        torch.save((pixels.float() / 255, labels), path)
    elif form == "safetensors":
        from safetensors.torch import save_file
        save_file({"x": pixels, "y": labels}, str(path))
    else:
        np.savez(path, images=pixels.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    x, y, test = read_tensor_file(path)
    assert x.shape == (6, 1, 6, 5) and x.dtype == torch.float32 and torch.equal(y, labels)
    torch.testing.assert_close(x, pixels.float() / 255)
    assert (test is not None) == (form == "pt_dict")


def test_tensor_file_errors_name_the_problem(tmp_path):
    torch.save({"pictures": torch.zeros(2, 1, 3, 3), "labels": torch.tensor([0, 1])}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="no images .*looked for keys images, x, inputs, data"):
        read_tensor_file(tmp_path / "a.pt")
    torch.save({"images": torch.zeros(2, 1, 3, 3), "labels": torch.tensor([0, 1, 1])}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        read_tensor_file(tmp_path / "b.pt")
    torch.save({"images": torch.zeros(2, 1, 3, 3), "labels": torch.tensor([0.5, 1.0])}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        read_tensor_file(tmp_path / "c.pt")
    with pytest.raises(FileNotFoundError):
        read_tensor_file(tmp_path / "none.pt")


def test_download_without_network_is_one_line_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    cache = tmp_path / "cache"
    monkeypatch.setenv("IWD_FAST_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match=r"download of http\S+ failed \(.*name resolution\)") as err:
        load_dataset("mnist", root=None, download=True)
    assert "\n" not in str(err.value)
    assert not cache.exists(), "the failed download left a cache folder behind"
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileNotFoundError, match="download"):
        load_dataset("cifar10", root=tmp_path / "mine", download=True)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())  # the user's folder stays
