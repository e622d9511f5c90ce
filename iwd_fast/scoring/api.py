"""Public scoring functions: per-sample gradient dot products and squared norms of a model.

``grad_dot(model, x, y, directions)`` is the one operation every influence score reduces to
(METHOD.md sections 2-3): s_i = <grad_theta loss(f(x_i), y_i), v>, never materialising grad_theta
per sample unless impl="reference" asks for it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import dispatch, oracle
from .capture import Capture
from .params import Directions, stack_directions, trainable_parameters
from .jvp import grad_dot_jvp
from .rules import UnsupportedLayerError, couples_samples
from .losses import LossSpec, check_labels, resolve_loss

__all__ = ["grad_dot", "grad_norm_sq"]



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
        inputs: [B, ...] batch.
        labels: int64 labels [B] or soft labels [B, C] for cross entropy; anything ``loss`` accepts.
        directions: {param_name: [*shape] or [K, *shape]} or a list of K such dicts; parameters not
            named contribute 0.
        loss: "cross_entropy" or a callable (outputs, labels) -> per-sample losses [B].
        impl: see ``iwd_fast.scoring.dispatch`` ("auto", "reference", "jvp", "torch", "cpu", "cuda", "triton").
        chunk_size: samples per chunk for "reference" and the hook impls (bounds memory); None = all.
    Returns:
        [B] float tensor for one direction, [B, K] for K directions.
    """
    stacked = stack_directions(model, directions)
    loss_fn = resolve_loss(loss)
    batch = inputs.shape[0]
    if batch == 0:
        out = inputs.new_zeros((0, stacked.k), dtype=next(iter(stacked.tensors.values())).dtype)
        return out[:, 0] if stacked.single else out
    concrete = dispatch.resolve_model_impl(impl, model, list(stacked.tensors), inputs.device, allow_jvp=True)
    if concrete == "reference":
        _check_no_batch_coupling(model)
        _validate_labels(model, inputs, labels, loss)
        s = oracle.grad_dot_reference(model, inputs, labels, stacked.tensors, loss_fn, chunk_size)
    elif concrete == "jvp":
        _validate_labels(model, inputs, labels, loss)
        s = grad_dot_jvp(model, inputs, labels, stacked.tensors, loss_fn)
    else:
        s = _chunked(lambda: Capture(model, stacked.tensors, concrete), lambda cap: cap.grad_dot(None, "sum"),
                     model, inputs, labels, loss, loss_fn, chunk_size)
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

    The self-influence score (METHOD.md 2e). impl: "auto", "reference", or a hook impl
    ("torch", "cpu", "cuda", "triton"); "jvp" would need one pass per parameter and is refused.
    """
    names = list(params) if params is not None else list(trainable_parameters(model))
    unknown = sorted(set(names) - set(dict(model.named_parameters())))
    if unknown:
        raise ValueError(f"params names parameters the model does not have: {unknown}")
    loss_fn = resolve_loss(loss)
    if inputs.shape[0] == 0:
        return inputs.new_zeros(0)
    if impl == "jvp":
        raise dispatch.ImplUnavailableError("grad_norm_sq: impl='jvp' needs one pass per parameter; use 'reference' "
                                             "or a hook impl")
    concrete = dispatch.resolve_model_impl(impl, model, names, inputs.device, allow_jvp=False)
    if concrete == "reference":
        _check_no_batch_coupling(model)
        _validate_labels(model, inputs, labels, loss)
        return oracle.grad_norm_sq_reference(model, inputs, labels, names, loss_fn, chunk_size)
    return _chunked(lambda: Capture(model), lambda cap: cap.grad_norm_sq(names, "sum", concrete), model, inputs,
                    labels, loss, loss_fn, chunk_size)


# -------------------------------------------------------------------------------------------------

def _check_no_batch_coupling(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if couples_samples(m):
            raise UnsupportedLayerError(
                f"impl='reference' runs each sample alone, but {name} ({type(m).__name__}) is in training mode and "
                "couples samples through batch statistics; use impl='jvp' or model.eval()")


def _validate_labels(model, inputs, labels, loss) -> None:
    if callable(loss):
        if labels.shape[0] != inputs.shape[0]:
            raise ValueError(f"labels have {labels.shape[0]} rows but inputs have {inputs.shape[0]}")
        return
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # a probe forward must not touch running stats
    with torch.no_grad():
        shape = torch.func.functional_call(model, buffers, (inputs[:1],), strict=False).shape
    check_labels(loss, torch.Size((inputs.shape[0], *shape[1:])), labels, inputs.shape[0])


def _chunked(make_capture, query, model, inputs, labels, loss, loss_fn, chunk_size):
    """Run forward + backward of sum_i loss_i under a capture per chunk; concatenate query results.
    Dots stream inside the backward (the capture is built with the directions); norms read after it."""
    step = inputs.shape[0] if not chunk_size else int(chunk_size)
    parts = []
    for start in range(0, inputs.shape[0], step):
        x, y = inputs[start:start + step], labels[start:start + step]
        cap = make_capture()
        with torch.enable_grad(), cap:
            out = model(x)
            if not callable(loss):
                check_labels(loss, out.shape, y, x.shape[0])
            losses = loss_fn(out, y)
            if losses.shape != (x.shape[0],):
                raise ValueError(f"loss must return per-sample losses of shape [{x.shape[0]}], got {tuple(losses.shape)}")
            wrt = cap.gradient_inputs()
            if not wrt:
                raise RuntimeError("no supported layer with trainable parameters ran in the forward")
            torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
        parts.append(query(cap))
    return torch.cat(parts, dim=0)
