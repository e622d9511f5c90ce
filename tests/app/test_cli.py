"""The iwd-fast command end to end on tiny budgets (smoke preset, scikit-learn digits)."""
import json
import subprocess
import sys

import pytest

from iwd_fast.app.cli import main


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_distill_then_evaluate(tmp_path, method, capsys):
    out = tmp_path / method
    code = main(["distill", "--method", method, "--dataset", "digits", "--ipc", "1", "--preset", "smoke",
                 "--weighting", "iwd", "--influence", "validation", "--init", "weighted", "--noise", "0.2",
                 "--seed", "3", "--out", str(out), "--quiet"])
    assert code == 0
    for name in ("config.json", "env.json", "metrics.jsonl", "synthetic.safetensors", "weights.safetensors",
                 "summary.json", "timing.json", "synthetic.png", "weights_hist.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["seed"] == 3 and config["noise"] == 0.2
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"]["mean"] <= 1.0
    assert "test_accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--num-nets", "1", "--epochs", "1", "--quiet"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["protocol"]["num_nets"] == 1


def test_score_writes_scores_and_weights(tmp_path, capsys):
    out = tmp_path / "score"
    assert main(["score", "--dataset", "digits", "--target", "self", "--noise", "0.3", "--epochs", "1",
                 "--width", "8", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scored"] + summary["n_heldout"] == summary["n_train"]
    assert 0.0 <= summary["auroc_flipped"] <= 1.0
    assert (out / "scores.pt").is_file() and (out / "weights.safetensors").is_file()


def test_demo_on_smoke_budget(tmp_path, capsys):
    assert main(["demo", "--dataset", "digits", "--preset", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "weight on flipped" in printed and "dc_iwd_seed0" in printed and "dc_none_seed0" in printed
    assert (tmp_path / "demo_table.md").is_file()


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    code = main(["distill", "--preset", "smoke", "--noise", "1.5", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rate" in err


def test_module_entry_point_and_env():
    help_text = subprocess.run([sys.executable, "-m", "iwd_fast", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for command in ("distill", "evaluate", "score", "demo", "env"):
        assert command in help_text
    env = subprocess.run([sys.executable, "-m", "iwd_fast", "env"], capture_output=True, text=True, check=True).stdout
    assert "backends for cpu tensors" in env and "reference" in env
