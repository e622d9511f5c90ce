"""Public scoring functions: per-sample gradient dot products and squared norms of a model.

``grad_dot(model, x, y, directions)`` is the one operation every influence score reduces to
(METHOD.md sections 2-3): s_i = <grad_theta loss(f(x_i), y_i), v>, never materialising grad_theta
per sample unless impl="reference" asks for it. ``score_batch`` is the shared step under both (and
under dataset scoring): one batch, an impl already resolved, dots and/or norms in one backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import dispatch, oracle
from .capture import Capture
from .checks import check_finite, format_indices
from .params import Directions, StackedDirections, stack_directions, trainable_parameters
from .jvp import grad_dot_jvp
from .rules import UnsupportedLayerError, couples_samples
from .losses import LossSpec, PerSampleLoss, check_labels, resolve_loss

__all__ = ["grad_dot", "grad_norm_sq", "score_batch", "check_batch_inputs", "norm_param_names",
           "explain_forward_failure", "forward_problem"]


def grad_dot(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    directions: Directions,
    *,
    loss: LossSpec = "cross_entropy",
    impl: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-sample gradient dot products s[i, k] = <grad_theta loss(model(x_i), y_i), v_k>.

    Args:
        model: any nn.Module; its current mode (train/eval) is used as is.
        inputs: [B, ...] batch; floating-point inputs must be finite (NaN/Inf rows are named).
        labels: int64 labels [B] or soft labels [B, C] for cross entropy; anything ``loss`` accepts.
        directions: {param_name: [*shape] or [K, *shape]}, a list of K such dicts, or a sequence of
            tensors aligned with the trainable parameters (``torch.autograd.grad``'s tuple; None = 0),
            or a list of K such sequences; parameters not named contribute 0.
        loss: "cross_entropy" or a callable (outputs, labels) -> per-sample losses [B].
        impl: see ``iwd_fast.scoring.dispatch`` ("auto", "reference", "jvp", "torch", "cpu", "cuda", "triton").
        chunk_size: samples per chunk for "reference" and the hook impls (bounds memory); None = all.
    Returns:
        [B] float tensor for one direction, [B, K] for K directions.
    Raises:
        ValueError before any work for non-finite inputs or bad labels (naming the indices), and after
        it for non-finite scores of finite inputs (an overflowing loss or non-finite parameters).
    """
    stacked = stack_directions(model, directions)
    loss_fn = resolve_loss(loss)
    check_batch_inputs("grad_dot", inputs, labels)
    if inputs.shape[0] == 0:
        out = inputs.new_zeros((0, stacked.k), dtype=next(iter(stacked.tensors.values())).dtype)
        return out[:, 0] if stacked.single else out
    concrete = dispatch.resolve_model_impl(impl, model, list(stacked.tensors), inputs.device, allow_jvp=True)
    with explain_forward_failure("grad_dot", model, inputs):
        s, _ = score_batch(model, inputs, labels, concrete, loss, loss_fn, stacked=stacked, chunk_size=chunk_size)
    _refuse_nonfinite_scores("grad_dot", s)
    return s[:, 0] if stacked.single else s


def grad_norm_sq(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    params: Optional[Sequence[str]] = None,
    loss: LossSpec = "cross_entropy",
    impl: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-sample squared gradient norms ||grad_theta loss_i||^2 over ``params`` (default: all trainable), [B].

    The self-influence score (METHOD.md 2e), streamed: each layer's norm is folded in inside the
    backward and its tensors released at once. impl: "auto", "reference", or a hook impl ("torch",
    "cpu", "cuda", "triton"); "jvp" would need one pass per parameter and is refused. Input checks as
    :func:`grad_dot`.
    """
    names = norm_param_names(model, params)
    loss_fn = resolve_loss(loss)
    check_batch_inputs("grad_norm_sq", inputs, labels)
    if inputs.shape[0] == 0:
        return inputs.new_zeros(0)
    if impl == "jvp":
        raise dispatch.ImplUnavailableError("grad_norm_sq: impl='jvp' needs one pass per parameter; use 'reference' "
                                             "or a hook impl")
    concrete = dispatch.resolve_model_impl(impl, model, names, inputs.device, allow_jvp=False)
    with explain_forward_failure("grad_norm_sq", model, inputs):
        _, n = score_batch(model, inputs, labels, concrete, loss, loss_fn, norm_names=names, chunk_size=chunk_size)
    _refuse_nonfinite_scores("grad_norm_sq", n)
    return n


def norm_param_names(model: nn.Module, params: Optional[Sequence[str]]) -> list:
    """The parameter names a squared norm runs over (default: every trainable parameter), checked."""
    names = list(params) if params is not None else list(trainable_parameters(model))
    unknown = sorted(set(names) - set(dict(model.named_parameters())))
    if unknown:
        raise ValueError(f"params names parameters the model does not have: {unknown}")
    return names


@contextlib.contextmanager
def explain_forward_failure(where: str, model: nn.Module, inputs: torch.Tensor):
    """Turn a failure of the scoring pass whose cause is that ``model`` cannot run on ``inputs`` at all
    (wrong shape or dtype for its layers) into one ValueError naming the inputs and the model's complaint.

    Costs nothing when the pass succeeds: only after a RuntimeError or TypeError is a plain forward of the
    first inputs tried (no gradients, buffers untouched); if that forward runs, the original error stands.
    """
    try:
        yield
    except (RuntimeError, TypeError) as err:
        problem = forward_problem(model, inputs[:2])
        if problem is None:
            raise
        raise ValueError(f"{where}: the model cannot run on inputs {inputs.dtype} {tuple(inputs.shape)}: "
                         f"{problem}") from err


def forward_problem(model: nn.Module, inputs: torch.Tensor) -> Optional[str]:
    """The first line of the error a plain forward of ``inputs`` raises (no gradients, buffers cloned so
    running statistics stay untouched), or None when it runs."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with torch.no_grad():
            torch.func.functional_call(model, buffers, (inputs,), strict=False)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no detail'}"
    return None


def check_batch_inputs(where: str, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse, before any work, a batch whose rows disagree or hold NaN/Inf (inputs or soft labels)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise ValueError(f"{where}: inputs must be a tensor [B, ...], got {type(inputs).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
        raise ValueError(f"{where}: labels must be a tensor [B, ...], got {type(labels).__name__}")
    if labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"{where}: labels have {labels.shape[0]} rows but inputs have {inputs.shape[0]}")
    check_finite(inputs, where, "inputs")
    check_finite(labels, where, "labels")


def score_batch(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    impl: str,
    loss: LossSpec,
    loss_fn: PerSampleLoss,
    *,
    stacked: Optional[StackedDirections] = None,
    norm_names: Optional[Sequence[str]] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dots [B, K] or None, squared norms [B] or None) of one batch with a resolved ``impl``.

    Hook impls compute both in ONE forward and backward per chunk (streamed capture); "reference"
    materialises per-sample gradients (vmap(grad)); "jvp" gives dots only (forward mode).
    """
    if stacked is None and norm_names is None:
        raise ValueError("score_batch: ask for dots (stacked directions), norms (norm_names) or both")
    if impl == "reference":
        _check_no_batch_coupling(model)
        _probe_labels(model, inputs, labels, loss)
        dots = None if stacked is None else oracle.grad_dot_reference(model, inputs, labels, stacked.tensors, loss_fn,
                                                                      chunk_size)
        norms = None if norm_names is None else oracle.grad_norm_sq_reference(model, inputs, labels, norm_names,
                                                                               loss_fn, chunk_size)
        return dots, norms
    if impl == "jvp":
        if norm_names is not None:
            raise dispatch.ImplUnavailableError("impl='jvp' gives dots only: squared norms need 'reference' or a "
                                                 "hook impl")
        return grad_dot_jvp(model, inputs, labels, stacked.tensors, _checked_loss(loss, loss_fn)), None
    as_stack = None if stacked is None else dataclasses.replace(stacked, single=False)  # always [B, K] here
    return _hook_chunks(model, inputs, labels, impl, loss, loss_fn, as_stack, norm_names, chunk_size)


# -------------------------------------------------------------------------------------------------

def _refuse_nonfinite_scores(where: str, scores: torch.Tensor) -> None:
    finite = torch.isfinite(scores.detach())
    bad = ~(finite.flatten(1).all(dim=1) if scores.dim() > 1 else finite)
    if bool(bad.any()):
        raise ValueError(f"{where}: non-finite scores at indices {format_indices(bad)} although inputs and labels "
                         "are finite: the loss or its gradient overflowed, or the model has non-finite parameters")


def _check_no_batch_coupling(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if couples_samples(m):
            raise UnsupportedLayerError(
                f"impl='reference' runs each sample alone, but {name} ({type(m).__name__}) is in training mode and "
                "couples samples through batch statistics; use impl='jvp' or model.eval()")


def _probe_labels(model, inputs, labels, loss) -> None:
    """Label checks before vmap (which cannot run them): the output shape from a one-sample forward.
    Only for impl="reference", which refuses batch-coupled layers, so one sample is a valid batch."""
    if callable(loss):
        return
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # a probe forward must not touch running stats
    with torch.no_grad():
        shape = torch.func.functional_call(model, buffers, (inputs[:1],), strict=False).shape
    check_labels(loss, torch.Size((inputs.shape[0], *shape[1:])), labels, inputs.shape[0])


def _checked_loss(loss: LossSpec, loss_fn: PerSampleLoss) -> PerSampleLoss:
    """``loss_fn`` that first checks the labels against the real outputs and its result's shape [B]."""
    def checked(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not callable(loss):
            check_labels(loss, out.shape, y, out.shape[0])
        losses = loss_fn(out, y)
        if losses.shape != (out.shape[0],):
            raise ValueError(f"loss must return per-sample losses of shape [{out.shape[0]}], got {tuple(losses.shape)}")
        return losses

    return checked


def _hook_chunks(model, inputs, labels, impl, loss, loss_fn, stacked, norm_names, chunk_size):
    """Forward + backward of sum_i loss_i under a streamed capture per chunk; concatenated results."""
    step = inputs.shape[0] if not chunk_size else int(chunk_size)
    checked = _checked_loss(loss, loss_fn)
    dots, norms = [], []
    for start in range(0, inputs.shape[0], step):
        x, y = inputs[start:start + step], labels[start:start + step]
        cap = Capture(model, stacked, impl, norm_sq=list(norm_names) if norm_names is not None else False)
        with torch.enable_grad(), cap:
            losses = checked(model(x), y)
            wrt = cap.gradient_inputs()
            if not wrt:
                raise RuntimeError("no supported layer with trainable parameters ran in the forward")
            torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
        if stacked is not None:
            dots.append(cap.grad_dot(None, "sum"))
        if norm_names is not None:
            norms.append(cap.grad_norm_sq(None, "sum"))
    cat = lambda parts: None if not parts else (parts[0] if len(parts) == 1 else torch.cat(parts))  # noqa: E731
    return cat(dots), cat(norms)
