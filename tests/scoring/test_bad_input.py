"""Bad input to the engine: one clear error before any work, naming what is wrong and where; and the
direction forms the engine accepts (dict, list of dicts, tensors aligned with the trainable parameters)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import iwd_fast
from iwd_fast.scoring import api


def mlp_bn1d():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def directions(net):
    g = torch.Generator().manual_seed(2)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in net.named_parameters()}


def count_forwards(net):
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("fn", ["grad_dot", "grad_norm_sq"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_nan_inputs_are_named_before_any_forward(fn, impl):
    net = mlp_bn1d().eval()
    x, y = batch()
    x[2, 1], x[4, 0] = float("nan"), float("inf")
    calls = count_forwards(net)
    args = (net, x, y, directions(net)) if fn == "grad_dot" else (net, x, y)
    with pytest.raises(ValueError, match=r"non-finite inputs \(NaN or Inf\) at indices \[2, 4\]") as err:
        getattr(iwd_fast, fn)(*args, impl=impl)
    assert "\n" not in str(err.value) and not calls


def test_nan_soft_labels_and_nan_direction_are_named():
    net = mlp_bn1d().eval()
    x, _ = batch()
    soft = torch.full((6, 3), 1 / 3, dtype=torch.float64)
    soft[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite labels .* at indices \[5\]"):
        iwd_fast.grad_dot(net, x, soft, directions(net))
    v = directions(net)
    v["3.bias"][1] = float("inf")
    with pytest.raises(ValueError, match=r"direction for '3.bias' has non-finite values .* positions \[1\]"):
        iwd_fast.grad_dot(net, x, batch()[1], v)


def test_nonfinite_scores_of_finite_inputs_are_named():
    net = mlp_bn1d().eval()
    x, y = batch()
    x[3] = 1e308  # finite, but the first layer overflows for sample 3 alone
    with pytest.raises(ValueError, match=r"non-finite scores at indices \[3\]"):
        iwd_fast.grad_dot(net, x, y, directions(net), impl="torch")


@pytest.mark.parametrize("impl", ["torch", "jvp", "reference"])
def test_float_labels_of_shape_b_say_what_was_expected(impl):
    net = mlp_bn1d().eval()
    x, y = batch()
    with pytest.raises(ValueError, match=r"float64 of shape \[6\]: cross entropy takes int64 class indices"):
        iwd_fast.grad_dot(net, x, y.double(), directions(net), impl=impl)


def test_jvp_runs_train_mode_batchnorm1d():
    net = mlp_bn1d().train()
    x, y = batch()
    v = directions(net)
    got = iwd_fast.grad_dot(net, x, y, v, impl="jvp")
    losses = F.cross_entropy(net(x), y, reduction="none")  # batch statistics couple the samples
    params = list(net.parameters())
    oracle = torch.stack([sum((g * v[n]).sum() for g, (n, _) in
                              zip(torch.autograd.grad(losses[i], params, retain_graph=True), net.named_parameters()))
                          for i in range(6)])
    torch.testing.assert_close(got, oracle, rtol=1e-9, atol=1e-12)
    bad = y.clone()
    bad[1] = 3
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\) at indices \[1\]"):
        iwd_fast.grad_dot(net, x, bad, v, impl="jvp")


def test_directions_as_autograd_tuple_aligned_with_trainable_parameters():
    net = mlp_bn1d().eval()
    x, y = batch()
    net[1].weight.requires_grad_(False)  # frozen parameters are not part of the alignment
    trainable = [p for p in net.parameters() if p.requires_grad]
    g = torch.autograd.grad(F.cross_entropy(net(x), y), trainable)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    as_dict = iwd_fast.grad_dot(net, x, y, dict(zip(names, g)), impl="reference")
    torch.testing.assert_close(iwd_fast.grad_dot(net, x, y, g, impl="torch"), as_dict, rtol=1e-10, atol=1e-12)
    two = iwd_fast.grad_dot(net, x, y, [g, [2 * t for t in g]], impl="torch")
    torch.testing.assert_close(two[:, 1], 2 * as_dict, rtol=1e-10, atol=1e-12)
    partial = [None] * (len(g) - 1) + [g[-1]]  # None = an unused parameter: contributes 0
    torch.testing.assert_close(iwd_fast.grad_dot(net, x, y, partial, impl="torch"),
                               iwd_fast.grad_dot(net, x, y, {names[-1]: g[-1]}, impl="reference"),
                               rtol=1e-10, atol=1e-12)
    with iwd_fast.capture(net, directions=g) as cap:
        F.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(cap.grad_dot(), as_dict, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="sequence of 4 tensors but the model has 5 trainable parameters"):
        iwd_fast.grad_dot(net, x, y, g[:4])
    with pytest.raises(ValueError, match=r"direction for '3.weight' has shape \(8, 3\)"):
        iwd_fast.grad_dot(net, x, y, list(g[:3]) + [g[3].t(), g[4]])
    with pytest.raises(ValueError, match="single tensor"):
        iwd_fast.grad_dot(net, x, y, g[0])


def test_check_batch_inputs_names_row_mismatch():
    x, y = batch()
    with pytest.raises(ValueError, match="labels have 5 rows but inputs have 6"):
        api.check_batch_inputs("grad_dot", x, y[:5])
