"""Streamed self-influence: squared per-sample norms folded in inside the backward, against the float64
vmap(grad) oracle, every hook impl usable here; layers released as soon as their norm is in."""
import pytest
import torch
import torch.nn.functional as F

import iwd_fast
from iwd_fast.scoring import rules

from test_scoring import CASES, HOOK_IMPLS_HERE, make_case, random_directions


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", HOOK_IMPLS_HERE)
def test_streamed_norms_match_reference_and_release_every_layer(case, impl):
    m, x, y = make_case(case)
    ref = iwd_fast.grad_norm_sq(m, x, y, impl="reference")
    w = torch.rand(x.shape[0], dtype=torch.float64) + 0.1
    with iwd_fast.capture(m, impl=impl, norm_sq=True) as cap:
        per = F.cross_entropy(m(x), y, reduction="none")
        (per * w / w.sum()).sum().backward()
    assert all(c.streamed and c.record.x is None and c.record.delta is None for c in cap.calls)
    torch.testing.assert_close(cap.grad_norm_sq(sample_weights=w / w.sum()), ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(iwd_fast.grad_norm_sq(m, x, y, impl=impl), ref, rtol=1e-9, atol=0)


def test_dots_and_norms_in_one_backward_and_a_module_called_twice():
    m, x, y = make_case("shared_module")  # module ``a`` runs twice per forward
    dirs = random_directions(m, 3)
    with iwd_fast.capture(m, directions=dirs, impl="torch", norm_sq=True) as cap:
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(cap.grad_dot(), iwd_fast.grad_dot(m, x, y, dirs, impl="reference"),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cap.grad_norm_sq(), iwd_fast.grad_norm_sq(m, x, y, impl="reference"), rtol=1e-9, atol=0)
    some = ["a.weight", "b.bias"]
    with iwd_fast.capture(m, impl="torch", norm_sq=some) as cap:
        F.cross_entropy(m(x), y, reduction="sum").backward()
    torch.testing.assert_close(cap.grad_norm_sq(some, sample_weights="sum"),
                               iwd_fast.grad_norm_sq(m, x, y, params=some, impl="reference"), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="streamed the norms of"):
        cap.grad_norm_sq(["a.weight"])


def test_streamed_norms_need_the_backward_and_refuse_tied_parameters():
    m, x, y = make_case("shared_module")
    with iwd_fast.capture(m, norm_sq=True) as cap:
        m(x)
    with pytest.raises(RuntimeError, match="backward"):
        cap.grad_norm_sq()
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)).double()
    tied[1].weight = tied[0].weight
    with pytest.raises(iwd_fast.UnsupportedLayerError, match="tied"):
        iwd_fast.capture(tied, norm_sq=True)


@pytest.mark.parametrize("case", ["conv2d_groups_stride_dilation", "conv1d_same", "linear_sequence_layernorm",
                                  "batchnorm_eval", "conv2d_reflect_1x1"])
def test_sample_slices_give_the_same_norms_and_dots(case, monkeypatch):
    """Force one sample per slice (the memory bound at its tightest): results unchanged."""
    m, x, y = make_case(case)
    dirs = random_directions(m, 2)
    whole_n = iwd_fast.grad_norm_sq(m, x, y, impl="torch")
    whole_d = iwd_fast.grad_dot(m, x, y, dirs, impl="torch")
    monkeypatch.setattr(rules, "_MIN_TEMP_BYTES", 0)
    monkeypatch.setattr(rules, "sample_slices", lambda b, per, live: [slice(i, i + 1) for i in range(b)])
    torch.testing.assert_close(iwd_fast.grad_norm_sq(m, x, y, impl="torch"), whole_n, rtol=1e-12, atol=0)
    torch.testing.assert_close(iwd_fast.grad_dot(m, x, y, dirs, impl="torch"), whole_d, rtol=1e-12, atol=1e-14)


def test_sample_slices_bound_the_temporaries():
    assert rules.sample_slices(10, 1, 100) == [slice(0, 10)]                       # under 4 MiB: one slice
    big = rules.sample_slices(256, 4 << 20, 64 << 20)                              # 4 MiB per sample, 16 MiB budget
    assert [s.stop - s.start for s in big[:2]] == [4, 4] and big[-1].stop == 256
    assert rules.sample_slices(3, 1 << 40, 0) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert rules.sample_slices(0, 8, 8) == [slice(0, 0)]


def test_after_streamed_norms_each_message_points_to_what_works():
    """The two ways to ask a norm_sq capture for dots each name the one remedy, and the remedy works."""
    m, x, y = make_case("shared_module")
    dirs = random_directions(m, 2)
    with iwd_fast.capture(m, norm_sq=True) as cap:
        F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match=r"streamed only squared norms .* capture\(model, directions=v, norm_sq"):
        cap.grad_dot()
    with pytest.raises(RuntimeError, match="build the capture with the directions / norm_sq names you need"):
        cap.grad_dot(dirs)
    with iwd_fast.capture(m, directions=dirs, norm_sq=True) as cap:  # what both messages advise
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(cap.grad_dot(), iwd_fast.grad_dot(m, x, y, dirs, impl="reference"), rtol=1e-9, atol=1e-12)
    with iwd_fast.capture(m) as plain:
        F.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match=r"this capture got none: pass them to grad_dot\(v\)"):
        plain.grad_dot()
    torch.testing.assert_close(plain.grad_dot(dirs), cap.grad_dot(), rtol=1e-9, atol=1e-12)
