"""Tests for iwd_fast.presets: every preset builds a valid config; "paper" is METHOD.md section 5."""
import pytest

from iwd_fast.distill.config import DistillConfig
from iwd_fast.app.presets import (FIELD_LOOPS, METHODS, PRESETS, describe_preset, list_presets, loops_for_ipc,
                              preset_config)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_every_preset_builds_a_valid_config(name, method, ipc):
    cfg = preset_config(name, method, "fashion-mnist", ipc)
    assert isinstance(cfg, DistillConfig)
    assert (cfg.method, cfg.dataset, cfg.ipc, cfg.preset) == (method, "fashion-mnist", ipc, name)
    assert cfg.iterations >= 1 and cfg.outer_loop >= 1 and cfg.inner_loop >= 1 and cfg.batch_real >= 1
    assert cfg.eval.num_nets >= 1 and cfg.eval.epochs >= 1 and cfg.lr_img > 0
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg  # serialisable round trip


@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (50, (50, 10))])
@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_paper_gradient_matching_matches_science(method, ipc, loops):
    cfg = preset_config("paper", method, "cifar10", ipc)
    assert (cfg.outer_loop, cfg.inner_loop) == loops
    assert (cfg.lr_img, cfg.lr_net, cfg.batch_real, cfg.iterations) == (0.1, 0.01, 256, 1000)
    assert (cfg.net.name, cfg.net.depth, cfg.net.width, cfg.net.norm) == ("convnet", 3, 128, "instancenorm")
    assert cfg.eval.num_nets == 20 and cfg.eval.batch_size == 256  # main.py num_eval: 20 networks
    assert (cfg.eval.lr, cfg.eval.momentum, cfg.eval.weight_decay) == (0.01, 0.9, 5e-4)
    # 1000 epochs with DSA augmentation, 300 without
    assert (cfg.eval.dsa, cfg.eval.epochs) == ((True, 1000) if method == "dsa" else (False, 300))


def test_paper_dm_matches_science():
    cfg = preset_config("paper", "dm", "cifar10", 10)
    assert (cfg.lr_img, cfg.iterations) == (1.0, 20000)
    assert (cfg.eval.dsa, cfg.eval.epochs, cfg.eval.num_nets) == (True, 1000, 5)


def test_paper_rejects_ipc_without_field_loops():
    assert loops_for_ipc("paper", 20) == FIELD_LOOPS[20] == (20, 25)
    with pytest.raises(ValueError, match="IPC"):
        preset_config("paper", "dc", "cifar10", 7)


def test_reduced_presets_are_smaller_and_say_so():
    paper = preset_config("paper", "dc", "fashion-mnist", 10)
    for name in ("cpu", "demo", "smoke"):
        cfg = preset_config(name, "dc", "fashion-mnist", 10)
        assert cfg.net.width < paper.net.width and cfg.iterations < paper.iterations
        assert cfg.eval.epochs <= paper.eval.epochs and cfg.eval.num_nets <= paper.eval.num_nets
        assert "not the field" in describe_preset(name) or name == "smoke"
    assert "reduced CPU budget" in describe_preset("cpu")
    cpu_dm = preset_config("cpu", "dm", "fashion-mnist", 10)
    assert cpu_dm.lr_img == 10.0 and cpu_dm.iterations > preset_config("cpu", "dc", "fashion-mnist", 10).iterations
    assert preset_config("cpu", "dc", "fashion-mnist", 10).eval.num_nets >= 5  # enough networks for headline rows
    assert loops_for_ipc("cpu", 20) == loops_for_ipc("cpu", 10)  # nearest tabulated IPC


def test_smoke_preset_numbers():
    cfg = preset_config("smoke", "dsa", "digits", 1)
    assert (cfg.iterations, cfg.outer_loop, cfg.inner_loop, cfg.batch_real) == (2, 1, 1, 16)
    assert cfg.net.width == 8 and (cfg.eval.num_nets, cfg.eval.epochs) == (1, 2)


def test_presets_do_not_share_mutable_state():
    a = preset_config("paper", "dc", "cifar10", 10)
    a.net.width = 3
    a.eval.epochs = 1
    b = preset_config("paper", "dc", "cifar10", 10)
    assert b.net.width == 128 and b.eval.epochs == 300 and PRESETS["paper"]["all"]["net"]["width"] == 128


def test_errors_name_the_valid_choices():
    assert list_presets() == ["paper", "cpu", "demo", "smoke"]
    with pytest.raises(ValueError, match="valid presets: paper, cpu, demo, smoke"):
        preset_config("huge", "dc", "digits", 10)
    with pytest.raises(ValueError, match="valid methods"):
        preset_config("cpu", "magic", "digits", 10)
    with pytest.raises(ValueError, match="positive integer"):
        preset_config("cpu", "dc", "digits", 0)


def test_networks_fit_the_image_size():
    """No preset pools 8x8 digits down to 1x1: two 2x2 pools leave 2x2 features."""
    from iwd_fast.networks import build_network

    for name in ("cpu", "demo"):
        cfg = preset_config(name, "dc", "digits", 10)
        net = build_network(cfg.net.name, 1, 10, (8, 8), width=cfg.net.width, depth=cfg.net.depth, norm=cfg.net.norm)
        assert net.feature_shape[1:] == (2, 2), (name, net.feature_shape)
    assert preset_config("cpu", "dc", "fashion-mnist", 10).train_size == 10000
