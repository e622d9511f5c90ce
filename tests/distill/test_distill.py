"""Distillers on tiny budgets: every method x target runs, weighting semantics, reproducibility, resume."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from iwd_fast.distill.config import DistillConfig, IWDSpec, NetSpec
from iwd_fast.data import DatasetSplits
from iwd_fast.app.distill_job import evaluate_images, run_distillation, subset_splits
from iwd_fast.distill.gradient_matching import layerwise_distance
from iwd_fast.weighting.dropin import weighted_cross_entropy
from iwd_fast.networks import build_network
from iwd_fast.app.presets import preset_config
from iwd_fast.scoring.oracle import per_sample_grads
from iwd_fast.weighting.targets import jvp_exact, jvp_fd, matching_direction


def smoke(method, **changes):
    cfg = preset_config("smoke", method, "digits", 2)
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
@pytest.mark.parametrize("influence", ["none", "explicit", "implicit", "validation", "self"])
def test_every_method_and_target_runs(tiny_splits, method, influence):
    weighting = "none" if influence == "none" else "iwd"
    iwd = IWDSpec(influence="validation" if influence == "none" else influence, init="weighted", warmup_steps=2)
    cfg = smoke(method, weighting=weighting, iwd=iwd, noise=0.25)
    out = run_distillation(cfg, tiny_splits, progress=False)
    start = initial_images(cfg, tiny_splits)
    assert out["synthetic"]["images"].shape == start.shape == (4 * 2, 1, 8, 8)
    assert torch.isfinite(out["synthetic"]["images"]).all()
    assert (out["synthetic"]["images"] - start).abs().amax(dim=(1, 2, 3)).gt(0).all()  # every image was distilled
    # the reported accuracy is what an evaluation of the returned images with the run's networks gives
    ev = evaluate_images(cfg, out["synthetic"]["images"], out["synthetic"]["labels"],
                         subset_splits(tiny_splits, cfg).test, torch.device("cpu"))
    assert ev["accs"] == out["accuracy"]["accs"]
    if weighting == "iwd":
        w = out["weights"]
        assert out["scored_fraction"] > 0
        for c in range(4):  # the weighter's invariant survives a real loop
            members = torch.nonzero(out_labels(cfg, tiny_splits) == c).flatten()
            assert abs(float(w[members].mean()) - 1.0) < 1e-5
        assert 0.0 <= out["weight_on_flipped"] <= 1.0
        assert out["timing_seconds"]["scoring"] > 0
    else:
        assert out["weights"] is None


def initial_images(cfg, splits):
    """The real images [C * ipc, ...] a run of ``cfg`` starts its synthetic set from."""
    from iwd_fast.distill.pool import initial_indices, prepare_pool
    from iwd_fast.distill.warmup import warmup_weights
    from iwd_fast.distill.config import needs_warmup
    from iwd_fast.runtime import PhaseTimer

    pool = prepare_pool(cfg, subset_splits(splits, cfg), torch.device("cpu"))
    warmup = warmup_weights(cfg, pool, torch.device("cpu"), PhaseTimer()) if needs_warmup(cfg) else None
    return pool.images[initial_indices(cfg, pool, warmup)["indices"]]


def out_labels(cfg, splits):
    from iwd_fast.distill.pool import prepare_pool

    return prepare_pool(cfg, splits, torch.device("cpu")).labels


def test_weighted_real_loss_gradient_is_weighted_mean_of_per_sample_gradients():
    torch.manual_seed(0)
    net = build_network("convnet", 1, 4, (8, 8), width=6, depth=2).double()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    w = torch.rand(7, dtype=torch.float64) + 0.05
    params = list(net.parameters())
    got = torch.autograd.grad(weighted_cross_entropy(net(x), y, w), params)
    names = [n for n, _ in net.named_parameters()]
    per = per_sample_grads(net, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"), names)
    wn = w / w.sum()
    for name, g in zip(names, got):
        expected = (wn.reshape(-1, *[1] * (per[name].dim() - 1)) * per[name]).sum(0)
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_implicit_jvp_finite_difference_matches_autodiff():
    """J_v(u) of the DC matching direction: central difference vs exact double backward (METHOD.md 2b)."""
    torch.manual_seed(1)
    net = build_network("convnet", 1, 3, (8, 8), width=5, depth=2).double()
    params = list(net.parameters())
    x_real = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y_real = torch.tensor([0, 0, 1, 1, 2, 2])
    g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)]
    y_syn = torch.tensor([1, 1])
    s = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    u = torch.randn_like(s)

    def v_of(s_new, create_graph):
        gs = torch.autograd.grad(F.cross_entropy(net(s_new), y_syn), params, create_graph=True)
        return matching_direction(lambda gr: layerwise_distance(gs, gr), g_real, create_graph)[1]

    exact = jvp_exact(v_of, s, u)
    approx = jvp_fd(v_of, s, u, rel_step=1e-4)
    scale = max(t.abs().max().item() for t in exact)
    assert scale > 0
    for a, b in zip(approx, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_run_is_bit_reproducible_and_resumes_bit_for_bit(tiny_splits, tmp_path):
    cfg = smoke("dsa", weighting="iwd", iterations=4, noise=0.25,
                iwd=IWDSpec(influence="validation", init="weighted", warmup_steps=2))
    a = run_distillation(cfg, tiny_splits, progress=False)
    b = run_distillation(cfg, tiny_splits, progress=False)
    assert torch.equal(a["synthetic"]["images"], b["synthetic"]["images"])
    assert torch.equal(a["weights"], b["weights"])
    assert a["accuracy"]["accs"] == b["accuracy"]["accs"]
    other = run_distillation(dataclasses.replace(cfg, seed=1), tiny_splits, progress=False)
    assert not torch.equal(a["synthetic"]["images"], other["synthetic"]["images"])
    # Interrupted after 2 iterations, then resumed from the run folder's checkpoint.
    stopped = run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "run"), progress=False, until=2)
    assert stopped == {"stopped_at": 2}
    resumed = run_distillation(cfg, tiny_splits, out_dir=str(tmp_path / "run"), progress=False)
    assert torch.equal(resumed["synthetic"]["images"], a["synthetic"]["images"])
    assert torch.equal(resumed["weights"], a["weights"])
    for name in ("config.json", "env.json", "metrics.jsonl", "synthetic.safetensors", "weights.safetensors",
                 "summary.json", "timing.json", "synthetic.png", "weights_hist.png", "extreme_weights.png",
                 "accuracy.png"):
        assert (tmp_path / "run" / name).is_file(), name
    with pytest.raises(ValueError, match="different config"):
        run_distillation(dataclasses.replace(cfg, seed=5), tiny_splits, out_dir=str(tmp_path / "run"),
                         progress=False, until=1)


def test_weighted_init_avoids_flipped_labels(tiny_splits):
    """With 40% noise, self-influence at a warmed-up network picks clean initial images more often than chance
    (a network that fits the clean majority: width 16, lr 0.1, 200 steps; fixed seed)."""
    base = smoke("dc", noise=0.4, ipc=4, iterations=1, weighting="iwd", lr_net=0.1, net=NetSpec(width=16))
    iwd = IWDSpec(influence="self", init="weighted", warmup_steps=200)
    weighted = run_distillation(dataclasses.replace(base, iwd=iwd), tiny_splits, progress=False, evaluate=False)
    random_init = run_distillation(dataclasses.replace(base, weighting="none", iwd=IWDSpec(init="random")),
                                   tiny_splits, progress=False, evaluate=False)
    assert random_init["init_flipped_share"] >= 0.2
    assert weighted["init_flipped_share"] < random_init["init_flipped_share"]
    assert weighted["warmup_auroc_flipped"] > 0.75


def test_bad_config_errors(tiny_splits):
    with pytest.raises(ValueError, match="unknown method"):
        run_distillation(smoke("dc").replace(method="magic"), tiny_splits, progress=False)
    with pytest.raises(ValueError, match="unknown influence target"):
        run_distillation(smoke("dc", weighting="iwd", iwd=IWDSpec(influence="magic")), tiny_splits, progress=False)
    with pytest.raises(ValueError, match="held-out"):
        run_distillation(smoke("dc", weighting="iwd", iwd=IWDSpec(influence="validation", heldout_fraction=0.0)),
                         tiny_splits, progress=False)
    assert DistillConfig.from_dict(smoke("dm").to_dict()) == smoke("dm")
    with pytest.raises(ValueError, match="unknown config keys"):
        DistillConfig.from_dict({"methd": "dc"})


# ------------------------------------------------------------------ weighting modes, init, bad input, reruns
def test_selection_alone_static_weights_and_in_loop_are_distinct_runs(tiny_splits):
    base = smoke("dc", noise=0.4, ipc=4, iterations=2, lr_net=0.1, net=NetSpec(width=16))
    spec = IWDSpec(influence="validation", warmup_steps=100)
    random_none = run_distillation(dataclasses.replace(base, weighting="none", iwd=dataclasses.replace(spec, init="random")),
                                   tiny_splits, progress=False, evaluate=False)
    weighted_none = run_distillation(dataclasses.replace(base, weighting="none", iwd=dataclasses.replace(spec, init="weighted")),
                                     tiny_splits, progress=False, evaluate=False)
    static = run_distillation(dataclasses.replace(base, weighting="static", iwd=dataclasses.replace(spec, init="weighted")),
                              tiny_splits, progress=False, evaluate=False)
    assert weighted_none["init"].startswith("weighted") and random_none["init"] == "random"
    assert weighted_none["init_flipped_share"] < random_none["init_flipped_share"]  # the ablation now exists
    assert weighted_none["weights"] is None
    # static: the warm-up weights, never rescored in the loop, meaning what they did at the start
    assert static["scored_fraction"] == 1.0 and "scoring" not in static["timing_seconds"]
    assert static["weight_on_flipped"] < static["flipped_share"]
    assert not torch.equal(static["synthetic"]["images"], weighted_none["synthetic"]["images"])


@pytest.mark.parametrize("influence,transform", [("validation", "rank"), ("explicit", "zscore"), ("self", "rank")])
def test_a_cold_temperature_runs_to_the_end(tiny_splits, influence, transform):
    """A softmax at temperature 0.01 underflows to exact zero weights; scores must not divide by them."""
    iwd = IWDSpec(influence=influence, temperature=0.01, transform=transform, refresh=1, init="random")
    cfg = smoke("dc", noise=0.25, iterations=3, weighting="iwd", iwd=iwd)
    out = run_distillation(cfg, tiny_splits, progress=False, evaluate=False)
    assert torch.isfinite(out["synthetic"]["images"]).all()
    assert float(out["weights"].min()) == 0.0  # the case that crashed: exact zeros in the loop's weights


def test_non_finite_pixels_are_named_before_any_work(tiny_splits, tmp_path):
    bad = dataclasses.replace(tiny_splits.train, images=tiny_splits.train.images.clone())
    bad.images[5, 0, 2, 3] = float("nan")
    bad.images[17, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite .* at indices \[5, 17\]"):
        run_distillation(smoke("dc"), DatasetSplits(train=bad, test=tiny_splits.test), out_dir=str(tmp_path / "r"),
                         progress=False)
    assert not (tmp_path / "r").exists()  # nothing written


def test_bad_config_is_refused_before_anything_is_written(tiny_splits, tmp_path):
    for changes, message in (({"noise": 1.5}, "noise must be a rate"), ({"weighting": "magic"}, "weighting must"),
                             ({"iwd": IWDSpec(init="best")}, "iwd.init")):
        with pytest.raises(ValueError, match=message):
            run_distillation(smoke("dc", **changes), tiny_splits, out_dir=str(tmp_path / "r"), progress=False)
        assert not (tmp_path / "r").exists()


def test_a_finished_run_is_never_repeated_and_a_resume_logs_each_iteration_once(tiny_splits, tmp_path):
    cfg = smoke("dc", iterations=4, weighting="iwd", iwd=IWDSpec(influence="validation", init="random", refresh=1))
    out = str(tmp_path / "run")
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, until=3, checkpoint_every=2)
    # a kill after iteration 3 was logged but before its checkpoint: the resume recomputes it once
    first = run_distillation(cfg, tiny_splits, out_dir=out, progress=False)
    log = [json_line["iteration"] for json_line in _read_log(tmp_path / "run")]
    assert log == [1, 2, 3, 4]
    again = run_distillation(cfg, tiny_splits, out_dir=out, progress=False)
    assert again["already_complete"] and again["accuracy"] == json.loads(json.dumps(first["accuracy"]))
    assert [r["iteration"] for r in _read_log(tmp_path / "run")] == [1, 2, 3, 4]
    assert first["init_accuracy"]["mean"] >= 0 and "gain_over_init" in first


def _read_log(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_an_intermediate_evaluation_equals_the_final_one_of_a_run_stopped_there(tiny_splits, tmp_path):
    """--eval-every: the accuracy logged after iteration 1 of a 2-iteration run is exactly the final
    accuracy of the same run with 1 iteration (same synthetic set, same evaluation networks)."""
    run_distillation(smoke("dc", iterations=2, eval_every=1), tiny_splits, out_dir=str(tmp_path / "two"), progress=False)
    one = run_distillation(smoke("dc", iterations=1), tiny_splits, progress=False)
    log = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in log if r.get("iteration") == 1 and "acc_mean" in r]
    assert len(logged) == 1
    assert logged[0]["acc_mean"] == one["accuracy"]["mean"]


# ------------------------------------------------------------------ weighting "auto" and the pool-cleaning baselines
def _auto(noise, **iwd):
    """DC on the tiny problem with networks that learn it (width 16, lr 0.1): the cross-fit sees real structure."""
    spec = IWDSpec(crossfit_steps=60, crossfit_lr=0.1, warmup_steps=60, **iwd)
    return smoke("dc", noise=noise, ipc=4, iterations=2, lr_net=0.1, net=NetSpec(width=16), iwd=spec)


def test_auto_weighting_on_clean_labels_is_exactly_the_unweighted_run(tiny_splits):
    plain = run_distillation(_auto(0.0).replace(weighting="none"), tiny_splits, progress=False, evaluate=False)
    auto = run_distillation(_auto(0.0).replace(weighting="auto"), tiny_splits, progress=False, evaluate=False)
    assert auto["noise_estimate"]["suspects"] == 0 and auto["noise_estimate"]["estimated_rate"] == 0.0
    assert auto["weights"] is None
    assert torch.equal(auto["synthetic"]["images"], plain["synthetic"]["images"])


def test_auto_weighting_drops_the_suspects_it_estimates_under_noise(tiny_splits):
    plain = run_distillation(_auto(0.4).replace(weighting="none"), tiny_splits, progress=False, evaluate=False)
    auto = run_distillation(_auto(0.4).replace(weighting="auto"), tiny_splits, progress=False, evaluate=False)
    est, share = auto["noise_estimate"], auto["flipped_share"]
    assert abs(est["estimated_rate"] - share) < 0.1  # the strength follows the data's own noise rate
    assert auto["weight_on_flipped"] < 0.25 * share
    assert float(auto["weights"].min()) == 0.0 and auto["init"].startswith("trusted")
    assert auto["init_flipped_share"] < 0.5 * plain["init_flipped_share"]


def test_prune_and_relabel_baselines_change_the_pool_as_described(tiny_splits):
    pruned = run_distillation(_auto(0.4, pool_cleaning="prune", prune_fraction=0.3, init="random"), tiny_splits,
                              progress=False, evaluate=False)
    assert pruned["pool_size"] == 4 * round(0.7 * 36)  # 40 per class, 10% held out: 36, 30% of each class dropped
    assert pruned["weights"] is None and pruned["init"] == "random"
    plain = run_distillation(_auto(0.4).replace(weighting="none"), tiny_splits, progress=False, evaluate=False)
    assert pruned["flipped_share"] < plain["flipped_share"]
    relabelled = run_distillation(_auto(0.4, pool_cleaning="relabel", init="random"), tiny_splits, progress=False,
                                  evaluate=False)
    assert relabelled["pool_size"] == 4 * 36
    assert relabelled["flipped_share"] < 0.75 * plain["flipped_share"]  # it fixes far more labels than it breaks
    with pytest.raises(ValueError, match="baseline that distils the cleaned pool unweighted"):
        run_distillation(_auto(0.4, pool_cleaning="prune").replace(weighting="auto"), tiny_splits, progress=False)


def test_dm_prototype_target_moves_weight_off_flipped_labels(tiny_splits):
    iwd = IWDSpec(influence="prototype", refresh=1, init="random", temperature=0.5)
    cfg = smoke("dm", noise=0.4, iterations=24, weighting="iwd", iwd=iwd, net=NetSpec(width=16))
    out = run_distillation(cfg, tiny_splits, progress=False, evaluate=False)
    assert out["scored_fraction"] == 1.0  # the EMA over 24 random networks
    assert out["auroc_flipped"] > 0.9 and out["weight_on_flipped"] < 0.25 * out["flipped_share"]
    with pytest.raises(ValueError, match="method dm only"):
        run_distillation(smoke("dc", weighting="iwd", iwd=iwd), tiny_splits, progress=False)
