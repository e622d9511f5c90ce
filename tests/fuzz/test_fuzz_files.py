"""Fuzzed dataset files: the tensors-file loader (``.pt``, ``.npz``, ``.safetensors``, as ``iwd-fast score``
reads it) and the image-folder loader.

Generated: every accepted layout, dtype and key name, and faults at generated positions (NaN / Inf
pixels, negative labels, label and image dtypes the loaders refuse, mismatched lengths, missing keys,
empty datasets and classes, mixed sizes, files cut at a random byte, garbage, empty files). A loader gives
the images and labels that were written, or one clear error naming the file (and the positions).
"""
import math
import uuid

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from iwd_fast.app.score.inputs import load_score_data
from iwd_fast.data.image_folder import ImageFolder
from iwd_fast.data.tensor_file import read_tensor_file

from fuzzing import FUZZ, correct, refused

pytestmark = pytest.mark.fuzz

FILE_FAULTS = ["none", "nonfinite", "negative_labels", "float_labels", "bool_labels", "int_images", "bool_images",
               "lengths", "no_images_key", "no_labels_key", "five_dims", "empty_side", "empty", "truncated",
               "garbage", "zero_bytes"]


def save(path, tensors, fmt, as_pair):
    if fmt == ".pt":
        obj = tuple(tensors.values()) if as_pair else tensors
        torch.save(obj, path)
    elif fmt == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@FUZZ
@given(fmt=st.sampled_from([".pt", ".npz", ".safetensors"]), n=st.integers(1, 12),
       layout=st.sampled_from(["nchw", "nhw", "nhwc"]), dtype=st.sampled_from(["uint8", "float16", "float32", "float64"]),
       label_dtype=st.sampled_from(["int64", "int32", "uint8"]), keys=st.tuples(
           st.sampled_from(["images", "x", "inputs", "data"]), st.sampled_from(["labels", "y", "targets"])),
       fault=st.sampled_from(FILE_FAULTS), data=st.data())
def test_tensor_file(tmp_path, fmt, n, layout, dtype, label_dtype, keys, fault, data):
    g = torch.Generator().manual_seed(n)
    c, h, w = {"nhwc": 3, "nhw": 1}.get(layout) or data.draw(st.sampled_from([1, 3])), 5, 6
    pixels = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    if fault == "nonfinite":
        dtype = "float32" if dtype == "uint8" else dtype
        for r in rows:
            pixels[r, data.draw(st.integers(0, c - 1)), data.draw(st.integers(0, h - 1)), 0] = \
                data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    images = (pixels * 255).round().to(torch.uint8) if dtype == "uint8" else pixels.to(getattr(torch, dtype))
    want = images.float() / 255 if dtype == "uint8" else images.float()
    stored = {"nchw": images, "nhw": images[:, 0], "nhwc": images.permute(0, 2, 3, 1).contiguous()}[layout]
    want = want[:, :1] if layout == "nhw" else want
    labels = torch.randint(0, 4, (n,), generator=g).to(getattr(torch, label_dtype))
    if fault == "negative_labels":
        labels = labels.long()
        labels[rows] = -1 - torch.randint(0, 3, (len(rows),), generator=g)
    elif fault == "float_labels":
        labels = labels.float()
    elif fault == "bool_labels":
        labels = labels > 1
    elif fault == "int_images":
        stored = stored.to(torch.int32)
    elif fault == "bool_images":
        stored = stored > 0.5
    elif fault == "lengths":
        labels = labels[: n - len(rows)]
    elif fault == "five_dims":
        stored = stored[..., None, None]  # two more dimensions than any layout takes
    elif fault == "empty_side":
        stored = stored[..., :0] if layout != "nhwc" else stored[:, :, :0]
    elif fault == "empty":
        stored, labels, want = stored[:0], labels[:0], want[:0]
    tensors = {"pixels" if fault == "no_images_key" else keys[0]: stored,
               "classes" if fault == "no_labels_key" else keys[1]: labels}
    path = tmp_path / f"{uuid.uuid4().hex}{fmt}"
    as_pair = fmt == ".pt" and data.draw(st.booleans()) and fault not in ("no_images_key", "no_labels_key")
    save(path, tensors, fmt, as_pair)
    blob = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
    elif fault == "garbage":
        path.write_bytes(bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=64))))
    elif fault == "zero_bytes":
        path.write_bytes(b"")
    where = f"tensor file {path}"
    expect = {"negative_labels": (rows, ["labels must be non-negative"]),
              "float_labels": (None, ["labels must be an integer tensor"]),
              "bool_labels": (None, ["labels must be an integer tensor"]),
              "int_images": (None, ["must be uint8 pixels or floats"]),
              "bool_images": (None, ["must be uint8 pixels or floats"]),
              "lengths": (None, [f"{n} images but {n - len(rows)} labels"]),
              "no_images_key": (None, ["no images (looked for keys"]), "no_labels_key": (None, ["no labels"]),
              "five_dims": (None, ["must be [N, C, H, W]"]), "empty_side": (None, ["an empty channel or side"]),
              "truncated": (None, ["cannot read it"]), "garbage": (None, ["cannot read it"]),
              "zero_bytes": (None, ["cannot read it"])}.get(fault)
    if expect is not None:
        refused("read_tensor_file", lambda: read_tensor_file(path), indices=expect[0], mentions=[where, *expect[1]])
        return
    x, y, test = read_tensor_file(path)
    assert test is None and torch.equal(y, labels.long())
    assert x.dtype == torch.float32 and torch.equal(torch.nan_to_num(x), torch.nan_to_num(want))
    correct("read_tensor_file")
    if fault == "empty":
        refused("load_score_data", lambda: load_score_data(str(path)), mentions=[where, "holds no images"])
        return
    score_data = load_score_data(str(path))  # normalised per channel: a bad image stays bad, the others finite
    bad = [i for i in range(n) if fault == "nonfinite" and i in rows]
    assert torch.nonzero(score_data.raw_nonfinite).flatten().tolist() == bad
    finite_rows = torch.isfinite(score_data.train.images.flatten(1)).all(dim=1)
    assert torch.nonzero(~finite_rows).flatten().tolist() == bad
    correct("load_score_data")


FOLDER_FAULTS = ["none", "empty_class", "no_images", "no_classes", "mixed_sizes", "truncated", "garbage", "zero_bytes"]


@FUZZ
@given(counts=st.lists(st.integers(1, 3), min_size=1, max_size=3), mode=st.sampled_from(["L", "RGB"]),
       fault=st.sampled_from(FOLDER_FAULTS), sized=st.booleans(), data=st.data())
def test_image_folder(tmp_path, counts, mode, fault, sized, data):
    root = tmp_path / uuid.uuid4().hex
    root.mkdir()
    rng = np.random.default_rng(len(counts) * 10 + sum(counts))
    names = [f"class{c}" for c in range(len(counts))]
    if fault == "empty_class":
        empty = data.draw(st.sampled_from(names))
        counts = [0 if name == empty else k for name, k in zip(names, counts)]
    if fault == "no_images" or not any(counts):
        fault, counts = "no_images", [0] * len(counts)
    arrays, paths = [], []
    for name, k in zip(names, counts):
        if fault == "no_classes":
            break
        (root / name).mkdir()
        for i in range(k):
            arr = rng.integers(0, 256, (6, 5) if mode == "L" else (6, 5, 3), dtype=np.uint8)
            path = root / name / f"img{i}.png"
            Image.fromarray(arr, mode).save(path)
            arrays.append(arr)
            paths.append(path)
    if fault in ("truncated", "garbage", "zero_bytes", "mixed_sizes"):
        pos = data.draw(st.integers(0, len(paths) - 1))
        blob = paths[pos].read_bytes()
        if fault == "truncated":
            paths[pos].write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
        elif fault == "garbage":
            paths[pos].write_bytes(bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=64))))
        elif fault == "zero_bytes":
            paths[pos].write_bytes(b"")
        elif len(paths) > 1:
            Image.fromarray(np.zeros((7, 5), np.uint8), "L").save(paths[pos])
        else:
            fault = "none"
    size = (6, 5) if sized else None
    if fault == "mixed_sizes" and sized:
        fault = "none_resized"  # an explicit size resizes the odd image: a correct result
    expect = {"empty_class": (None, ["class folders without images", f"'{names[counts.index(0)]}'" if 0 in counts
                                     else ""]),
              "no_images": (None, ["no image files"]), "no_classes": (None, ["has no class subfolders"]),
              "mixed_sizes": (([pos] if pos else list(range(1, len(paths)))) if fault == "mixed_sizes" else None,
                              [f"differ from the first image's {'7x5' if fault == 'mixed_sizes' and pos == 0 else '6x5'}"]),
              "truncated": (None, [f"image at position {pos} ({paths[pos]})" if fault == "truncated" else ""]),
              "garbage": (None, [f"image at position {pos} ({paths[pos]})" if fault == "garbage" else ""]),
              "zero_bytes": (None, [f"image at position {pos} ({paths[pos]})" if fault == "zero_bytes" else ""]),
              }.get(fault)
    if fault == "truncated":  # a cut inside the last chunk's checksum leaves every pixel intact: either outcome
        try:
            ImageFolder(root, size=size)
        except ValueError:
            pass
        else:
            expect = None
    if expect is not None:
        refused("ImageFolder", lambda: ImageFolder(root, size=size), indices=expect[0], mentions=["ImageFolder: ",
                                                                                                  *expect[1]])
        return
    ds = ImageFolder(root, size=size)
    assert len(ds) == len(arrays) and ds.targets == [c for c, k in enumerate(counts) for _ in range(k)]
    for i, arr in enumerate(arrays):
        if fault == "none_resized" and i == pos:
            continue
        want = torch.from_numpy(arr.astype(np.float32) / 255.0)
        want = want.unsqueeze(0) if mode == "L" else want.permute(2, 0, 1)
        assert torch.equal(ds[i][0], want)
    correct("ImageFolder")


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_image_damaged_after_the_folder_was_opened_is_named_when_read(tmp_path, damage):
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8), "L").save(tmp_path / "a" / f"{i}.png")
    ds = ImageFolder(tmp_path)
    target = tmp_path / "a" / "1.png"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:30])
    else:
        target.unlink()
    with pytest.raises(ValueError, match=rf"ImageFolder: image at position 1 \({target}\) cannot be decoded"):
        ds[1]
