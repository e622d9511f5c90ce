"""The soft-label path of iwd_fast.evaluate (DATM's synthetic sets train on probabilities)."""
import pytest
import torch
import torch.nn.functional as F

from iwd_fast import evaluate as ev
from iwd_fast.data import from_tensors
from iwd_fast.distill.config import EvalSpec, NetSpec

NET = NetSpec(name="convnet", width=4, depth=2, norm="instancenorm")


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 1, 8, 8, generator=g)
    y = torch.arange(12) % 4
    soft = torch.softmax(torch.randn(12, 4, generator=g), 1)
    return x, y, soft


def _params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_one_soft_step_is_sgd_on_the_explicit_soft_cross_entropy():
    """One full-batch step (no momentum, no decay): theta - lr * grad of -mean_i sum_c p_ic log softmax_c,
    the gradient taken in float64 from an explicit per-sample sum."""
    x, _, soft = _data()
    spec = EvalSpec(num_nets=1, epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=12, dsa=False)
    net = ev.build_eval_network(NET, 1, 4, (8, 8), 3)
    ref = ev.build_eval_network(NET, 1, 4, (8, 8), 3).double()
    theta0 = _params(ref)
    stats = ev.train_network(net, x, soft, spec, seed=0, dsa_strategy=None, device="cpu")
    assert stats["steps"] == 1
    loss = -sum((soft[i].double() * torch.log_softmax(ref(x[i:i + 1].double())[0], 0)).sum() for i in range(12)) / 12
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = theta0 - 0.1 * torch.cat([g.flatten() for g in grads])
    assert (expected - theta0).abs().max() > 1e-4
    torch.testing.assert_close(_params(net).double(), expected, rtol=0, atol=2e-6)


def test_one_hot_soft_labels_train_like_hard_labels():
    x, y, soft = _data()
    spec = EvalSpec(num_nets=1, epochs=3, batch_size=5, dsa=False)
    nets = [ev.build_eval_network(NET, 1, 4, (8, 8), 9) for _ in range(3)]
    ev.train_network(nets[0], x, y, spec, seed=1, dsa_strategy=None, device="cpu")
    ev.train_network(nets[1], x, F.one_hot(y, 4).float(), spec, seed=1, dsa_strategy=None, device="cpu")
    ev.train_network(nets[2], x, soft, spec, seed=1, dsa_strategy=None, device="cpu")
    hard, onehot, other = (_params(n) for n in nets)
    torch.testing.assert_close(onehot, hard, rtol=0, atol=1e-5)
    assert (other - hard).abs().max() > 1e-3


def test_evaluate_synthetic_accepts_soft_labels_and_rejects_bad_ones():
    x, y, soft = _data()
    test = from_tensors(x, y, "digits", 4, normalize=False)
    spec = EvalSpec(num_nets=2, epochs=1, batch_size=6, dsa=False)
    res = ev.evaluate_synthetic(x, soft, test, spec, NET, seed=0, dsa_strategy=None, progress=False)
    assert len(res["accs"]) == 2 and res["mean"] == pytest.approx(sum(res["accs"]) / 2)
    with pytest.raises(ValueError, match="probabilities"):
        ev.evaluate_synthetic(x, soft * 2, test, spec, NET, seed=0, dsa_strategy=None, progress=False)
    with pytest.raises(ValueError, match="labels must lie|soft labels"):
        ev.evaluate_synthetic(x, torch.softmax(torch.randn(12, 3), 1), test, spec, NET, seed=0, dsa_strategy=None,
                              progress=False)
    with pytest.raises(ValueError, match="soft labels must be"):
        ev.train_network(ev.build_eval_network(NET, 1, 4, (8, 8), 0), x, soft[:5], spec, 0, None, "cpu")
