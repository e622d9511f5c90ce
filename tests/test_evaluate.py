"""Tests for iwd_fast.evaluate: the evaluation protocol on tiny sets (seconds on a CPU)."""
import math

import pytest
import torch
import torch.nn as nn

from iwd_fast import evaluate as ev
from iwd_fast.distill.config import EvalSpec, NetSpec
from iwd_fast.data import from_tensors

NET = NetSpec(name="convnet", width=8, depth=3, norm="instancenorm")
SPEC = EvalSpec(num_nets=1, epochs=2, batch_size=8, dsa=True)


def _sets(n_syn=20, n_test=60):
    g = torch.Generator().manual_seed(123)
    syn_x = torch.randn(n_syn, 1, 8, 8, generator=g)
    syn_y = torch.arange(n_syn) % 10
    test = from_tensors(torch.randn(n_test, 1, 8, 8, generator=g), torch.arange(n_test) % 10, "digits", 10,
                        normalize=False)
    return syn_x, syn_y, test


def _run(seed, spec=SPEC, strategy="color_crop_cutout_scale_rotate"):
    x, y, test = _sets()
    return ev.evaluate_synthetic(x, y, test, spec, NET, seed=seed, dsa_strategy=strategy, device="cpu",
                                 progress=False)


def test_evaluate_runs_and_reports_protocol():
    res = _run(0)
    assert len(res["accs"]) == 1 and res["seeds"] == [0]
    for key in ("mean", "std"):
        assert math.isfinite(res[key])
    assert 0.0 <= res["mean"] <= 1.0 and res["std"] == 0.0
    assert res["std_kind"].startswith("population")
    proto = res["protocol"]
    assert proto["epochs"] == 2 and proto["num_nets"] == 1 and proto["dsa"] is True
    assert proto["reported"] == "final epoch"
    assert proto["variant"].startswith("reduced budget") and "2 epochs" in proto["variant"]


def test_evaluate_is_bit_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first, second = _run(7), _run(7)
    assert torch.equal(state, torch.get_rng_state())
    assert first["accs"] == second["accs"]


def test_population_std_over_nets():
    res = _run(3, spec=EvalSpec(num_nets=3, epochs=1, batch_size=8, dsa=False))
    accs = torch.tensor(res["accs"], dtype=torch.float64)
    assert res["seeds"] == [3000, 3001, 3002]
    assert res["mean"] == pytest.approx(float(accs.mean()))
    assert res["std"] == pytest.approx(float(accs.std(unbiased=False)))


def _trained_weights(seed, spec=SPEC, strategy="color_crop_cutout_scale_rotate", **kw):
    x, y, test = _sets()
    net = ev.build_eval_network(NET, 1, 10, (8, 8), seed)
    stats = ev.train_network(net, x, y, spec, seed, strategy, "cpu", **kw)
    return torch.cat([p.detach().flatten() for p in net.parameters()]), stats


def test_train_network_reproducible_and_seed_dependent():
    w0, stats = _trained_weights(5)
    w0_again, _ = _trained_weights(5)
    w1, _ = _trained_weights(6)
    assert torch.equal(w0, w0_again)
    assert not torch.equal(w0, w1)
    assert stats["steps"] == 2 * 3  # 20 images, batch 8 -> 3 steps per epoch
    assert math.isfinite(stats["loss"])


def test_dsa_and_steps_change_training():
    with_dsa, _ = _trained_weights(5)
    without, _ = _trained_weights(5, strategy=None)
    no_flag, _ = _trained_weights(5, spec=EvalSpec(num_nets=1, epochs=2, batch_size=8, dsa=False))
    assert not torch.equal(with_dsa, without)
    assert torch.equal(without, no_flag)  # spec.dsa=False ignores the strategy
    _, stats = _trained_weights(5, steps=4)
    assert stats["steps"] == 4


def test_build_eval_network_depends_on_seed_only():
    a = ev.build_eval_network(NET, 1, 10, (8, 8), 11)
    torch.manual_seed(999)
    b = ev.build_eval_network(NET, 1, 10, (8, 8), 11)
    c = ev.build_eval_network(NET, 1, 10, (8, 8), 12)
    pa, pb, pc = (torch.cat([p.flatten() for p in n.parameters()]) for n in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


class _ArgmaxOfPixels(nn.Module):
    """Logits = the 4 pixels of a [B, 1, 1, 4] image, so the prediction is the brightest pixel."""

    def forward(self, x):
        return x.flatten(1)


def test_test_accuracy_on_known_predictions():
    preds = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    x = torch.nn.functional.one_hot(preds, 4).float().view(7, 1, 1, 4)
    labels = torch.tensor([0, 1, 2, 0, 0, 3, 2])  # 5 of 7 right
    net = _ArgmaxOfPixels().train()
    test = from_tensors(x, labels, "toy", 4, normalize=False)
    assert ev.test_accuracy(net, test, batch=3, device="cpu") == pytest.approx(5 / 7)
    assert ev.test_accuracy(net, (x, preds), batch=1024, device="cpu") == 1.0
    assert net.training  # mode restored


def test_auto_strategy_and_field_variant():
    res = _run(0, strategy="auto")
    assert res["protocol"]["dsa_strategy"] == "color_crop_cutout_scale_rotate"  # digits: no flip
    field = NetSpec()
    assert ev.describe_protocol(EvalSpec(epochs=300, dsa=False), field, False).startswith("field")
    assert ev.describe_protocol(EvalSpec(epochs=1000), field, True).startswith("field")
    assert not ev.describe_protocol(EvalSpec(epochs=300), field, True).startswith("field")


def test_bad_inputs_raise():
    x, y, test = _sets()
    with pytest.raises(ValueError, match="do not match"):
        ev.evaluate_synthetic(x[:, :, :4], y, test, SPEC, NET, seed=0, dsa_strategy=None, progress=False)
    with pytest.raises(ValueError, match="labels must lie"):
        ev.evaluate_synthetic(x, y + 10, test, SPEC, NET, seed=0, dsa_strategy=None, progress=False)
    with pytest.raises(ValueError, match="labels must be"):
        ev.evaluate_synthetic(x, y[:5], test, SPEC, NET, seed=0, dsa_strategy=None, progress=False)
    with pytest.raises(ValueError, match="num_nets"):
        ev.evaluate_synthetic(x, y, test, EvalSpec(num_nets=0), NET, seed=0, dsa_strategy=None, progress=False)
