"""``capture(model)``: record layer inputs and output gradients during a backward the caller runs.

    with iwd_fast.capture(net) as cap:
        loss = F.cross_entropy(net(x_real), y_real)          # mean over the batch
        g_real = torch.autograd.grad(loss, params)            # the DC loop's own backward
    scores = cap.grad_dot(directions)                         # [B]: <grad loss_i, v>, unweighted

Every forward run inside the ``with`` block counts as part of the differentiated loss (a module called
twice contributes both calls). Run only the real batch inside it.

Streaming (``capture(net, directions=v)`` and/or ``capture(net, norm_sq=True)``): the dots, and the
squared norms, are folded into running [B, K] / [B] totals inside the backward as each layer's output
gradient arrives, and the layer's tensors are released at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from . import dispatch
from .checks import format_indices
from .losses import weighted_mean
from .params import (Directions, StackedDirections, group_by_module, param_owners, stack_directions,
                     trainable_parameters)
from .rules import Record, UnsupportedLayerError, rule_for

__all__ = ["Capture", "capture"]

SampleWeights = Union[None, str, torch.Tensor]


@dataclass
class _Call:
    module: nn.Module
    record: Record
    edge: Optional[GradientEdge]  # where the output's gradient enters the graph (holds no activation)
    arrivals: int = 0  # backward passes whose gradient reached this call's output
    streamed: bool = False  # its tensors were released after its streamed terms were folded in
    dot_done: bool = False
    norm_done: bool = False


@dataclass
class _Stream:
    """Streaming state: what each module contributes and the running totals.

    ``dots``: id(module) -> (owner, {local name: [K, ...]}); ``norms``: id(module) -> (owner, [local names]).
    """

    impl: str
    stacked: Optional[StackedDirections]
    dots: Dict[int, Tuple[object, Dict[str, torch.Tensor]]]
    norms: Dict[int, Tuple[object, List[str]]]
    ops: Optional[SimpleNamespace] = None
    dot_total: Optional[torch.Tensor] = None
    norm_total: Optional[torch.Tensor] = None

    def wants(self, module: nn.Module) -> bool:
        return id(module) in self.dots or id(module) in self.norms


class Capture:
    """Context manager recording (input, output gradient) of every supported layer of ``model``.

    Output gradients are caught by tensor hooks during any backward run after the forward
    (``loss.backward()`` or ``torch.autograd.grad``), so the caller's own backward feeds the scores.

    Streaming: with ``directions`` given up front, each layer's dot is computed inside the backward as
    soon as its output gradient arrives, and the layer's input and gradient are released at once, so
    the capture adds about one layer's temporaries to the peak memory instead of every layer's
    gradient. Read the scores with ``grad_dot()`` (no directions) after the backward. ``norm_sq=True``
    (or a list of parameter names) streams the squared per-sample gradient norms the same way: a
    module's norm is folded in once the gradients of all its calls have arrived; read them with
    ``grad_norm_sq()``.
    """

    def __init__(self, model: nn.Module, directions: Optional[Directions] = None, impl: str = "auto",
                 norm_sq: Union[bool, Sequence[str]] = False):
        self.model = model
        self.calls: List[_Call] = []
        self._handles: list = []
        self._stream: Optional[_Stream] = None
        self._carried: Optional[torch.Tensor] = None   # [B] factor each loss carried in weighted_gradient's backward
        self._deferred = False                         # a first backward pass is running: gather, do not stream yet
        self._passes = 1                               # passes whose gradients a streamed norm waits for
        self._norm_names: Optional[List[str]] = None
        if directions is None and not norm_sq:
            return
        stacked, dots, norms = None, {}, {}
        if directions is not None:
            stacked = stack_directions(model, directions)
            dots = {mid: (owner, {local: stacked.tensors[name] for name, local in pairs})
                    for mid, (owner, pairs) in self._modules_for(list(stacked.tensors)).items()}
        if norm_sq:
            self._norm_names = self._checked_norm_names(None if norm_sq is True else norm_sq)
            norms = {mid: (owner, [local for _, local in pairs])
                     for mid, (owner, pairs) in self._modules_for(self._norm_names).items()}
        self._stream = _Stream(impl, stacked, dots, norms)

    # ---------------------------------------------------------------- recording
    def __enter__(self) -> "Capture":
        self.calls = []
        for module in self.model.modules():
            if rule_for(module) is not None and any(True for _ in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_hook(self._on_forward))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_forward(self, module: nn.Module, inputs, output) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        call = _Call(module, Record(x=inputs[0].detach()), get_gradient_edge(output))
        self.calls.append(call)

        def keep(grad: torch.Tensor, call: _Call = call) -> None:
            rec = call.record
            rec.delta = grad.detach() if rec.delta is None else rec.delta + grad.detach()
            call.edge = None
            call.arrivals += 1
            if self._stream is not None and not self._deferred and self._stream.wants(call.module):
                self._consume(call)

        output.register_hook(keep)

    def _consume(self, call: _Call) -> None:
        """Streaming: fold this call's dot (and, once every call of its module has its gradient, the
        module's squared norm) into the running totals, then release the tensors no longer needed."""
        st, mid = self._stream, id(call.module)
        if st.ops is None:
            st.ops = dispatch.layer_ops(st.impl, call.record.x.device)
        if mid in st.dots and not call.dot_done:
            term = _call_dot(call.module, call.record, st.dots[mid][1], st.ops)
            st.dot_total = term if st.dot_total is None else st.dot_total + term
            call.dot_done = True
        group = [call]
        if mid in st.norms:
            group = [c for c in self.calls if c.module is call.module and not c.norm_done]
            if any(c.arrivals < self._passes for c in group):
                return  # another call of this module still waits for its gradient
            term = rule_for(call.module).norm_sq(call.module, [c.record for c in group], st.norms[mid][1], st.ops)
            st.norm_total = term if st.norm_total is None else st.norm_total + term
            for c in group:
                c.norm_done = True
        for c in group:
            if c.dot_done or mid not in st.dots:
                c.record.x, c.record.delta, c.streamed = None, None, True

    def weighted_gradient(self, losses: torch.Tensor, weights: Optional[torch.Tensor],
                          params: Sequence[torch.Tensor]) -> tuple:
        """The gradient of the weighted mean loss sum_i w_i loss_i / sum_j w_j w.r.t. ``params``, computed by
        autograd's own backward of that loss (``losses.weighted_mean``, the expression the unscored path
        differentiates: the gradient is bitwise the one ``torch.autograd.grad(weighted_loss, params)`` gives).

        The layer hooks see c_i * delta_i (c_i = w_i / sum_j w_j); every score is linear in delta_i (norms
        quadratic), so ``grad_dot`` / ``grad_norm_sq`` divide the per-sample results by c_i (c_i^2) and score
        the unweighted per-sample losses without any ``sample_weights`` (none may be given). Instances whose
        factor is too small to divide out (zero weights, or weights that underflow) are scored by a first
        backward of their own losses to the layer outputs only (no parameter gradient).

        Args:
            losses: per-sample losses [B] of the batch whose forward ran inside this capture.
            weights: [B] non-negative, finite, not all zero (any scale); None = uniform (the plain mean).
            params: the tensors to differentiate (any parameters of the graph; scoring needs per-layer rules
                only for the layers it scores).
        Returns:
            A tuple of gradients aligned with ``params`` (like ``torch.autograd.grad``), detached.
        """
        if losses.dim() != 1:
            raise ValueError(f"weighted_gradient: losses must be per-sample [B], got shape {tuple(losses.shape)}")
        b = losses.shape[0]
        w = None if weights is None else _checked_weights(weights, b, losses)
        if not self.calls:
            raise RuntimeError("weighted_gradient: nothing was captured: run the forward inside the capture block")
        carried = torch.full((b,), 1.0 / max(b, 1), dtype=torch.float64, device=losses.device) if w is None else \
            w.double() / w.double().sum()
        small = carried < _divisible_factor(losses.dtype)
        if bool(small.any()):  # their deltas would arrive (almost) zero: take them from their own losses first
            self._deferred, self._passes = True, 2
            try:
                torch.autograd.grad((losses * small.to(losses.dtype)).sum(), self.gradient_inputs(),
                                    retain_graph=True, allow_unused=True)
            finally:
                self._deferred = False
            carried = carried + small.double()
        params = list(params)
        grads = torch.autograd.grad(weighted_mean(losses, w), params, allow_unused=True)
        self._carried = carried
        missing = [i for i, g in enumerate(grads) if g is None]
        if missing:
            names = {id(p): n for n, p in self.model.named_parameters()}
            raise RuntimeError(f"weighted_gradient: no gradient reached {[names.get(id(params[i]), i) for i in missing]}: "
                               "they do not enter the losses")
        return tuple(g.detach() for g in grads)

    def score_backward(self, losses: torch.Tensor) -> None:
        """One backward of the per-sample ``losses`` [B] to the recorded layer outputs only: the scores of the
        unweighted losses (``grad_dot`` / ``grad_norm_sq``, no ``sample_weights``) without any parameter
        gradient, for loops that need none (DM embeds its real batch without a backward)."""
        if losses.dim() != 1:
            raise ValueError(f"score_backward: losses must be per-sample [B], got shape {tuple(losses.shape)}")
        if not self.calls:
            raise RuntimeError("score_backward: nothing was captured: run the forward inside the capture block")
        torch.autograd.grad(losses.sum(), self.gradient_inputs(), allow_unused=True)
        self._carried = torch.ones(losses.shape[0], dtype=torch.float64, device=losses.device)

    def gradient_inputs(self) -> List[GradientEdge]:
        """What to differentiate a loss with respect to so that every hook fires, at the least cost:
        the gradient edges of the recorded outputs (``torch.autograd.grad(loss, cap.gradient_inputs())``).

        No parameter gradient is computed, and no output is kept alive for it (an edge names the graph
        node, not the tensor). An output modified in place later (an in-place ReLU) still gets the
        gradient of the value its layer produced: the edge and the tensor hook both point there.
        """
        return [c.edge for c in self.calls if c.edge is not None]

    # ---------------------------------------------------------------- queries
    def grad_dot(self, directions: Optional[Directions] = None, sample_weights: SampleWeights = None,
                 impl: str = "auto") -> torch.Tensor:
        """Per-sample <grad_theta loss_i, v_k> of the UNWEIGHTED per-sample losses.

        Args:
            directions: {param_name: [*shape] or [K, *shape]} or a list of K such dicts; None reads the
                streamed scores of the directions given to the constructor.
            sample_weights: the factor each per-sample loss carried in the differentiated loss:
                None or "mean" (1/B, the default), "sum" (1), or a tensor [B] (e.g. w_i / sum(w)).
            impl: "auto" | "torch" | "cpu" | "cuda" | "triton".
        Returns:
            [B] for one direction, [B, K] for K.
        """
        if directions is None:
            return self._streamed_dots(sample_weights)
        stacked = stack_directions(self.model, directions)
        grouped = self._modules_for(list(stacked.tensors))
        ops, scale = self._prepare(impl, sample_weights)
        total = None
        for owner, pairs in grouped.values():
            v = {local: stacked.tensors[name] for name, local in pairs}
            for rec in self._records(owner):
                term = _call_dot(owner.module, rec, v, ops)
                total = term if total is None else total + term
        total = _unscaled(total, scale, 1)
        return total[:, 0] if stacked.single else total

    def grad_norm_sq(self, params: Optional[Sequence[str]] = None, sample_weights: SampleWeights = None,
                     impl: str = "auto") -> torch.Tensor:
        """Per-sample ||grad_theta loss_i||^2 over ``params`` (default: every trainable parameter), [B].

        Linear and convolution weights choose per layer between the ghost form and materialising
        (METHOD.md section 3). Tied parameters (one tensor in several modules) are refused. On a capture
        built with ``norm_sq=...`` this reads the streamed norms (``params`` None or the same names).
        """
        if self._norm_names is not None:
            return self._streamed_norms(params, sample_weights)
        names = self._checked_norm_names(params)
        grouped = self._modules_for(names)
        ops, scale = self._prepare(impl, sample_weights)
        total = None
        for owner, pairs in grouped.values():
            term = rule_for(owner.module).norm_sq(owner.module, self._records(owner), [local for _, local in pairs], ops)
            total = term if total is None else total + term
        return _unscaled(total, scale, 2)

    def _streamed_dots(self, sample_weights: SampleWeights) -> torch.Tensor:
        st = self._stream
        if st is None or st.stacked is None:
            raise ValueError("grad_dot() without directions reads streamed scores: pass directions to capture()")
        self._check_streamed(st.dots, st.dot_total, lambda c: c.dot_done)
        total = _unscaled(st.dot_total, self._inverse(sample_weights, st.dot_total.shape[0], st.dot_total.device), 1)
        return total[:, 0] if st.stacked.single else total

    def _streamed_norms(self, params: Optional[Sequence[str]], sample_weights: SampleWeights) -> torch.Tensor:
        if params is not None and sorted(params) != sorted(self._norm_names):
            raise ValueError(f"this capture streamed the norms of {sorted(self._norm_names)}; got params "
                             f"{sorted(params)}: capture with norm_sq=<those names>")
        st = self._stream
        self._check_streamed(st.norms, st.norm_total, lambda c: c.norm_done)
        return _unscaled(st.norm_total, self._inverse(sample_weights, st.norm_total.shape[0], st.norm_total.device), 2)

    def _check_streamed(self, modules, total, done) -> None:
        pending = [c for c in self.calls if id(c.module) in modules and not done(c)]
        if not self.calls or pending or total is None:
            names = sorted({o.module_name or "<root>" for o, _ in modules.values()})
            raise RuntimeError(f"no gradient reached the outputs of {names}: run the forward and the backward of "
                               "the real-batch loss inside the capture block")

    def _checked_norm_names(self, params: Optional[Sequence[str]]) -> List[str]:
        names = list(params) if params is not None else list(trainable_parameters(self.model))
        if not names:
            raise ValueError("grad_norm_sq: no parameters to score (the model's parameters are all frozen)")
        owners = param_owners(self.model)
        unknown = sorted(n for n in names if n not in owners)
        if unknown:
            raise ValueError(f"grad_norm_sq: params names parameters the model does not have: {unknown}")
        tied = [n for n in names if len(owners[n]) > 1]
        if tied:
            raise UnsupportedLayerError(f"grad_norm_sq: tied parameters {tied} are not supported")
        return names

    # ---------------------------------------------------------------- helpers
    def _modules_for(self, names: Sequence[str]):
        grouped = group_by_module(names, param_owners(self.model))
        for owner, pairs in grouped.values():
            rule = rule_for(owner.module)
            label = owner.module_name or "<root>"
            if rule is None:
                raise UnsupportedLayerError(
                    f"module {label!r} ({type(owner.module).__name__}) holds parameters {[n for n, _ in pairs]} "
                    "but has no per-layer rule; use impl='jvp' or impl='reference' through iwd_fast.grad_dot")
            rule.check(label, owner.module)
        return grouped

    def _records(self, owner) -> List[Record]:
        calls = [c for c in self.calls if c.module is owner.module]
        recs = [c.record for c in calls]
        label = owner.module_name or "<root>"
        if any(c.streamed for c in calls):
            raise RuntimeError(f"module {label!r}: this capture streamed its dots and released the layer's tensors; "
                               "call grad_dot() without directions, or capture without directions")
        if not recs:
            raise RuntimeError(f"module {label!r} was not called with gradients enabled inside the capture block")
        missing = [i for i, r in enumerate(recs) if r.delta is None]
        if missing:
            raise RuntimeError(f"no gradient reached the output of module {label!r} (calls {missing}): run the "
                               "backward of the real-batch loss before querying the capture")
        batches = {c.record.x.shape[0] for c in self.calls if c.record.x is not None}
        if len(batches) > 1:
            raise RuntimeError(f"the capture recorded calls with different batch sizes {sorted(batches)}: "
                               "run only one batch's forward inside the capture block")
        return recs

    def _prepare(self, impl: str, sample_weights: SampleWeights):
        if not self.calls:
            raise RuntimeError("nothing was captured: run the forward and backward inside `with capture(model)`")
        first = next((c.record.x for c in self.calls if c.record.x is not None), None)
        if first is None:
            raise RuntimeError("this capture streamed its dots and released every layer's tensors; call grad_dot() "
                               "without directions")
        device, batch = first.device, first.shape[0]
        ops = dispatch.layer_ops(impl, device)
        return ops, self._inverse(sample_weights, batch, device)

    def _inverse(self, sample_weights: SampleWeights, batch: int, device) -> Optional[torch.Tensor]:
        """[B] factors undoing the per-sample weights the differentiated loss gave the captured gradients:
        after ``weighted_gradient`` its own (no ``sample_weights`` accepted), else the caller's."""
        if self._carried is not None:
            if sample_weights is not None:
                raise ValueError("sample_weights: this capture's backward ran through weighted_gradient, which "
                                 "knows the weights; its scores are those of the unweighted losses already")
            return 1.0 / self._carried
        return _inverse_sample_weights(sample_weights, batch, device)


def _unscaled(total: torch.Tensor, scale: Optional[torch.Tensor], power: int) -> torch.Tensor:
    """Per-sample results [B] or [B, K] of scaled output gradients, turned into those of the unweighted
    losses: dots are linear in a sample's output gradient (power 1), squared norms quadratic (power 2)."""
    if scale is None:
        return total
    s = scale.to(total.dtype)
    s = s if total.dim() == 1 else s.unsqueeze(1)
    for _ in range(power):
        total = total * s
    return total


def _divisible_factor(dtype: torch.dtype) -> float:
    """The smallest loss factor c a captured c * delta can be divided by without precision loss: the cube root
    of the dtype's smallest normal number (float32 2.3e-13; c^-2 then stays far from overflow)."""
    return torch.finfo(dtype).tiny ** (1.0 / 3.0) if dtype.is_floating_point else 0.0


def _checked_weights(weights: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Weights [B] on ``like``'s device and dtype: non-negative, finite, not all zero (named indices)."""
    w = torch.as_tensor(weights).detach().to(like.device, like.dtype)
    if w.shape != (batch,):
        raise ValueError(f"weighted_gradient: weights must have shape [{batch}], got {tuple(w.shape)}")
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        raise ValueError(f"weighted_gradient: negative or non-finite weights at indices {format_indices(bad)}")
    if not bool(w.sum() > 0):
        raise ValueError("weighted_gradient: all weights are zero")
    return w


def _call_dot(module: nn.Module, rec: Record, v, ops) -> torch.Tensor:
    """[B, K] dot of one recorded call of ``module`` with its directions ``v`` {local name: [K, *shape]}."""
    dtype = rec.x.dtype if rec.x.is_floating_point() else rec.delta.dtype  # Embedding inputs are indices
    return rule_for(module).dot(module, rec, {k: t.to(dtype) for k, t in v.items()}, ops)


def _inverse_sample_weights(sample_weights: SampleWeights, batch: int, device) -> Optional[torch.Tensor]:
    """[B] factors that turn captured output gradients into those of the unweighted per-sample losses."""
    if sample_weights is None or (isinstance(sample_weights, str) and sample_weights == "mean"):
        return torch.full((batch,), float(batch), device=device, dtype=torch.float64)
    if isinstance(sample_weights, str):
        if sample_weights == "sum":
            return None
        raise ValueError(f"sample_weights must be None, 'mean', 'sum' or a tensor [B], got {sample_weights!r}")
    w = torch.as_tensor(sample_weights, device=device)
    if w.shape != (batch,):
        raise ValueError(f"sample_weights must have shape [{batch}], got {tuple(w.shape)}")
    bad = (~torch.isfinite(w)) | (w == 0)
    if bad.any():
        raise ValueError(f"sample_weights must be finite and non-zero (a zero weight hides that sample's gradient); "
                         f"bad indices: {format_indices(bad)}")
    return 1.0 / w.to(torch.float64)


def capture(model: nn.Module, directions: Optional[Directions] = None, impl: str = "auto",
            norm_sq: Union[bool, Sequence[str]] = False) -> Capture:
    """Record what ``model``'s supported layers see during forward and backward; see :class:`Capture`.

    With ``directions`` the dots, with ``norm_sq`` (True or parameter names) the squared per-sample
    norms, are computed during the backward (streaming, lowest memory)."""
    return Capture(model, directions, impl, norm_sq)
