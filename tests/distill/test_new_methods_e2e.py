"""MTT, DATM and IDC end to end: from the CLI with and without IWD on the smoke preset (digits), resume
bit for bit, the ZCA option, and one-line errors for bad options before any expert is trained."""
import dataclasses
import json

import pytest
import torch

from iwd_fast.app.cli import main
from iwd_fast.app.distill_job import run_distillation
from iwd_fast.app.presets import preset_config
from iwd_fast.distill.config import IWDSpec


@pytest.fixture(scope="module")
def shared_cwd(tmp_path_factory):
    """One working directory for the CLI runs: their expert buffers (runs/buffers) are shared, as in use."""
    return tmp_path_factory.mktemp("cli")


@pytest.mark.parametrize("method", ["mtt", "datm", "idc"])
@pytest.mark.parametrize("weighting", ["none", "iwd"])
def test_cli_runs_each_method(shared_cwd, monkeypatch, capsys, method, weighting):
    monkeypatch.chdir(shared_cwd)  # expert buffers go to runs/buffers under the working directory
    out = shared_cwd / f"run_{method}_{weighting}"
    code = main(["distill", "--method", method, "--dataset", "digits", "--ipc", "2", "--preset", "smoke",
                 "--weighting", weighting, "--noise", "0.2", "--seed", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"] == method
    assert (out / "synthetic.safetensors").is_file() and (out / "weights.safetensors").is_file() == (weighting == "iwd")
    if method in ("mtt", "datm"):
        facts = summary["method"]
        assert facts["learned_syn_lr"] > 0 and facts["experts"]["weighted"] == (weighting == "iwd")
        if weighting == "iwd":
            two = facts["iwd_two_pass"]
            assert two["checkpoints"] >= 1 and two["dots"] == two["instances"] * two["checkpoints"]
            assert two["scoring_seconds"] > 0 and summary["timing_seconds"]["checkpoint scoring"] > 0
            assert facts["experts"]["buffer"] != two["unweighted_buffer"]
    if method == "idc":
        assert summary["method"]["idc_decoded_per_class"] == 8
    # re-evaluation from the run folder trains on what the method trains on (decoded set, soft labels): with the
    # run's own networks it reproduces the reported accuracy exactly
    assert main(["evaluate", str(out), "--quiet"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["accs"] == summary["accuracy"]["accs"]


def _smoke(method, tmp_path, **changes):
    cfg = preset_config("smoke", method, "digits", 2)
    cfg = cfg.replace(tm=dataclasses.replace(cfg.tm, buffer_dir=str(tmp_path / "buffers")))
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("method", ["mtt", "datm", "idc"])
def test_resume_is_bit_for_bit(tmp_path, tiny_splits, method):
    cfg = _smoke(method, tmp_path, iterations=3, weighting="iwd", noise=0.2,
                 iwd=IWDSpec(influence="self", init="weighted", warmup_steps=2))
    whole = run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "whole"), progress=False)
    assert run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "cut"), progress=False, until=1) == \
        {"stopped_at": 1}
    resumed = run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "cut"), progress=False)
    assert torch.equal(whole["synthetic"]["images"], resumed["synthetic"]["images"])
    assert whole["accuracy"]["accs"] == resumed["accuracy"]["accs"]
    if method != "idc":
        assert whole["method"]["learned_syn_lr"] == resumed["method"]["learned_syn_lr"]
        # the second and third runs reused both buffers and the cached scores
        assert resumed["method"]["experts"]["trained_now"] == [] and resumed["method"]["iwd_two_pass"]["scores_cached"]


def _datm(tmp_path, iterations, threshold):
    cfg = _smoke("datm", tmp_path, iterations=iterations)
    return cfg.replace(tm=dataclasses.replace(cfg.tm, datm_threshold=threshold))


def test_datm_trains_and_evaluates_soft_labels(tmp_path, tiny_splits):
    """With a gate no loss reaches every update is taken and moves the label logits; with a gate every loss
    exceeds, none is, and the logits stay where they started (the smoke loss sits near the preset's 1.1, so the
    test sets the gate instead of depending on the machine's rounding)."""
    from safetensors.torch import load_file

    def label_logits(name):
        return load_file(str(tmp_path / name / "synthetic.safetensors"))["label_logits"]

    run_distillation(_datm(tmp_path, 0, 1e9), tiny_splits, out_dir=str(tmp_path / "start"), progress=False,
                     evaluate=False)
    out = run_distillation(_datm(tmp_path, 2, 1e9), tiny_splits, out_dir=str(tmp_path / "run"), progress=False)
    saved = load_file(str(tmp_path / "run" / "synthetic.safetensors"))
    torch.testing.assert_close(saved["eval_targets"], torch.softmax(saved["label_logits"], dim=1))
    assert out["method"]["datm_skipped_updates"] == 0
    assert (label_logits("run") - label_logits("start")).abs().max() > 1e-4
    gated = run_distillation(_datm(tmp_path, 2, 0.0), tiny_splits, out_dir=str(tmp_path / "gated"), progress=False,
                             evaluate=False)
    assert gated["method"]["datm_skipped_updates"] == 2
    assert torch.equal(label_logits("gated"), label_logits("start"))


def test_zca_whitens_pool_and_test_alike(tmp_path, tiny_splits):
    pytest.importorskip("kornia")
    cfg = _smoke("mtt", tmp_path)
    cfg = cfg.replace(tm=dataclasses.replace(cfg.tm, zca=True))
    out = run_distillation(cfg, tiny_splits, progress=False)
    plain = run_distillation(_smoke("mtt", tmp_path), tiny_splits, progress=False)
    assert out["method"]["experts"]["key"] != plain["method"]["experts"]["key"]
    assert out["timing_seconds"]["zca"] > 0


def test_bad_options_fail_before_any_expert_is_trained(tmp_path, tiny_splits):
    cfg = _smoke("mtt", tmp_path)
    with pytest.raises(ValueError, match="experts are too short"):
        run_distillation(cfg.replace(tm=dataclasses.replace(cfg.tm, max_start_epoch=4)), tiny_splits, progress=False)
    with pytest.raises(ValueError, match="two-pass"):
        run_distillation(cfg.replace(weighting="iwd", iwd=IWDSpec(influence="explicit")), tiny_splits, progress=False)
    idc = _smoke("idc", tmp_path)
    with pytest.raises(ValueError, match="idc.metric"):
        run_distillation(idc.replace(idc=dataclasses.replace(idc.idc, metric="l3")), tiny_splits, progress=False)
    assert not (tmp_path / "buffers").exists()
