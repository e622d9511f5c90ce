"""Tests for iwd_fast.runlog: run-folder files, JSONL metrics, tensors, atomic checkpoints."""
import json

import pytest
import torch

from iwd_fast.app import run_folder as runlog
from iwd_fast.distill.config import DistillConfig
from iwd_fast.app.run_folder import RunFolder


def test_config_env_and_json(tmp_path):
    run = RunFolder(tmp_path / "runs" / "a")  # nested folders are created
    cfg = DistillConfig(method="dm", ipc=1, seed=3)
    path = run.write_config(cfg)
    assert path.name == "config.json"
    assert DistillConfig.from_dict(json.loads(path.read_text())) == cfg
    assert DistillConfig.from_dict(run.read_config()) == cfg
    env = json.loads(run.write_env("cpu").read_text())
    for key in ("python", "torch", "numpy", "triton", "platform", "device", "git_sha"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["git_sha"]
    doc = json.loads(run.save_json("result", {"acc": torch.tensor(0.5), "accs": torch.tensor([0.25, 0.75])})
                     .read_text())
    assert doc == {"acc": 0.5, "accs": [0.25, 0.75]}


def test_git_sha_unknown_outside_a_repo(tmp_path):
    assert runlog.git_sha(tmp_path) == "unknown"


def test_log_appends_parseable_lines(tmp_path):
    run = RunFolder(tmp_path)
    run.log({"iteration": 0, "loss": torch.tensor(1.5)})
    run.log({"iteration": 1, "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["iteration"] for r in records] == [0, 1] and records[0]["loss"] == 1.5
    assert all("time" in r for r in records)
    assert run.read_log() == records
    with pytest.raises(ValueError, match="dict"):
        run.log([1, 2])


def test_tensors_roundtrip(tmp_path):
    run = RunFolder(tmp_path)
    images = torch.randn(4, 1, 8, 8).transpose(2, 3)  # non-contiguous on purpose
    labels = torch.tensor([0, 1, 2, 3])
    path = run.save_tensors("synthetic", {"images": images, "labels": labels})
    assert path.name == "synthetic.safetensors" and path.stat().st_size > 0
    back = run.load_tensors("synthetic")
    assert torch.equal(back["images"], images) and torch.equal(back["labels"], labels)
    with pytest.raises(ValueError, match="plain file name"):
        run.save_tensors("../escape", {"x": labels})


def test_checkpoint_roundtrip_and_atomic_write(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    assert run.load_checkpoint() is None
    state = {"iteration": 7, "syn": torch.randn(3, 2), "rng": torch.get_rng_state(), "history": [0.1, 0.2]}
    run.checkpoint(state)
    back = run.load_checkpoint()
    assert back["iteration"] == 7 and back["history"] == [0.1, 0.2]
    assert torch.equal(back["syn"], state["syn"]) and torch.equal(back["rng"], state["rng"])

    def crash(obj, f, *args, **kwargs):  # dies half-way through writing
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(runlog.torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run.checkpoint({"iteration": 8})
    monkeypatch.undo()
    assert run.load_checkpoint()["iteration"] == 7  # the previous checkpoint survived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left over

def test_path_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        RunFolder(f)
