"""Datasets of one's own (iwd_fast.data.user_data): what is inferred from an image folder and a tensors file
(channels, size, class names, statistics of the training part, the split and its seed) against values computed
by hand, and every kind of bad input refused in one line naming the culprit, before a pixel is decoded."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from iwd_fast.data import stratified_split
from iwd_fast.data.user_data import UserDataSpec, open_user_data, user_data_from_tensors


def write_folder(root, arrays_by_class, fmt="png"):
    """arrays_by_class: {class name: uint8 array [n, H, W] or [n, H, W, 3]}; files 000.png, 001.png, ..."""
    for name, arrays in arrays_by_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(root / name / f"{i:03d}.{fmt}")
    return root


def rgb_classes(seed=0, n=(4, 5, 3), size=(6, 5)):
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 256, (k, *size, 3), dtype=np.uint8) for name, k in zip(("bird", "cat", "dog"), n)}


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_folder_infers_channels_size_names_and_statistics_of_the_training_part(tmp_path):
    train, test = rgb_classes(0), rgb_classes(1, n=(2, 2, 2))
    data = open_user_data(str(write_folder(tmp_path / "train", train)),
                          UserDataSpec(test=str(write_folder(tmp_path / "test", test))))
    assert (data.num_classes, data.class_names, data.channels, data.im_size) == (3, ["bird", "cat", "dog"], 3, (6, 5))
    splits = data.load()
    # pixels as float32 x / 255 (what the built-in loaders make of uint8), statistics in float64
    pixels = (np.concatenate(list(train.values())).astype(np.float32) / np.float32(255)).astype(np.float64)
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    np.testing.assert_allclose(splits.train.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(splits.train.std, std, rtol=1e-12)
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 3 and splits.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the test set is normalised with the training part's statistics, not its own
    test_pixels = np.concatenate(list(test.values())).astype(np.float32) / np.float32(255)
    expect = (torch.from_numpy(test_pixels).permute(0, 3, 1, 2) - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    assert torch.equal(splits.test.images, expect)
    record = splits.record()
    assert record["class_names"] == ["bird", "cat", "dog"] and record["train_class_counts"] == [4, 5, 3]
    assert record["origin"]["kind"] == "image folder" and record["origin"]["test"]["from"].endswith("test")


def test_split_is_stratified_seeded_and_recorded_and_statistics_skip_the_test_part(tmp_path):
    images = torch.randint(0, 256, (40, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat_interleave(10)
    torch.save({"images": images, "labels": labels, "class_names": ["a", "b", "c", "d"]}, tmp_path / "d.pt")
    spec = UserDataSpec(test_fraction=0.3, split_seed=5)
    splits = open_user_data(str(tmp_path / "d.pt"), spec).load()
    assert torch.bincount(splits.test.labels).tolist() == [3, 3, 3, 3]
    assert splits.record()["origin"]["test"] == {"from": "stratified split of the training data", "fraction": 0.3,
                                                 "seed": 5}
    # by hand: the training part is what stratified_split(labels, 0.3, seed=5) keeps
    keep, held = stratified_split(labels, 0.3, seed=5)
    part = (images[keep].float() / 255).double().transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(splits.train.mean, part.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(splits.train.std, part.std(1, unbiased=False).numpy(), rtol=1e-12)
    assert torch.equal(splits.test.labels, labels[held]) and torch.equal(splits.train.labels, labels[keep])
    assert splits.train.class_names == ["a", "b", "c", "d"]
    again = open_user_data(str(tmp_path / "d.pt"), spec).load()
    assert torch.equal(again.test.images, splits.test.images)
    other = open_user_data(str(tmp_path / "d.pt"), UserDataSpec(test_fraction=0.3, split_seed=6)).load()
    assert not torch.equal(other.test.images, splits.test.images)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_tensors_file_forms_and_names_equal_the_in_memory_path(tmp_path, suffix):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 7, 7), dtype=torch.uint8, generator=g)  # [N, H, W]: one channel
    y = torch.tensor([0, 1, 2] * 4)
    tx, ty = x[:6].clone(), y[:6].clone()
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, images=x.numpy(), labels=y.numpy(), test_images=tx.numpy(), test_labels=ty.numpy(),
                 class_names=np.array(["x", "y", "z"]))
    elif suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({"images": x, "labels": y, "test_images": tx, "test_labels": ty}, str(path),
                  metadata={"class_names": json.dumps(["x", "y", "z"])})
    else:
        torch.save({"x": x, "y": y, "test_x": tx, "test_y": ty, "class_names": ["x", "y", "z"]}, path)
    data = open_user_data(str(path))
    assert (data.channels, data.im_size, data.class_names) == (1, (7, 7), ["x", "y", "z"])
    splits = data.load()
    ref = user_data_from_tensors(x, y, (tx, ty), ["x", "y", "z"], name=path.name).load()
    for a, b in ((splits.train, ref.train), (splits.test, ref.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.mean == b.mean


def test_image_size_resizes_a_mixed_folder_and_is_required_without(tmp_path):
    root = write_folder(tmp_path / "mixed", {"a": np.zeros((2, 8, 8), np.uint8), "b": np.zeros((2, 8, 8), np.uint8)})
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "b" / "009.png")
    with pytest.raises(ValueError) as err:
        open_user_data(str(root))
    assert "009.png" in one_line(err) and "--image-size" in str(err.value)
    data = open_user_data(str(root), UserDataSpec(image_size=[6, 6]))
    assert data.im_size == (6, 6) and data.load().train.images.shape[1:] == (1, 6, 6)


def test_bad_input_is_one_line_naming_the_culprit_before_decoding(tmp_path, monkeypatch):
    ten = np.zeros((3, 4, 4), np.uint8)
    # single-image class (names the class and its count)
    root = write_folder(tmp_path / "single", {"ok": ten, "lonely": ten[:1]})
    with pytest.raises(ValueError) as err:
        open_user_data(str(root))
    assert "'lonely'" in one_line(err) and "has 1 image" in str(err.value)
    # an empty class folder
    (tmp_path / "single" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        open_user_data(str(root))
    # an unreadable file (not an image)
    bad = write_folder(tmp_path / "bad", {"a": ten, "b": ten})
    (bad / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError) as err:
        open_user_data(str(bad))
    assert "broken.png" in one_line(err)
    # labels that are not 0..C-1
    torch.save({"images": torch.zeros(6, 1, 4, 4), "labels": torch.tensor([0, 0, 2, 2, 3, 3])}, tmp_path / "gap.pt")
    with pytest.raises(ValueError) as err:
        open_user_data(str(tmp_path / "gap.pt"))
    assert "0..3" in one_line(err) and "label 1" in str(err.value)
    torch.save({"images": torch.zeros(4, 1, 4, 4), "labels": torch.tensor([0, 0, 1, 5]), "class_names": ["a", "b"]},
               tmp_path / "range.pt")
    with pytest.raises(ValueError, match=r"labels \[5\] lie outside 0..1"):
        open_user_data(str(tmp_path / "range.pt"))
    # a test set whose classes differ from the training set's
    good = write_folder(tmp_path / "good", {"a": ten, "b": ten})
    other = write_folder(tmp_path / "other", {"a": ten, "c": ten})
    with pytest.raises(ValueError) as err:
        open_user_data(str(good), UserDataSpec(test=str(other)))
    assert "classes differ" in one_line(err) and "['c']" in str(err.value) and "['b']" in str(err.value)
    torch.save({"images": torch.zeros(2, 1, 4, 4), "labels": torch.tensor([0, 0])}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="no test images of 'b'"):
        open_user_data(str(good), UserDataSpec(test=str(tmp_path / "t.pt")))
    # a test set of another size, and a corrupt tensors file
    small = write_folder(tmp_path / "small", {"a": ten[:, :3, :3], "b": ten[:, :3, :3]})
    with pytest.raises(ValueError, match="3x3, the training images 4x4"):
        open_user_data(str(good), UserDataSpec(test=str(small)))
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(ValueError) as err:
        open_user_data(str(tmp_path / "junk.pt"))
    assert "junk.pt: cannot read it" in one_line(err)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_user_data(str(tmp_path / "missing"))
    # nothing was decoded for any of these: opening reads headers only
    monkeypatch.setattr("iwd_fast.data.image_folder.ImageFolder.pixels", lambda *a: pytest.fail("decoded"))
    open_user_data(str(good))
