"""``iwd-fast score`` end to end: any model and dataset form, targets, the run folder guard, bad input as one
line before any training, and the documented torchrun command."""
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import iwd_fast
from iwd_fast.app.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--epochs", "1", "--width", "4", "--quiet"]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: digits)", "(default: validation)", "(default: 256)", "(default: runs/score)",
                    "(default: auto)"):
        assert default in text, default


def test_cuda_impl_and_device_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run these")
    monkeypatch.setattr("iwd_fast.app.score.job.train_network", lambda *a, **k: pytest.fail("training started"))
    assert main(["score", "--impl", "cuda", "--out", str(tmp_path / "a")] + TINY) == 2
    assert "--impl cuda cannot run on cpu" in one_line_error(capsys)
    assert main(["score", "--device", "cuda", "--out", str(tmp_path / "b")] + TINY) == 2
    assert "--device cuda: this torch is built without CUDA" in one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_download_without_network_one_line_no_cache_folder(tmp_path, capsys, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    monkeypatch.setenv("IWD_FAST_CACHE", str(tmp_path / "cache"))
    assert main(["score", "--dataset", "mnist", "--download", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "download of https://" in one_line_error(capsys)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_finished_run_is_reported_and_another_target_refused(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "val")
    assert main(["score", "--target", "validation", "--noise", "0.3", "--out", out] + TINY) == 0
    first = json.loads((tmp_path / "val" / "summary.json").read_text())
    assert first["n_heldout"] > 0 and first["n_scored"] + first["n_heldout"] == first["n_train"]
    assert 0 <= first["auroc_flipped"] <= 1 and first["checksum"]
    capsys.readouterr()
    monkeypatch.setattr("iwd_fast.app.score.job.train_network", lambda *a, **k: pytest.fail("trained again"))
    assert main(["score", "--target", "validation", "--noise", "0.3", "--out", out] + TINY) == 0
    assert "already holds this finished run" in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "val").iterdir()}
    assert main(["score", "--target", "self", "--noise", "0.3", "--out", out] + TINY) == 2
    err = one_line_error(capsys)
    assert "--target 'validation' there, 'self' now" in err and "refusing" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "val").iterdir()} == before


def write_factory(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def make(channels, num_classes):
            return nn.Sequential(nn.Conv2d(channels, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, num_classes))
    """))


def test_user_model_from_factory_and_checkpoint_on_a_tensors_file(tmp_path, capsys, monkeypatch):
    write_factory(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 6, 6), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (50,), generator=g)
    torch.save({"images": images, "labels": labels}, tmp_path / "data.pt")
    torch.manual_seed(1)
    net = my_models.make(1, 4)
    torch.save(net.state_dict(), tmp_path / "ck.pt")
    v = {n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}
    torch.save([v, {n: -t for n, t in v.items()}], tmp_path / "v.pt")
    out = tmp_path / "run"
    assert main(["score", "--dataset", str(tmp_path / "data.pt"), "--model", "my_models:make", "--checkpoint",
                 str(tmp_path / "ck.pt"), "--target", "direction", "--direction", str(tmp_path / "v.pt"),
                 "--batch", "16", "--normalize", "none", "--out", str(out), "--quiet"]) == 0
    scores = torch.load(out / "scores.pt", weights_only=True)["scores"]
    assert scores.shape == (50, 2)
    ref = iwd_fast.grad_dot(net.eval(), images.float() / 255, labels, [v, {n: -t for n, t in v.items()}],
                            impl="reference")
    torch.testing.assert_close(scores, ref.double(), rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    assert main(["score", "--dataset", str(tmp_path / "data.pt"), "--model", "my_models:nope", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    assert "has no callable 'nope'" in one_line_error(capsys)
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    assert main(["score", "--dataset", str(tmp_path / "data.pt"), "--model", "my_models:make", "--checkpoint",
                 str(tmp_path / "bad.pt"), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "does not fit the model" in one_line_error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_user_model_that_fails_to_import_names_where(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_models.py").write_text("import torch\n\n\ndef helper():\n    raise RuntimeError('no GPU here')\n\n\n"
                                               "helper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save({"images": torch.zeros(4, 1, 6, 6), "labels": torch.tensor([0, 1, 0, 1])}, tmp_path / "data.pt")
    assert main(["score", "--dataset", str(tmp_path / "data.pt"), "--model", "broken_models:make", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "cannot import broken_models (RuntimeError: no GPU here)" in err
    assert f"raised at {tmp_path / 'broken_models.py'}:5" in err  # the failing line of the user's module


def test_image_folder_streamed_with_workers(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8), 40 * c + 7 * i, dtype=np.uint8)).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    out = tmp_path / "run"
    assert main(["score", "--dataset", str(tmp_path / "imgs"), "--target", "self", "--epochs", "1", "--width", "4",
                 "--workers", "1", "--batch", "4", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 15 and summary["test_accuracy"] is None
    from safetensors.torch import load_file
    inst = load_file(str(out / "instances.safetensors"))
    assert inst["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5 and (inst["weights"] > 0).all()


def test_documented_torchrun_command_writes_the_single_process_file(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["score", "--dataset", "digits", "--target", "validation", "--epochs", "1", "--width", "4",
            "--batch", "64", "--chunk-batches", "2", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "iwd_fast", *args, "--threads", "1", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "iwd_fast", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert (tmp_path / "two" / "scores.pt").read_bytes() == (tmp_path / "one" / "scores.pt").read_bytes()
    assert (tmp_path / "two" / "model.pt").read_bytes() == (tmp_path / "one" / "model.pt").read_bytes()


def test_nonfinite_images_named_before_training_or_given_weight_zero(tmp_path, capsys, monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g)
    images[[5, 33]] = float("nan")
    torch.save({"images": images, "labels": torch.arange(40) % 4}, tmp_path / "nan.pt")
    base = ["score", "--dataset", str(tmp_path / "nan.pt"), "--normalize", "none", "--width", "4", "--epochs", "1",
            "--target", "self", "--batch", "16", "--quiet"]
    with monkeypatch.context() as m:
        m.setattr("iwd_fast.app.score.job.train_network", lambda *a, **k: pytest.fail("training started"))
        assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "non-finite images (NaN or Inf) at indices [5, 33]" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()
    assert main(base + ["--nonfinite", "skip", "--out", str(tmp_path / "b")]) == 0  # trains on the finite ones
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["n_nonfinite"] == 2 and summary["nonfinite_positions"] == [5, 33]
    from safetensors.torch import load_file
    inst = load_file(str(tmp_path / "b" / "instances.safetensors"))
    assert inst["weights"][[5, 33]].tolist() == [0.0, 0.0] and (inst["weights"][[0, 6, 39]] > 0).all()
    assert inst["nonfinite"].nonzero().flatten().tolist() == [5, 33]
