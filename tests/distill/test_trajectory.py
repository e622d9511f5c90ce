"""Trajectory matching on tiny budgets: the expert buffer (round trip, key separation, resume after a
kill), the weighted expert loss, scores along checkpoints against an explicit float64 loop, the inner
unroll against finite differences, and DATM's window, soft labels and initial selection."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from iwd_fast.distill.config import TrajectorySpec
from iwd_fast.distill.trajectory.buffer import ExpertBuffer, buffer_key
from iwd_fast.distill.trajectory.checkpoint_scores import checkpoint_scores
from iwd_fast.distill.trajectory.datm import DATM, correct_initial_indices
from iwd_fast.distill.trajectory.experts import expert_description, train_expert
from iwd_fast.distill.trajectory.student import FlatNet, matching_loss, soft_cross_entropy, unroll
from iwd_fast.networks import NetSpec, build_network
from iwd_fast.weighting.dropin import weighted_cross_entropy

ROOT = Path(__file__).resolve().parents[2]


def tiny_pool(n=24, classes=3, size=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(n // classes)
    x = torch.randn(n, 1, size, size, generator=g, dtype=dtype)
    for c in range(classes):
        x[y == c, :, c:c + 2, :] += 1.5
    return x, y


def make_net(dtype=torch.float32, width=3):
    def build(seed):
        torch.manual_seed(seed)
        return build_network("convnet", 1, 3, (6, 6), width=width, depth=1, norm="instancenorm").to(dtype)
    return build


def spec(**changes):
    base = dict(num_experts=1, train_epochs=3, expert_lr=0.05, expert_batch=8, expert_dsa=False, expert_seed=4)
    return TrajectorySpec(**{**base, **changes})


def describe(x, y, weights=None, flipped=None, **spec_changes):
    layout = FlatNet(make_net()(0)).layout
    return expert_description(x, y, 3, torch.zeros(len(y), dtype=torch.bool) if flipped is None else flipped,
                              weights, spec(**spec_changes), NetSpec(width=3, depth=1), None, layout)


# --------------------------------------------------------------------------------------------- buffer

def test_buffer_round_trip(tmp_path):
    x, y = tiny_pool()
    buf = ExpertBuffer(tmp_path, describe(x, y))
    thetas = [torch.randn(17) for _ in range(4)]
    for k, t in enumerate(thetas):
        buf.save_epoch(2, k, t, {"shuffle": torch.Generator().get_state()})
    assert buf.finished() == [] and buf.resume_point(2)["epoch"] == 3
    buf.finish(2, 3)
    assert buf.finished() == [2] and buf.resume_point(2) is None and buf.num_epochs(2) == 4
    for k, t in enumerate(thetas):
        assert torch.equal(buf.snapshot(2, k), t)
    assert torch.equal(buf.trajectory(2), torch.stack(thetas))
    again = ExpertBuffer(tmp_path, describe(x, y))  # the same description reopens the same folder
    assert again.path == buf.path and again.finished() == [2]
    with pytest.raises(ValueError, match="no epoch 9"):
        buf.snapshot(2, 9)
    with pytest.raises(ValueError, match="not finished"):
        buf.snapshot(0, 0)


def test_buffer_keys_separate_weights_labels_noise_images_and_recipe(tmp_path):
    x, y = tiny_pool()
    noisy = y.clone()
    noisy[0] = 2
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[0] = True
    w = torch.rand(len(y)) + 0.5
    keys = {
        "base": buffer_key(describe(x, y)),
        "weighted": buffer_key(describe(x, y, weights=w)),
        "other weights": buffer_key(describe(x, y, weights=w * 1.01)),
        "noisy labels": buffer_key(describe(x, noisy, flipped=flipped)),
        "flip record": buffer_key(describe(x, y, flipped=flipped)),
        "images": buffer_key(describe(x + 1e-3, y)),
        "expert lr": buffer_key(describe(x, y, expert_lr=0.02)),
        "epochs": buffer_key(describe(x, y, train_epochs=4)),
        "seed": buffer_key(describe(x, y, expert_seed=5)),
        "zca": buffer_key(describe(x, y, zca=True)),
    }
    assert len(set(keys.values())) == len(keys), keys
    # What does not change the experts does not change the key: their number, the distillation knobs.
    assert buffer_key(describe(x, y, num_experts=7, syn_steps=3, max_start_epoch=2)) == keys["base"]
    assert buffer_key(describe(x, y, weights=None)) == keys["base"]
    buf = ExpertBuffer(tmp_path, describe(x, y))
    (buf.path / "key.json").write_text('{"description": {"edited": true}}')
    with pytest.raises(ValueError, match="another description"):
        ExpertBuffer(tmp_path, describe(x, y))


def test_expert_resumes_bit_for_bit_after_an_interruption(tmp_path):
    x, y = tiny_pool()
    s = spec(train_epochs=4, expert_momentum=0.9, expert_weight_decay=1e-3, expert_dsa=True)
    w = torch.rand(len(y)) + 0.1
    dsa = "color_crop_cutout"
    full = ExpertBuffer(tmp_path / "a", describe(x, y, weights=w))
    train_expert(full, 0, make_net(), x, y, w, s, dsa)

    class Stop(Exception):
        pass

    def stop_at(epoch):
        if epoch == 2:
            raise Stop

    cut = ExpertBuffer(tmp_path / "b", describe(x, y, weights=w))
    with pytest.raises(Stop):
        train_expert(cut, 0, make_net(), x, y, w, s, dsa, after_epoch=stop_at)
    assert cut.finished() == [] and cut.resume_point(0)["epoch"] == 2
    train_expert(cut, 0, make_net(), x, y, w, s, dsa)
    assert cut.finished() == [0]
    assert torch.equal(cut.trajectory(0), full.trajectory(0))
    assert not torch.equal(full.snapshot(0, 0), full.snapshot(0, 4))


def test_expert_resumes_after_sigkill(tmp_path):
    """A real kill -9 between epochs: the restarted expert continues from its last saved epoch."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_trajectory import tiny_pool, make_net, spec, describe
        from iwd_fast.distill.trajectory.buffer import ExpertBuffer
        from iwd_fast.distill.trajectory.experts import train_expert
        torch.set_num_threads(1)  # bitwise comparison below: the same thread count on both sides
        x, y = tiny_pool()
        buf = ExpertBuffer({str(tmp_path / 'k')!r}, describe(x, y))
        train_expert(buf, 0, make_net(), x, y, None, spec(train_epochs=5), None,
                     after_epoch=lambda e: (print(e, flush=True), time.sleep(30) if e == 2 else None))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = []
        deadline = time.time() + 120
        while "2" not in lines and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        assert "2" in lines, lines
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    x, y = tiny_pool()
    killed = ExpertBuffer(tmp_path / "k", describe(x, y))
    assert killed.finished() == [] and killed.resume_point(0)["epoch"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_expert(killed, 0, make_net(), x, y, None, spec(train_epochs=5), None)
        clean = ExpertBuffer(tmp_path / "c", describe(x, y))
        train_expert(clean, 0, make_net(), x, y, None, spec(train_epochs=5), None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(killed.trajectory(0), clean.trajectory(0))


# ---------------------------------------------------------------------------------- weighted experts

def test_weighted_expert_loss_is_the_explicit_weighted_per_sample_loss():
    """Class-mixed batch: sum_i w_i CE_i / sum_i w_i, against a per-sample loop in float64."""
    x, y = tiny_pool(dtype=torch.float64)
    net = make_net(torch.float64)(0)
    w = torch.rand(len(y), dtype=torch.float64) + 0.1
    logits = net(x)
    explicit = sum(w[i] * -torch.log_softmax(logits[i], 0)[y[i]] for i in range(len(y))) / w.sum()
    torch.testing.assert_close(weighted_cross_entropy(logits, y, w), explicit, rtol=1e-12, atol=0)
    assert not torch.allclose(weighted_cross_entropy(logits, y, w), F.cross_entropy(logits, y))


def test_expert_epoch_is_one_weighted_sgd_step_per_batch(tmp_path):
    """Expert training with one full batch per epoch: theta_1 = theta_0 - lr * grad(weighted mean CE),
    the gradient taken from an explicit per-sample loop in float64 (snapshots are stored in float32)."""
    x, y = tiny_pool()
    w = torch.rand(len(y)) + 0.1
    s = spec(train_epochs=1, expert_batch=len(y))
    buf = ExpertBuffer(tmp_path, describe(x, y, weights=w, train_epochs=1, expert_batch=len(y)))
    train_expert(buf, 0, make_net(), x, y, w, s, None)
    net64 = make_net(torch.float64)(0)
    flat = FlatNet(net64)
    theta0 = buf.snapshot(0, 0).double()
    flat.load_into_net(theta0)
    params = list(net64.parameters())
    grads = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        gi = torch.autograd.grad(F.cross_entropy(net64(x[i:i + 1].double()), y[i:i + 1]), params)
        for acc, g in zip(grads, gi):
            acc += w[i].double() * g
    expected = theta0 - s.expert_lr * flat.flatten([g / w.double().sum() for g in grads])
    got = buf.snapshot(0, 1).double()
    assert (got - theta0).abs().max() > 1e-4  # the expert moved
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-6)


# ------------------------------------------------------------------------------- scores along checkpoints

@pytest.mark.parametrize("target", ["validation", "self"])
def test_scores_along_checkpoints_match_an_explicit_float64_loop(tmp_path, target):
    x, y = tiny_pool(n=12, dtype=torch.float64)
    hx, hy = tiny_pool(n=9, seed=1, dtype=torch.float64)
    buf = ExpertBuffer(tmp_path, describe(x.float(), y))
    train_expert(buf, 0, make_net(), x.float(), y, None, spec(train_epochs=3), None)
    net = make_net(torch.float64)(0)
    student = FlatNet(net)
    eta, epochs = 0.05, [0, 2, 3]
    got = checkpoint_scores(buf, [0], epochs, student, x, y, target, eta, hx, hy, chunk_size=5)
    params = list(net.parameters())
    expected = torch.zeros(len(y), dtype=torch.float64)
    for k in epochs:
        student.load_into_net(buf.snapshot(0, k).double())
        val = [torch.zeros_like(p) for p in params]
        for j in range(len(hy)):
            for acc, g in zip(val, torch.autograd.grad(F.cross_entropy(net(hx[j:j + 1]), hy[j:j + 1]), params)):
                acc += g / len(hy)
        for i in range(len(y)):
            gi = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), params)
            if target == "validation":
                expected[i] += eta * sum((a * b).sum() for a, b in zip(gi, val))
            else:
                expected[i] += eta * sum((a * a).sum() for a in gi)
    assert got["checkpoints"] == 3 and got["dots"] == 3 * len(y)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got["scores"], expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())


# --------------------------------------------------------------------------------------- inner unroll

def test_unroll_gradient_matches_central_differences():
    """dL_tm/d(images), d(alpha) and d(soft-label logits) through a 3-step unroll, float64."""
    torch.manual_seed(0)
    net = build_network("convnet", 1, 3, (6, 6), width=2, depth=1, norm="instancenorm").double()
    student = FlatNet(net)
    start = student.flatten()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(6, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    logits_y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    batches = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([5, 0, 1, 2])]
    flip = lambda x, step: x.flip(-1) if step == 1 else x  # noqa: E731  (a differentiable "augmentation")

    def loss(s, a, ly):
        return matching_loss(unroll(student, start, s, ly, a, batches, flip), start, target)

    value = loss(images, alpha, logits_y)
    g_img, g_alpha, g_y = torch.autograd.grad(value, (images, alpha, logits_y))
    h = 1e-6
    for tensor, grad in ((images, g_img), (logits_y, g_y)):
        u = torch.randn_like(tensor)
        args = lambda d: (images + d * u, alpha, logits_y) if tensor is images else (images, alpha, logits_y + d * u)  # noqa
        fd = (loss(*args(h)) - loss(*args(-h))) / (2 * h)
        torch.testing.assert_close((grad * u).sum(), fd.detach(), rtol=1e-6, atol=1e-10)
    fd = (loss(images, alpha + h, logits_y) - loss(images, alpha - h, logits_y)) / (2 * h)
    torch.testing.assert_close(g_alpha, fd.detach(), rtol=1e-6, atol=1e-10)
    assert g_img.abs().max() > 0 and g_y.abs().max() > 0


def test_unroll_with_hard_labels_is_plain_sgd():
    torch.manual_seed(1)
    net = build_network("convnet", 1, 3, (6, 6), width=2, depth=1, norm="instancenorm").double()
    student = FlatNet(net)
    images = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    theta = unroll(student, student.flatten(), images, labels, torch.tensor(0.3, dtype=torch.float64),
                   [torch.arange(4)] * 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        opt.step()
    torch.testing.assert_close(theta.detach(), student.flatten(), rtol=1e-12, atol=1e-14)


def test_soft_cross_entropy_is_the_explicit_formula():
    logits, target = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    p = torch.softmax(target, 1)
    explicit = -sum((p[i] * torch.log_softmax(logits[i], 0)).sum() for i in range(5)) / 5
    torch.testing.assert_close(soft_cross_entropy(logits, target), explicit, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ DATM

def test_datm_window_moves_with_progress():
    tm = TrajectorySpec(min_start_epoch=1, max_start_epoch=20, datm_initial_max_start=10, datm_expansion_end=100)
    fake = SimpleNamespace(tm=tm)
    ranges = [DATM.start_range(fake, it) for it in (0, 50, 100, 1000)]
    assert ranges == [(1, 10), (1, 15), (1, 20), (1, 20)]
    fake.tm = TrajectorySpec(min_start_epoch=0, max_start_epoch=20, datm_sequential=False)
    assert DATM.start_range(fake, 0) == (0, 20)


def test_correct_initial_selection_prefers_correct_then_weights():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logits = torch.zeros(8, 2)
    logits[[0, 1, 2], 0] = 1.0      # class 0: instances 0, 1, 2 correct, 3 wrong
    logits[[3, 4], 1] = 1.0         # class 1: only instance 4 correct
    logits[[5, 6, 7], 0] = 1.0
    w = torch.tensor([1.0, 5.0, 3.0, 9.0, 1.0, 1.0, 7.0, 2.0])
    out = correct_initial_indices(logits, labels, w, 2, 2, "weighted", seed=0)
    assert out["indices"].tolist() == [1, 2, 4, 6]  # top weight among correct; class 1 filled from the rest
    assert out["filled_from_incorrect"] == 1 and out["correct_pool_fraction"] == 0.5
    rand = correct_initial_indices(logits, labels, None, 2, 2, "random", seed=3)["indices"]
    assert set(rand[:2].tolist()) <= {0, 1, 2} and rand[2].item() == 4
