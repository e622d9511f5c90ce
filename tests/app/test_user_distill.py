"""Distilling a dataset of one's own end to end: an image folder and a tensors file (made here, tiny) through
`iwd-fast distill` and `iwd-fast bench` with every method, with and without IWD; `iwd-fast evaluate` reloading
the data from the run's config; the result bitwise that of the same pixels given as built-in-style tensors and
through the Python entry; user networks (`--model pkg.mod:factory`) and the one-line refusals of networks and
data a method cannot use."""
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from iwd_fast.app.bench import run_bench
from iwd_fast.app.cli import main
from iwd_fast.app.distill_job import run_distillation
from iwd_fast.data import make_splits
from iwd_fast.distill.config import DistillConfig

METHODS = ["dc", "dsa", "dm", "mtt", "datm", "idc"]
NAMES = ["ant", "bee", "cow"]
SLOW = pytest.mark.slow


def _arrays(per_class, seed):
    """uint8 [3 * per_class, 8, 8] class-major (class c has a bright band of rows), labels [3 * per_class]."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 90, (3 * per_class, 8, 8)).astype(np.uint8)
    y = np.repeat(np.arange(3), per_class)
    for c in range(3):
        x[y == c, 2 * c:2 * c + 3] += 150
    return x, y


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """The same pixels as an image folder (train/ and test/, class subfolders) and as a tensors file."""
    root = tmp_path_factory.mktemp("user_data")
    (tx, ty), (vx, vy) = _arrays(8, 0), _arrays(4, 1)
    for part, x, y in (("train", tx, ty), ("test", vx, vy)):
        for i, (img, lab) in enumerate(zip(x, y)):
            (root / part / NAMES[lab]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / part / NAMES[lab] / f"{i:04d}.png")
    np.savez(root / "tiny.npz", images=tx, labels=ty, test_images=vx, test_labels=vy, class_names=np.array(NAMES))
    return {"root": root, "folder": ["--dataset", str(root / "train"), "--test", str(root / "test")],
            "file": ["--dataset", str(root / "tiny.npz")], "arrays": (tx, ty, vx, vy)}


def _distill(args, out, method, weighting, capsys):
    code = main(["distill", "--method", method, "--weighting", weighting, "--ipc", "1", "--preset", "smoke",
                 "--noise", "0.25", "--seed", "2", "--out", str(out), "--quiet", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# The fast tier: every method with IWD and DC without it from the folder (bench covers every method both ways on
# the tensors file); the slow tier the rest.
CLI_CASES = [("folder", m, "auto") for m in METHODS] + [("folder", "dc", "none")] + \
    [pytest.param("folder", m, "none", marks=SLOW) for m in METHODS[1:]] + \
    [pytest.param("file", m, w, marks=SLOW) for m in METHODS for w in ("none", "auto")]


@pytest.mark.parametrize("source,method,weighting", CLI_CASES)
def test_cli_distils_and_evaluates_every_method(user_data, tmp_path, monkeypatch, capsys, source, method, weighting):
    monkeypatch.chdir(tmp_path)  # expert buffers go to runs/buffers under the working directory
    out = tmp_path / "run"
    printed = _distill(user_data[source], out, method, weighting, capsys)
    assert "scaled to it" in printed and "ConvNet depth 2 for 8x8 images" in printed  # said before the run
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == user_data[source][1] and config["net"]["depth"] == 2
    data = json.loads((out / "data.json").read_text())
    assert data["class_names"] == NAMES and data["train_images"] == 24 and data["test_images"] == 12
    with safe_open(str(out / "synthetic.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["class_names"]) == NAMES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_names"] == NAMES and f"classes\": \"3: {', '.join(NAMES)}" in printed
    assert ("noise_estimate" in summary) == (weighting == "auto")  # IWD's cross-fitted warm-up ran
    # evaluate reloads the data from the run's config and reproduces the run's own accuracy exactly
    assert main(["evaluate", str(out), "--quiet"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["accs"] == summary["accuracy"]["accs"]


SPEC = """
name = "mine"
preset = "smoke"
methods = {methods}
datasets = ["{dataset}"]
ipc = [1]
noise = [[0.25, "symmetric"]]

[config]
seed = 2
tm = {{ buffer_dir = "{buffers}" }}
{data}

[variants.unweighted]
weighting = "none"

[variants.iwd]
weighting = "auto"
"""


@pytest.mark.parametrize("source", ["file", pytest.param("folder", marks=SLOW)])
def test_bench_runs_every_method_on_ones_own_data(user_data, tmp_path, capsys, source):
    root = user_data["root"]
    dataset, data = (root / "tiny.npz", "") if source == "file" else (root / "train", f'data = {{ test = "{root / "test"}" }}')
    spec = tmp_path / "mine.toml"
    spec.write_text(SPEC.format(methods=json.dumps(METHODS), dataset=dataset, buffers=tmp_path / "buffers", data=data))
    res = run_bench(str(spec), str(tmp_path / "suite"), progress=False)
    assert not res["failed"] and res["finished"] == 12
    printed = capsys.readouterr().out
    assert f"{dataset.name} (mtt, ipc 1, preset smoke)" in printed and "ConvNet depth 2" in printed
    rows = res["rows"]
    assert {(r["method"], r["weighting"]) for r in rows} == {(m, w) for m in METHODS for w in ("none", "auto")}
    assert all(r["dataset"] == dataset.name and r["accuracy"] is not None and r["init_accuracy"] is not None
               for r in rows)
    cell = tmp_path / "suite" / "cells" / rows[0]["cell"]
    assert json.loads((cell / "config.json").read_text())["dataset"] == str(dataset)
    assert json.loads((cell / "data.json").read_text())["class_names"] == NAMES


@pytest.mark.parametrize("method,weighting", [("dc", "auto"), ("dm", "none"), pytest.param("dc", "none", marks=SLOW),
                                              pytest.param("dsa", "auto", marks=SLOW)])
def test_folder_file_and_builtin_style_tensors_give_the_same_synthetic_set(user_data, tmp_path, capsys, method,
                                                                           weighting):
    folder, file = tmp_path / "folder", tmp_path / "file"
    _distill(user_data["folder"], folder, method, weighting, capsys)
    _distill(user_data["file"], file, method, weighting, capsys)
    cfg = DistillConfig.from_dict(json.loads((folder / "config.json").read_text()))
    tx, ty, vx, vy = user_data["arrays"]
    splits = make_splits("tiny", tx[:, None], ty, vx[:, None], vy, 3, NAMES)  # what the built-in loaders build
    builtin = run_distillation(cfg, splits, progress=False)
    runs = [json.loads((d / "summary.json").read_text())["accuracy"]["accs"] for d in (folder, file)]
    assert runs[0] == runs[1] == builtin["accuracy"]["accs"]
    for d in (folder, file):
        with safe_open(str(d / "synthetic.safetensors"), framework="pt") as f:
            assert torch.equal(f.get_tensor("images"), builtin["synthetic"]["images"])


def test_python_entry_distils_a_dataset_with_iwd(user_data, tmp_path, capsys):
    from iwd_fast.app import distill_data

    tx, ty, vx, vy = user_data["arrays"]

    class Pictures(torch.utils.data.Dataset):  # what a user has: (image [1, H, W] in [0, 1], label) pairs
        def __init__(self, x, y):
            self.x, self.y = torch.from_numpy(x).float().div(255).unsqueeze(1), y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    result = distill_data(Pictures(tx, ty), Pictures(vx, vy), class_names=NAMES, method="dc", weighting="auto",
                          preset="smoke", ipc=1, seed=2, noise=0.25, progress=False)
    assert result.images.shape == (3, 1, 8, 8) and result.labels.tolist() == [0, 1, 2]
    assert result.class_names == NAMES and result.config.weighting == "auto" and "noise_estimate" in result.summary
    assert 0 <= result.pixels().min() and result.pixels().max() <= 1 and result.accuracy is not None
    # the same pixels from the folder through the command line: the same synthetic set
    _distill(user_data["folder"], tmp_path / "cli", "dc", "auto", capsys)
    with safe_open(str(tmp_path / "cli" / "synthetic.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("images"), result.images)


NETS = """
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, channels, num_classes, im_size):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(channels, 4, 3, padding=1), nn.Linear(4 * im_size[0] * im_size[1], num_classes)

    def embed(self, x):
        return F.relu(self.conv(x)).flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


class Frozen(Net):
    def forward(self, x):  # reads the weights' .data: a functional call cannot substitute them
        return F.linear(self.embed(x), self.fc.weight.data, self.fc.bias.data)


def make_net(channels, num_classes, im_size):
    return Net(channels, num_classes, im_size)


def plain(channels, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, num_classes))


def frozen(channels, num_classes, im_size):
    return Frozen(channels, num_classes, im_size)


def prelu(channels, num_classes):
    return nn.Sequential(nn.Conv2d(channels, 2, 3), nn.PReLU(), nn.Flatten(), nn.Linear(72, num_classes))


def wrong(channels, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, num_classes + 1))
"""


def test_user_network_distils_and_networks_a_method_cannot_use_are_refused(user_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dm"
    _distill([*user_data["folder"], "--model", "my_nets:make_net"], out, "dm", "none", capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["net"]["name"] == "my_nets:make_net" and config["eval"]["net"] is None
    assert "network my_nets:make_net" in json.loads((out / "summary.json").read_text())["accuracy"]["protocol"]["variant"]
    assert main(["evaluate", str(out), "--quiet"]) == 0
    cases = [("dm", "none", "my_nets:plain", "needs an embed(x) method"),
             ("mtt", "none", "my_nets:frozen", "ignores the parameters ['fc.weight', 'fc.bias'] passed to it"),
             ("dc", "iwd", "my_nets:prelu", "module '1' (PReLU) has no per-layer rule"),
             ("dc", "none", "my_nets:wrong", "to logits [B, 3]; it returned (2, 4)"),
             ("dc", "none", "my_nets:nothing", "my_nets has no callable 'nothing'")]
    for method, weighting, model, message in cases:
        bad = tmp_path / f"bad_{method}_{model.split(':')[1]}"
        assert main(["distill", "--method", method, "--weighting", weighting, "--ipc", "1", "--preset", "smoke",
                     "--model", model, "--out", str(bad), "--quiet", *user_data["folder"]]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err and model in err, err
        assert not bad.exists()  # refused before anything was written


def test_bad_data_and_ipc_refused_in_one_line_before_anything_is_written(user_data, tmp_path, capsys, monkeypatch):
    def refused(args, message):
        out = tmp_path / "never"
        assert main(["distill", "--preset", "smoke", "--out", str(out), "--quiet", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not out.exists()

    monkeypatch.setattr("iwd_fast.data.image_folder.ImageFolder.pixels", lambda *a: pytest.fail("decoded"))
    refused([*user_data["folder"], "--ipc", "9"], "'ant' (label 0) has 8, 'bee' (label 1) has 8, 'cow' (label 2) has 8 "
                                                 "images; every class needs at least 9 (ipc=9)")
    refused([*user_data["folder"], "--method", "idc", "--ipc", "3"], "at least 12 (ipc=3 x 4 tiles of IDC's mix start)")
    refused(["--dataset", str(tmp_path / "nowhere")], "no such file or folder")
    refused(["--dataset", "digits", "--test", str(tmp_path)], "--test and --image-size apply to a dataset of your own")
    monkeypatch.undo()
    # the pool (training part less its held-out split) decides: 8 training images leave 7 in the pool
    refused([*user_data["folder"], "--ipc", "8"], "the training pool (training set less its held-out split): 'ant'")
