"""Presets scaled to a dataset of one's own (iwd_fast.app.scaling): the field's depth rule, the IPC rule, and
data shaped like a built-in dataset getting exactly the built-in preset's config."""
import dataclasses

import pytest
import torch

from iwd_fast.app.presets import preset_config
from iwd_fast.app.scaling import auto_ipc, field_depth, scaled_config
from iwd_fast.data.user_data import UserDataSpec, user_data_from_tensors


def like(n_train, n_test, channels, side, classes=10, **spec):
    """A dataset of one's own with the built-in one's sizes (pixels do not matter for scaling)."""
    def part(n):
        return torch.zeros(n, channels, side, side, dtype=torch.uint8), torch.arange(n) % classes
    return user_data_from_tensors(*part(n_train), test=part(n_test) if n_test else None, spec=UserDataSpec(**spec))


def test_depth_follows_the_fields_networks_for_the_image_side():
    # 3 blocks at 28-32 px (MNIST, CIFAR), 4 at 64 (Tiny ImageNet), 5 at 128 (ImageNet subsets); 2 on 8x8 digits
    assert {s: field_depth(s) for s in (4, 8, 16, 28, 32, 64, 128, 256)} == \
        {4: 1, 8: 2, 16: 2, 28: 3, 32: 3, 64: 4, 128: 5, 256: 6}
    with pytest.raises(ValueError, match="too small"):
        field_depth(1)


def test_ipc_is_ten_while_it_is_a_tenth_of_the_smallest_class():
    assert (auto_ipc(99), auto_ipc(100), auto_ipc(6000)) == (1, 10, 10)
    data = like(300, 0, 1, 8, classes=3)  # 100 per class, a 20% test split leaves 80
    cfg, notes = scaled_config("cpu", "dc", "mine", data)
    assert cfg.ipc == 1 and (cfg.outer_loop, cfg.inner_loop) == (1, 1) and "smallest class '0' has 80" in notes[0]
    cfg, _ = scaled_config("cpu", "dc", "mine", like(400, 0, 1, 8, classes=3))
    assert cfg.ipc == 10 and (cfg.outer_loop, cfg.inner_loop) == (5, 10)


@pytest.fixture(scope="module")
def builtin_shaped():
    return [("cpu", "fashion-mnist", like(60000, 10000, 1, 28)), ("cpu", "digits", like(1437, 360, 1, 8)),
            ("paper", "cifar10", like(50000, 10000, 3, 32))]


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "mtt", "idc"])
def test_data_shaped_like_a_builtin_dataset_gets_the_builtin_presets_config(builtin_shaped, method):
    cases = builtin_shaped
    for preset, name, data in cases:
        if preset == "paper" and method == "idc":
            continue
        cfg, notes = scaled_config(preset, method, "mine", data, ipc=10)
        assert dataclasses.replace(cfg, dataset=name) == preset_config(preset, method, name, 10), (preset, name)
    fashion = cases[0][2]
    _, notes = scaled_config("cpu", "dc", "mine", fashion, ipc=10)
    assert notes[0].startswith("train_size 10000") and notes[1].startswith("test_size 2000")


def test_larger_images_get_deeper_networks_and_given_options_stay():
    cfg, notes = scaled_config("paper", "dc", "mine", like(2000, 0, 3, 64, classes=20))
    assert cfg.net.depth == 4 and cfg.train_size == 0 and any("ConvNet depth 4 for 64x64" in n for n in notes)
    cfg, notes = scaled_config("cpu", "dc", "mine", like(60000, 0, 1, 28), fixed={"train_size", "test_size", "net"})
    assert cfg.train_size == 0 and cfg.test_size == 0 and not any(n.startswith("train_size") for n in notes)
    with pytest.raises(ValueError, match=r"'0' \(label 0\) has 80, .* every class needs at least 90 \(ipc=90\)"):
        scaled_config("cpu", "dc", "mine", like(300, 0, 1, 8, classes=3), ipc=90)
