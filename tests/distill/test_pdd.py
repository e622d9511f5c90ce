"""PDD on tiny problems: a stage's loss depends on the earlier stages' images and not on later ones, frozen
images never move, weighted and unweighted stages against explicit float64 loops, one stage is the base
method bit for bit, resume at a stage boundary and inside a stage, and the evaluation through the stages."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from iwd_fast.app.distill_job import dsa_strategy_of, run_distillation
from iwd_fast.app.presets import preset_config
from iwd_fast.distill import IWDState, SyntheticSet
from iwd_fast.distill.base import build_net
from iwd_fast.distill.config import IWDSpec, validate
from iwd_fast.distill.idc import decode_multi
from iwd_fast.distill.pdd import PDD
from iwd_fast.distill.pool import initial_indices, prepare_pool
from iwd_fast.distill.stages import RunContext
from iwd_fast.distill.trajectory.student import FlatNet
from iwd_fast.evaluate import build_eval_network, train_stages
from iwd_fast.runtime import PhaseTimer, Stream, mix_seed


def pdd_config(base, tmp_path, stages=3, ipc=3, iterations=3, **changes):
    """The smoke preset's PDD on ``base`` for the 4-class 8x8 problem (``tiny_splits``), no augmentation."""
    cfg = preset_config("smoke", "pdd", "digits", ipc, base=base)
    cfg = cfg.replace(iterations=iterations, dsa_strategy="none",
                      pdd=dataclasses.replace(cfg.pdd, stages=stages, condition_epochs=3),
                      tm=dataclasses.replace(cfg.tm, buffer_dir=str(tmp_path / "buffers")),
                      idc=dataclasses.replace(cfg.idc, aug="none"))
    return cfg.replace(**changes)


def built(cfg, splits):
    """A PDD object as run_distillation builds it (no warm-up: random initial images)."""
    validate(cfg)
    timer = PhaseTimer()
    pool = prepare_pool(cfg, splits, "cpu")
    iwd = IWDState.from_config(cfg, pool, timer, None)
    ctx = RunContext(cfg, pool, splits.test, torch.device("cpu"), timer, iwd, dsa_strategy_of(cfg), False,
                     lambda c: initial_indices(c, pool, None))
    prepared = PDD.prepare(ctx)
    init = prepared.init or initial_indices(cfg, prepared.pool, None)
    images = init["images"] if "images" in init else prepared.pool.images[init["indices"]]
    syn = SyntheticSet(images, prepared.pool.num_classes, cfg.ipc)
    return PDD(cfg, prepared.pool, syn, iwd, dsa_strategy_of(cfg), torch.device("cpu"), timer, prepared)


# ----------------------------------------------------------------------------------- stage conditioning

@pytest.mark.parametrize("base", ["mtt", "idc"])
def test_stage_loss_depends_on_earlier_stages_only(tmp_path, tiny_splits, base):
    """Stage 2 of 3: its first matching loss moves when stage 1's images move (they are its frozen images and,
    for the networks it matches, what they were trained on) and is bitwise unchanged when stage 3's move."""
    cfg = pdd_config(base, tmp_path)

    def first_loss(stage_to_move):
        pdd = built(cfg, tiny_splits)
        if stage_to_move is not None:
            with torch.no_grad():
                pdd.syn.images[pdd.stage_of() == stage_to_move] += 0.5
        return pdd.step(1)["match_loss"]  # global iteration 1 = stage 2's first

    reference = first_loss(None)
    assert first_loss(0) != reference
    assert first_loss(2) == reference


@pytest.mark.parametrize("base", ["mtt", "idc"])
def test_frozen_stages_never_move_and_the_current_one_does(tmp_path, tiny_splits, base):
    cfg = pdd_config(base, tmp_path, iterations=6)
    pdd = built(cfg, tiny_splits)
    stage = pdd.stage_of()
    start = pdd.syn.images.detach().clone()
    for it in range(4):  # stages 1 and 2 in full
        pdd.step(it)
        assert pdd.base.frozen is None if it < 2 else pdd.base.frozen.per_class == 1
    now = pdd.syn.images.detach()
    assert not torch.equal(now[stage == 0], start[stage == 0]) and not torch.equal(now[stage == 1], start[stage == 1])
    assert torch.equal(now[stage == 2], start[stage == 2])  # not reached yet
    after_stage1 = now[stage == 0].clone()
    pdd.step(4)
    assert torch.equal(pdd.syn.images.detach()[stage == 0], after_stage1)  # frozen during stage 3
    assert torch.equal(pdd.base.frozen.images, pdd.syn.images.detach()[stage < 2])


# ------------------------------------------------------------------- weighted stages against explicit loops

@pytest.mark.parametrize("weighted", [False, True])
def test_idc_stage_term_is_the_explicit_weighted_matching_of_the_union(tmp_path, tiny_splits, weighted):
    """Stage 2's class term, float64: || grad of CE on decode(frozen_c + new_c) - sum_i w_i g_i / sum_i w_i ||^2
    over the convolution weights (IDC's mse), the real gradient from a per-sample loop, the gradient reaching
    only the new images. Unweighted: w = 1."""
    cfg = pdd_config("idc", tmp_path, stages=2, ipc=2, iterations=2, weighting="iwd" if weighted else "none",
                     iwd=IWDSpec(influence="self", init="random", refresh=10 ** 6))
    cfg = cfg.replace(idc=dataclasses.replace(cfg.idc, metric="mse"), batch_real=8)
    pdd = built(cfg, tiny_splits)
    if weighted:
        n = pdd.pool.labels.shape[0]
        pdd.iwd.update(torch.arange(n), torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    pdd._enter(1)
    stage = pdd.base
    stage.pool = dataclasses.replace(stage.pool, images=stage.pool.images.double())
    stage.syn.images.data = stage.syn.images.data.double()
    stage.frozen = dataclasses.replace(stage.frozen, images=stage.frozen.images.double())
    net = build_net(cfg.net, stage.pool, 7, "cpu").double()
    names = [k for k, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    drawn = []
    sample = stage.sampler.sample
    stage.sampler.sample = lambda c, b: drawn.append(sample(c, b)) or drawn[-1]
    c = 1
    loss = stage._class_term(net, names, params, c, False, None)
    got = torch.autograd.grad(loss, stage.syn.images)[0]

    idx = drawn[0]
    # the batch's weights as the loop holds them (float32, relative to the largest); a weighted mean ignores the scale
    w = pdd.iwd.batch_weights(idx, "cpu").double() if weighted else torch.ones(idx.shape[0], dtype=torch.float64)
    assert weighted == bool(w.std() > 0)
    g_real = [torch.zeros_like(p) for p in params]
    for i, j in enumerate(idx.tolist()):
        gi = torch.autograd.grad(F.cross_entropy(net(stage.pool.images[j:j + 1]), stage.pool.labels[j:j + 1]), params)
        for acc, g in zip(g_real, gi):
            acc += w[i] * g / w.sum()
    new = stage.syn.images.detach().clone().requires_grad_(True)
    union = torch.cat([stage.frozen.of_class(c), new[c:c + 1]])
    decoded = decode_multi(union, cfg.idc.factor)
    g_syn = torch.autograd.grad(F.cross_entropy(net(decoded), torch.full((decoded.shape[0],), c)), params,
                                create_graph=True)
    dist = sum(((gs - gr) ** 2).sum() for gs, gr in zip(g_syn, g_real) if gs.dim() > 2)
    expected = torch.autograd.grad(dist, new)[0]
    torch.testing.assert_close(loss, dist, rtol=1e-10, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert got[c].abs().sum() > 0 and got[:c].abs().sum() == 0  # only class c's new image moves


def test_mtt_stage_experts_start_where_training_on_earlier_stages_ends_and_train_on_weights(tmp_path, tiny_splits):
    """Stage 2's weighted experts (two-pass IWD refreshed on stage 2's own unweighted experts): epoch 0 is the
    expert's fresh network trained on stage 1's images (the evaluation's recipe), epoch 1 one explicit
    weighted SGD pass over the pool from there, against a float64 per-sample loop."""
    cfg = pdd_config("mtt", tmp_path, stages=2, ipc=2, iterations=2, weighting="iwd",
                     iwd=IWDSpec(influence="self", init="random"))
    cfg = cfg.replace(tm=dataclasses.replace(cfg.tm, expert_batch=10 ** 4, expert_dsa=False))
    pdd = built(cfg, tiny_splits)
    pdd.step(0)
    pdd.step(1)  # enters stage 2: its experts
    prep = pdd.base.prepared
    buffer, weights, spec = prep.state["buffer"], prep.state["weights"], pdd.base.tm
    assert weights is not None and weights.std() > 0
    assert prep.summary["iwd_two_pass"]["unweighted_buffer"] != str(pdd.prepared.state["base"].state["buffer"].path)

    net = build_eval_network(cfg.net, 1, 4, (8, 8), mix_seed(spec.expert_seed, Stream.EXPERT_NETWORK, 0))
    stage1 = pdd.syn.images.detach()[pdd.stage_of() == 0], pdd.syn.labels[pdd.stage_of() == 0]
    train_stages(net, [stage1], [cfg.eval], mix_seed(spec.expert_seed, Stream.PDD_CONDITION, 1, 0), None, "cpu",
                 epochs=cfg.pdd.condition_epochs)
    flat = FlatNet(net)
    assert torch.equal(buffer.snapshot(0, 0), flat.flatten())

    net64 = build_eval_network(cfg.net, 1, 4, (8, 8), 0).double()
    flat64 = FlatNet(net64)
    theta0 = buffer.snapshot(0, 0).double()
    flat64.load_into_net(theta0)
    params = list(net64.parameters())
    x, y = pdd.pool.images.double(), pdd.pool.labels
    grads = [torch.zeros_like(p) for p in params]
    w = weights.double()
    for i in range(len(y)):
        gi = torch.autograd.grad(F.cross_entropy(net64(x[i:i + 1]), y[i:i + 1]), params)
        for acc, g in zip(grads, gi):
            acc += w[i] * g / w.sum()
    expected = theta0 - spec.expert_lr * flat64.flatten(grads)
    torch.testing.assert_close(buffer.snapshot(0, 1).double(), expected, rtol=0, atol=5e-6)


# ------------------------------------------------------------------------- one stage, resume, evaluation

@pytest.mark.parametrize("base", ["mtt", "idc"])
def test_one_stage_is_the_base_method_bit_for_bit(tmp_path, tiny_splits, base):
    cfg = pdd_config(base, tmp_path, stages=1, ipc=2, iterations=2, weighting="iwd",
                     iwd=IWDSpec(influence="self", init="random"))
    pdd = run_distillation(cfg, tiny_splits, progress=False)
    plain = run_distillation(cfg.replace(method=base), tiny_splits, progress=False)
    assert torch.equal(pdd["synthetic"]["images"], plain["synthetic"]["images"])
    assert pdd["accuracy"]["accs"] == plain["accuracy"]["accs"]
    assert pdd["init_accuracy"]["accs"] == plain["init_accuracy"]["accs"]
    assert torch.equal(pdd["weights"], plain["weights"])


@pytest.mark.parametrize("base", ["mtt", "idc"])
def test_resume_at_a_stage_boundary_and_inside_a_stage(tmp_path, tiny_splits, base):
    cfg = pdd_config(base, tmp_path, stages=2, ipc=2, iterations=4, weighting="iwd", noise=0.2,
                     iwd=IWDSpec(influence="self", init="weighted", warmup_steps=2))
    whole = run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "whole"), progress=False)
    cut = str(tmp_path / "cut")
    assert run_distillation(cfg, tiny_splits, out_dir=cut, progress=False, until=2) == {"stopped_at": 2}  # boundary
    assert run_distillation(cfg, tiny_splits, out_dir=cut, progress=False, until=3) == {"stopped_at": 3}  # inside
    resumed = run_distillation(cfg, tiny_splits, out_dir=cut, progress=False)
    assert torch.equal(whole["synthetic"]["images"], resumed["synthetic"]["images"])
    assert whole["accuracy"]["stages"] == resumed["accuracy"]["stages"]
    assert torch.equal(whole["weights"], resumed["weights"])
    assert [f.get("learned_syn_lr") for f in whole["method"]["pdd"]["stage_facts"]] == \
        [f.get("learned_syn_lr") for f in resumed["method"]["pdd"]["stage_facts"]]


def test_every_stage_ends_with_a_checkpoint(tmp_path, tiny_splits, monkeypatch):
    from iwd_fast.app.run_folder import RunFolder

    written = []
    write = RunFolder.checkpoint
    monkeypatch.setattr(RunFolder, "checkpoint", lambda self, state: written.append(state["iteration"]) or
                        write(self, state))
    cfg = pdd_config("idc", tmp_path, stages=3, ipc=3, iterations=6)
    run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "run"), progress=False, evaluate=False,
                     checkpoint_every=10 ** 6)
    assert written == [2, 4]  # the ends of stages 1 and 2 (the run's end writes the summary instead)


KILLED_RUN = """
import sys, time, torch
sys.path[:0] = [{root!r}, {tests!r}, {here!r}]
torch.set_num_threads(1)  # every process of the comparison alike
from conftest import make_tiny_splits
from test_pdd import killable_config
from iwd_fast.app.distill_job import run_distillation
from iwd_fast.app.run_folder import RunFolder
write = RunFolder.checkpoint
def checkpoint(self, state):
    path = write(self, state)
    print(state["iteration"], flush=True)
    if state["iteration"] == {kill_at}:
        time.sleep(60)
    return path
RunFolder.checkpoint = checkpoint
run_distillation(killable_config({buffers!r}), make_tiny_splits(), out_dir={out!r}, progress=False, checkpoint_every=1)
print("finished", flush=True)
"""


def killable_config(buffers):
    """PDD on IDC in 2 stages of 2 iterations with in-loop IWD from weighted initial images, 20% noise."""
    from pathlib import Path

    return pdd_config("idc", Path(buffers), stages=2, ipc=2, iterations=4, weighting="iwd", noise=0.2,
                      iwd=IWDSpec(influence="validation", init="weighted", warmup_steps=2, refresh=1))


def _run_until(tmp_path, out, kill_at):
    """The run in a fresh process, killed with SIGKILL once the checkpoint of iteration ``kill_at`` is written
    (None: left to finish)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = KILLED_RUN.format(root=str(here.parents[1]), tests=str(here.parent), here=str(here),
                               kill_at=-1 if kill_at is None else kill_at, buffers=str(tmp_path), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(here.parents[1])})
    wanted = "finished" if kill_at is None else str(kill_at)
    try:
        lines, deadline = [], time.time() + 300
        while wanted not in lines and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        assert wanted in lines, lines
        if kill_at is not None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigkill_at_a_stage_boundary_then_inside_a_stage_resumes_to_the_uninterrupted_run(tmp_path):
    """kill -9 right after the checkpoint that ends stage 1 (iteration 2), resume, kill -9 inside stage 2
    (after iteration 3), resume to the end: the run folder equals that of a run never interrupted (every
    process on one thread)."""
    from safetensors.torch import load_file

    import json

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for kill_at in (2, 3):
        _run_until(tmp_path, killed, kill_at)
        assert not (killed / "summary.json").exists()
    _run_until(tmp_path, killed, None)
    _run_until(tmp_path, whole, None)
    a, b = load_file(str(killed / "synthetic.safetensors")), load_file(str(whole / "synthetic.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wa, wb = load_file(str(killed / "weights.safetensors")), load_file(str(whole / "weights.safetensors"))
    assert torch.equal(wa["scores"], wb["scores"]) and torch.equal(wa["scored"], wb["scored"])
    sa, sb = (json.loads((f / "summary.json").read_text()) for f in (killed, whole))
    assert sa["accuracy"]["stages"] == sb["accuracy"]["stages"]


def test_evaluation_trains_through_the_stages(tmp_path, tiny_splits):
    """Every network trains on U_1, then U_2, ...; the accuracy after stage k is that of the network trained
    on U_1..U_k in turn, and the last is the run's accuracy."""
    cfg = pdd_config("mtt", tmp_path, stages=3, iterations=3)
    out = run_distillation(cfg, tiny_splits, progress=False)
    stages = out["accuracy"]["stages"]
    assert len(stages) == 3 and stages[-1]["accs"] == out["accuracy"]["accs"]
    x, y = out["synthetic"]["images"], out["synthetic"]["labels"]
    stage = torch.arange(3).repeat_interleave(1).repeat(4)
    seed = mix_seed(cfg.seed, Stream.EVALUATION) * 1000
    net = build_eval_network(cfg.net, 1, 4, (8, 8), seed)
    from iwd_fast.evaluate import test_accuracy

    accs = []
    train_stages(net, [(x[stage <= k], y[stage <= k]) for k in range(3)], [cfg.eval] * 3, seed, None, "cpu",
                 after_stage=lambda k: accs.append(test_accuracy(net, tiny_splits.test)))
    assert accs == [s["accs"][0] for s in stages]


def test_bad_pdd_options_fail_before_any_work(tmp_path, tiny_splits):
    cfg = pdd_config("mtt", tmp_path)
    for bad, match in ((cfg.replace(ipc=4), "dividing ipc"), (cfg.replace(iterations=4), "dividing ipc"),
                       (cfg.replace(pdd=dataclasses.replace(cfg.pdd, base="dm")), "pdd.base"),
                       (cfg.replace(pdd=dataclasses.replace(cfg.pdd, condition_epochs=0)), "condition_epochs"),
                       (cfg.replace(pdd=dataclasses.replace(cfg.pdd, stage_expert_epochs=1)), "experts are too short")):
        with pytest.raises(ValueError, match=match):
            run_distillation(bad, tiny_splits, out_dir=str(tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "buffers").exists()


# ---------------------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def shared_cwd(tmp_path_factory):
    """One working directory for the CLI runs (their expert buffers, runs/buffers, are shared as in use)."""
    return tmp_path_factory.mktemp("pdd_cli")


SLOW = pytest.mark.slow  # MTT's smoke experts train with DSA (about 15 s each on 2 cores); "auto" cross-fits first


@pytest.mark.parametrize("base,weighting", [("idc", "none"), ("idc", "iwd"), pytest.param("idc", "auto", marks=SLOW),
                                            pytest.param("mtt", "none", marks=SLOW),
                                            pytest.param("mtt", "iwd", marks=SLOW),
                                            pytest.param("mtt", "auto", marks=SLOW)])
def test_cli_runs_pdd_on_each_base_with_and_without_iwd(shared_cwd, monkeypatch, capsys, base, weighting):
    import json

    from iwd_fast.app.cli import main

    monkeypatch.chdir(shared_cwd)
    out = shared_cwd / f"pdd_{base}_{weighting}"
    code = main(["distill", "--method", "pdd", "--pdd-base", base, "--stages", "2", "--dataset", "digits", "--ipc", "2",
                 "--preset", "smoke", "--weighting", weighting, "--noise", "0.4", "--seed", "1", "--out", str(out),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["pdd"]["base"] == base and summary["method"]["pdd"]["ipc_per_stage"] == 1
    assert len(summary["accuracy"]["stages"]) == 2 and len(summary["init_accuracy"]["stages"]) == 2
    assert summary["accuracy"]["mean"] == summary["accuracy"]["stages"][-1]["mean"]
    weighted = (out / "weights.safetensors").is_file()
    assert weighted == (weighting == "iwd") or (weighting == "auto" and "noise_estimate" in summary)
    if base == "mtt":
        facts = summary["method"]["pdd"]["stage_facts"]
        assert facts[1]["experts"]["weighted"] == (weighting != "none" and weighted)
    # iwd-fast evaluate trains through the stages as the run did, and reproduces its accuracy
    assert main(["evaluate", str(out), "--quiet"]) == 0
    again = json.loads((out / "evaluation.json").read_text())
    assert again["accs"] == summary["accuracy"]["accs"] and len(again["stages"]) == 2
    assert main(["distill", "--method", "dc", "--stages", "2", "--preset", "smoke", "--quiet"]) == 2  # refused


def test_pdd_bench_cells_take_their_base_from_the_spec(tmp_path):
    from iwd_fast.app.bench_spec import expand_cells

    spec = {"preset": "paper", "methods": ["pdd"], "datasets": ["cifar10"], "ipc": [10],
            "variants": {"mtt": {"pdd": {"base": "mtt"}}, "idc": {"pdd": {"base": "idc"}}}}
    cells = {c.variant: c.config for c in expand_cells(spec)}
    assert cells["idc"].pdd.base == "idc" and cells["idc"].lr_img == preset_config("paper", "pdd", "cifar10", 10,
                                                                                     base="idc").lr_img
    assert cells["mtt"].tm.syn_steps == 50 and cells["idc"].idc.inner_loop == 100
