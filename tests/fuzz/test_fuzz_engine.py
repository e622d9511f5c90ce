"""Fuzzed bad input to the engine and the weighter: grad_dot, grad_norm_sq, capture / weighted_gradient,
InfluenceWeighter, score_dataset.

Each generated case carries one fault at generated positions (NaN / Inf rows, labels out of range or
negative, wrong label dtypes, mismatched lengths, inputs of the wrong shape or dtype, empty batches,
zero / negative / non-finite weights, bad directions of scores). The entry point must either give the
correct result (checked against the float64 reference or a direct formula) or raise one clear error
naming exactly the generated positions, before any forward where the fault is visible without one.
"""
import math
import uuid

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import iwd_fast
from iwd_fast.scoring.checks import format_indices
from iwd_fast.scoring.losses import cross_entropy_per_sample, weighted_mean

from fuzzing import FUZZ, correct, refused

pytestmark = pytest.mark.fuzz

BATCH_FAULTS = ["none", "int32_labels", "empty", "nan_inputs", "inf_inputs", "labels_high", "labels_negative",
                "float_labels", "bool_labels", "dense_labels", "soft_nan", "soft_negative", "short_labels",
                "feature_shape", "input_dtype"]
NO_FORWARD = {"nan_inputs", "inf_inputs", "soft_nan", "short_labels"}  # visible without running the model


def model_for(kind: str, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes))
    else:
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(3 * 5 * 5, classes))
    return net.double()


def inputs_for(kind: str, b: int, g: torch.Generator) -> torch.Tensor:
    shape = (b, 4) if kind == "mlp" else (b, 1, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@st.composite
def batch_cases(draw):
    kind, b, classes = draw(st.sampled_from(["mlp", "conv"])), draw(st.integers(1, 13)), draw(st.integers(2, 4))
    fault = draw(st.sampled_from(BATCH_FAULTS))
    rows = sorted(draw(st.sets(st.integers(0, b - 1), min_size=1, max_size=b)))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    net, x = model_for(kind, classes, seed), inputs_for(kind, b, g)
    y = torch.randint(0, classes, (b,), generator=g)
    if fault == "empty":
        x, y = x[:0], y[:0]
    elif fault in ("nan_inputs", "inf_inputs"):
        for r in rows:
            flat = x[r].view(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = float("nan") if fault == "nan_inputs" else -float("inf")
    elif fault == "labels_high":
        y[rows] = classes + torch.randint(0, 5, (len(rows),), generator=g)
    elif fault == "labels_negative":
        y[rows] = -1 - torch.randint(0, 5, (len(rows),), generator=g)
    elif fault == "int32_labels":
        y = y.int()
    elif fault == "float_labels":
        y = y.double()
    elif fault == "bool_labels":
        y = y > 0
    elif fault == "dense_labels":
        y = y.view(b, 1)
    elif fault in ("soft_nan", "soft_negative"):
        y = torch.softmax(torch.randn(b, classes, generator=g, dtype=torch.float64), dim=1)
        y[rows, draw(st.integers(0, classes - 1))] = float("nan") if fault == "soft_nan" else -0.5
    elif fault == "short_labels":
        y = y[: b - len(rows)]
    elif fault == "feature_shape":
        x = torch.randn((b, 5) if kind == "mlp" else (b, 2, 5, 5), generator=g, dtype=torch.float64)
    elif fault == "input_dtype":
        x = x.float()
    return net, x, y, fault, rows, classes


def expected_refusal(fault, rows, x, y, classes, where):
    """(indices, mentions) the error must name for ``fault``; None for a fault that has a correct result."""
    return {
        "nan_inputs": (rows, [f"{where}: non-finite inputs"]), "inf_inputs": (rows, [f"{where}: non-finite inputs"]),
        "labels_high": (rows, [f"outside [0, {classes})"]), "labels_negative": (rows, [f"outside [0, {classes})"]),
        "float_labels": (None, ["int64 class indices"]), "bool_labels": (None, ["torch.bool"]),
        "dense_labels": (None, [f"labels of shape {tuple(y.shape)}", f"takes labels [{x.shape[0]}]"]),
        "soft_nan": (rows, [f"{where}: non-finite labels"]), "soft_negative": (rows, ["soft labels", "non-negative"]),
        "short_labels": (None, [f"labels have {y.shape[0]} rows but inputs have {x.shape[0]}"]),
        "feature_shape": (None, [f"{where}: the model cannot run on inputs", str(tuple(x.shape))]),
        "input_dtype": (None, [f"{where}: the model cannot run on inputs torch.float32"]),
    }.get(fault)


def directions(net, k, g):
    return [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in net.named_parameters()} for _ in range(k)]


def count_forwards(net):
    calls = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@FUZZ
@given(case=batch_cases(), impl=st.sampled_from(["auto", "reference", "torch", "jvp"]), k=st.integers(1, 3))
def test_grad_dot(case, impl, k):
    net, x, y, fault, rows, classes = case
    v = directions(net, k, torch.Generator().manual_seed(k))
    expect = expected_refusal(fault, rows, x, y, classes, "grad_dot")
    if expect is None:
        got = iwd_fast.grad_dot(net, x, y, v, impl=impl)
        ref = iwd_fast.grad_dot(net, x, y.long(), v, impl="reference")
        assert got.shape == (x.shape[0], k)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
        return correct("grad_dot")
    calls, handle = count_forwards(net)
    refused("grad_dot", lambda: iwd_fast.grad_dot(net, x, y, v, impl=impl), indices=expect[0], mentions=expect[1])
    handle.remove()
    assert not (fault in NO_FORWARD and calls), f"{fault}: the model ran before the refusal"


@FUZZ
@given(case=batch_cases(), impl=st.sampled_from(["auto", "reference", "torch"]))
def test_grad_norm_sq(case, impl):
    net, x, y, fault, rows, classes = case
    expect = expected_refusal(fault, rows, x, y, classes, "grad_norm_sq")
    if expect is None:
        got = iwd_fast.grad_norm_sq(net, x, y, impl=impl)
        ref = iwd_fast.grad_norm_sq(net, x, y.long(), impl="reference")
        assert got.shape == (x.shape[0],)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
        return correct("grad_norm_sq")
    calls, handle = count_forwards(net)
    refused("grad_norm_sq", lambda: iwd_fast.grad_norm_sq(net, x, y, impl=impl), indices=expect[0],
            mentions=expect[1])
    handle.remove()
    assert not (fault in NO_FORWARD and calls), f"{fault}: the model ran before the refusal"


WEIGHT_FAULTS = ["positive", "some_zero", "negative", "nan", "inf", "all_zero", "wrong_shape"]


@FUZZ
@given(kind=st.sampled_from(["mlp", "conv"]), b=st.integers(1, 14), fault=st.sampled_from(WEIGHT_FAULTS),
       data=st.data())
def test_capture_weighted_gradient(kind, b, fault, data):
    rows = sorted(data.draw(st.sets(st.integers(0, b - 1), min_size=1, max_size=b)))
    if fault == "some_zero" and len(rows) == b:
        rows = rows[1:] or rows  # at least one positive weight
    g = torch.Generator().manual_seed(b)
    net, x = model_for(kind, 3, b), inputs_for(kind, b, g)
    y = torch.randint(0, 3, (b,), generator=g)
    params = list(net.parameters())
    w = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    if fault == "some_zero" and len(rows) < b:
        w[rows] = 0.0
    elif fault in ("negative", "nan", "inf"):
        w[rows] = {"negative": -1.0, "nan": float("nan"), "inf": float("inf")}[fault]
    elif fault == "all_zero":
        w.zero_()
    elif fault == "wrong_shape":
        w = w[:-1] if b > 1 else w.view(1, 1)
    v = directions(net, 2, g)
    fine = fault in ("positive", "some_zero")
    want = torch.autograd.grad(weighted_mean(cross_entropy_per_sample(net(x), y), w), params) if fine else None
    cap = iwd_fast.capture(net)
    with cap:
        losses = cross_entropy_per_sample(net(x), y)
        if fine:
            got = cap.weighted_gradient(losses, w, params)
            assert all(torch.equal(a, b_) for a, b_ in zip(got, want))  # autograd's own backward: bitwise
            torch.testing.assert_close(cap.grad_dot(v), iwd_fast.grad_dot(net, x, y, v, impl="reference"),
                                       rtol=1e-9, atol=1e-12)
            return correct("capture.weighted_gradient")
        expect = {"negative": (rows, "negative or non-finite weights"), "nan": (rows, "negative or non-finite weights"),
                  "inf": (rows, "negative or non-finite weights"), "all_zero": (None, "all weights are zero"),
                  "wrong_shape": (None, f"weights must have shape ({b},), got {tuple(w.shape)}")}[fault]
        refused("capture.weighted_gradient", lambda: cap.weighted_gradient(losses, w, params), indices=expect[0],
                mentions=["weighted_gradient: ", expect[1]])


@FUZZ
@given(b=st.integers(1, 14), fault=st.sampled_from(["zero", "nan", "inf", "fine"]), data=st.data())
def test_capture_sample_weights(b, fault, data):
    """grad_dot of a capture after the caller's own backward of sum_i w_i loss_i, told the w_i."""
    rows = sorted(data.draw(st.sets(st.integers(0, b - 1), min_size=1, max_size=b)))
    g = torch.Generator().manual_seed(b)
    net, x = model_for("mlp", 3, b), inputs_for("mlp", b, g)
    y = torch.randint(0, 3, (b,), generator=g)
    w = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    v = directions(net, 1, g)[0]
    with iwd_fast.capture(net) as cap:
        (w * cross_entropy_per_sample(net(x), y)).sum().backward()
    if fault == "fine":
        torch.testing.assert_close(cap.grad_dot(v, sample_weights=w), iwd_fast.grad_dot(net, x, y, v, impl="reference"),
                                   rtol=1e-9, atol=1e-12)
        return correct("capture.grad_dot")
    bad = w.clone()
    bad[rows] = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[fault]
    refused("capture.grad_dot", lambda: cap.grad_dot(v, sample_weights=bad), indices=rows, mentions=["sample_weights"])


WEIGHTER_FAULTS = ["fine", "empty_classes", "empty_dataset", "labels_high", "labels_negative", "float_labels",
                   "update_out_of_range", "update_duplicates", "update_nan", "update_lengths", "temperature",
                   "prior_bad", "prior_zero_class"]


@FUZZ
@given(n=st.integers(1, 30), classes=st.integers(1, 5), fault=st.sampled_from(WEIGHTER_FAULTS), data=st.data())
def test_influence_weighter(n, classes, fault, data):
    g = torch.Generator().manual_seed(n * 7 + classes)
    labels = torch.randint(0, classes, (n,), generator=g)
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    make = lambda lab=labels, **kw: iwd_fast.InfluenceWeighter(lab, classes, **kw)  # noqa: E731
    if fault == "labels_high":
        bad = labels.clone()
        bad[rows] = classes + torch.randint(0, 3, (len(rows),), generator=g)
        return refused("InfluenceWeighter", lambda: make(bad), indices=rows, mentions=[f"outside [0, {classes})"])
    if fault == "labels_negative":
        bad = labels.clone()
        bad[rows] = -1
        return refused("InfluenceWeighter", lambda: make(bad), indices=rows, mentions=[f"outside [0, {classes})"])
    if fault == "float_labels":
        return refused("InfluenceWeighter", lambda: make(labels.double()), mentions=["integer tensor"])
    if fault == "temperature":
        t = data.draw(st.sampled_from([0.0, -1.0, -math.inf, math.nan]))
        return refused("InfluenceWeighter", lambda: make(temperature=t), mentions=["temperature must be > 0"])
    if fault == "prior_bad":
        prior = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
        prior[rows] = data.draw(st.sampled_from([-0.5, math.nan, math.inf]))
        return refused("InfluenceWeighter", lambda: make(prior=prior), indices=rows, mentions=["prior"])
    if fault == "prior_zero_class":
        c = int(labels[rows[0]])
        prior = (labels != c).double()
        return refused("InfluenceWeighter", lambda: make(prior=prior), indices=[c], mentions=["prior is zero"])
    if fault == "empty_dataset":
        w = make(labels[:0])
        w.update(torch.zeros(0, dtype=torch.long), torch.zeros(0))
        assert w.weights().shape == (0,)
        return correct("InfluenceWeighter")
    if fault == "empty_classes":
        classes_used = max(1, classes - 1)
        labels = torch.randint(0, classes_used, (n,), generator=g)  # class classes-1 (at least) is empty
    weighter = make(labels, ema=0.0, transform="zscore", standardize=False, temperature=0.7, sign=1)
    idx = torch.tensor(rows)
    scores = torch.randn(len(rows), generator=g, dtype=torch.float64)
    if fault == "update_out_of_range":
        bad_idx = idx.clone()
        bad_idx[0] = n + int(torch.randint(0, 4, (1,), generator=g))
        if len(rows) > 1:
            bad_idx[-1] = -1
        wrong = [int(i) for i in bad_idx if i < 0 or i >= n]
        return refused("InfluenceWeighter.update", lambda: weighter.update(bad_idx, scores),
                       mentions=[f"out of range [0, {n})", format_indices(wrong)])
    if fault == "update_duplicates":
        dup = torch.cat([idx, idx[:1]])
        return refused("InfluenceWeighter.update", lambda: weighter.update(dup, torch.cat([scores, scores[:1]])),
                       mentions=["duplicated indices", format_indices([rows[0]])])
    if fault == "update_nan":
        bad_scores = scores.clone()
        pick = sorted(data.draw(st.sets(st.integers(0, len(rows) - 1), min_size=1, max_size=len(rows))))
        bad_scores[pick] = float("nan")
        return refused("InfluenceWeighter.update", lambda: weighter.update(idx, bad_scores),
                       indices=[rows[i] for i in pick], mentions=["non-finite scores"])
    if fault == "update_lengths":
        return refused("InfluenceWeighter.update", lambda: weighter.update(idx, scores[:-1]),
                       mentions=["does not match indices shape"])
    weighter.update(idx, scores)
    w = weighter.weights().double()
    for c in range(classes):  # the softmax of z-scores, by hand (METHOD.md section 4)
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        scored = torch.isin(members, idx)
        s = torch.zeros(members.numel(), dtype=torch.float64)
        s[scored] = scores[[rows.index(int(m)) for m in members[scored]]]
        known = s[scored]
        z = torch.where(scored, (s - known.mean()) / (known.std(unbiased=False) + 1e-8), torch.zeros_like(s)) \
            if scored.any() else torch.zeros_like(s)
        want = members.numel() * torch.softmax(z / 0.7, dim=0)
        torch.testing.assert_close(w[members], want, rtol=1e-5, atol=1e-6)  # weights are float32
    correct("InfluenceWeighter")


DATASET_FAULTS = ["none", "nan_error", "nan_skip", "labels_high", "labels_negative", "lengths", "empty",
                  "feature_shape", "validation_positions"]


@FUZZ
@given(n=st.integers(1, 23), fault=st.sampled_from(DATASET_FAULTS), batch=st.integers(1, 5),
       chunk=st.integers(1, 3), data=st.data())
def test_score_dataset(tmp_path, n, fault, batch, chunk, data):
    g = torch.Generator().manual_seed(n)
    net, x = model_for("mlp", 3, n), inputs_for("mlp", n, g)
    y = torch.randint(0, 3, (n,), generator=g)
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    out = tmp_path / uuid.uuid4().hex
    target, validation, policy = "self", None, "skip" if fault == "nan_skip" else "error"
    if fault in ("nan_error", "nan_skip"):
        x[rows, data.draw(st.integers(0, 3))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif fault == "labels_high":
        y[rows] = 3
    elif fault == "labels_negative":
        y[rows] = -2
    elif fault == "lengths":
        y = y[:-1]
    elif fault == "empty":
        x, y = x[:0], y[:0]
    elif fault == "feature_shape":
        x = torch.randn(n, 7, generator=g, dtype=torch.float64)
    elif fault == "validation_positions":
        target, validation = "validation", [n + 2] + rows + [-1]
    call = lambda: iwd_fast.score_dataset(net, (x, y), target, validation=validation, out=str(out),  # noqa: E731
                                          batch_size=batch, chunk_batches=chunk, nonfinite=policy, progress=False)
    expect = {"nan_error": (rows, ["non-finite inputs", "dataset positions"]),
              "labels_high": (rows, ["labels outside [0, 3)", "dataset positions"]),
              "labels_negative": (rows, ["labels outside [0, 3)", "dataset positions"]),
              "lengths": (None, [f"{n} inputs but {n - 1} labels"]), "empty": (None, ["the dataset is empty"]),
              "feature_shape": (None, ["the model cannot run on the dataset's inputs"]),
              "validation_positions": ([0, len(rows) + 1], [f"validation positions outside [0, {n})"])}.get(fault)
    if expect is not None:
        refused("score_dataset", call, indices=expect[0], mentions=["score_dataset: ", *expect[1]])
        assert not out.exists(), "a refused run wrote its folder"
        return
    result = call()
    want = torch.full((n,), float("nan"), dtype=torch.float64)
    good = torch.ones(n, dtype=torch.bool)
    if fault == "nan_skip":
        good[rows] = False
        assert result.nonfinite.tolist() == rows
    if good.any():
        want[good] = iwd_fast.grad_norm_sq(net, x[good], y[good], impl="reference")
    torch.testing.assert_close(result.scores, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    correct("score_dataset")
