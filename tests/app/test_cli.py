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
    assert "test_accuracy" in capsys.readouterr().out
    # evaluate with its defaults reproduces the run's own accuracy, exactly; other settings are other networks
    assert main(["evaluate", str(out), "--quiet"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["accs"] == summary["accuracy"]["accs"]
    assert main(["evaluate", str(out), "--num-nets", "1", "--epochs", "1", "--quiet"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["protocol"]["num_nets"] == 1
    # the same command again: the finished run is reported, not repeated
    lines = (out / "metrics.jsonl").read_text().count("\n")
    assert main(["distill", "--method", method, "--dataset", "digits", "--ipc", "1", "--preset", "smoke",
                 "--weighting", "iwd", "--influence", "validation", "--init", "weighted", "--noise", "0.2",
                 "--seed", "3", "--out", str(out), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text().count("\n") == lines


def test_score_writes_scores_and_weights(tmp_path, capsys):
    out = tmp_path / "score"
    assert main(["score", "--dataset", "digits", "--target", "self", "--noise", "0.3", "--epochs", "1",
                 "--width", "8", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scored"] + summary["n_heldout"] == summary["n_train"]
    assert 0.0 <= summary["auroc_flipped"] <= 1.0
    assert (out / "scores.pt").is_file() and (out / "weights.safetensors").is_file()


def test_demo_on_smoke_budget_then_report(tmp_path, capsys):
    assert main(["demo", "--dataset", "digits", "--preset", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "initial images acc" in printed and "paired by seed" in printed and "digits" in printed
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert sorted((r["seed"], r["weighting"] == "none") for r in rows) == [(0, False), (0, True), (1, False), (1, True)]
    for r in rows:
        assert {"seed", "weighting", "init_accuracy", "accuracy", "weight_on_flipped", "auroc_flipped", "seconds"} <= set(r)
    # the IWD runs are the recommended noisy-label setting of DC: trust weights, initial images among the trusted
    assert {r["weighting"] for r in rows if r["weighting"] != "none"} == {"iwd (auto, init trusted)"}
    assert (tmp_path / "demo_table.md").is_file() and (tmp_path / "demo_accuracy.png").stat().st_size > 0
    # the demo is a suite: its results.jsonl is what `iwd-fast report` reads
    assert main(["report", str(tmp_path / "results.jsonl"), "--baseline", "unweighted",
                 "--plots", str(tmp_path / "plots")]) == 0
    assert "paired gain over unweighted" in capsys.readouterr().out


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    code = main(["distill", "--preset", "smoke", "--noise", "1.5", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rate" in err
    assert not (tmp_path / "x").exists()  # refused before anything was written
    assert main(["evaluate", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "no such run folder" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_module_entry_point_and_env():
    help_text = subprocess.run([sys.executable, "-m", "iwd_fast", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for command in ("distill", "evaluate", "score", "demo", "bench", "report", "env"):
        assert command in help_text
    env = subprocess.run([sys.executable, "-m", "iwd_fast", "env"], capture_output=True, text=True, check=True).stdout
    assert "backends for cpu tensors" in env and "reference" in env
