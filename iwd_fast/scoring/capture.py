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
    output: Optional[torch.Tensor] = None  # never kept: an output alive until the backward costs its memory
    streamed: bool = False  # its tensors were released after its streamed terms were folded in
    dot_done: bool = False
    norm_done: bool = False


@dataclass
class _Weighting:
    """weighted_gradient's state during its backward: per-sample factors and the gradients so far."""

    factors: torch.Tensor                              # [B] c_i = w_i / sum_j w_j
    grads: Dict[int, torch.Tensor]                     # id(parameter) -> sum_i c_i dL_i/dparam


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
        self._weighting: Optional[_Weighting] = None   # set while weighted_gradient runs its backward
        self._unweighted_sum = False                   # the captured gradients are those of sum_i loss_i
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
            if self._weighting is not None:
                self._accumulate_weighted(call.module, Record(rec.x, grad.detach()))
            if self._stream is not None and self._stream.wants(call.module):
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
            if any(c.record.delta is None for c in group):
                return  # another call of this module still waits for its gradient
            term = rule_for(call.module).norm_sq(call.module, [c.record for c in group], st.norms[mid][1], st.ops)
            st.norm_total = term if st.norm_total is None else st.norm_total + term
            for c in group:
                c.norm_done = True
        for c in group:
            if c.dot_done or mid not in st.dots:
                c.record.x, c.record.delta, c.streamed = None, None, True

    def _accumulate_weighted(self, module: nn.Module, rec: Record) -> None:
        """Fold one call's weighted parameter gradient (rebuilt from its unweighted output gradient) in."""
        wt = self._weighting
        params = dict(module.named_parameters(recurse=False))
        for local, g in rule_for(module).weighted_grad(module, rec, wt.factors).items():
            key = id(params[local])
            wt.grads[key] = g if key not in wt.grads else wt.grads[key] + g

    def weighted_gradient(self, losses: torch.Tensor, weights: Optional[torch.Tensor],
                          params: Sequence[torch.Tensor]) -> tuple:
        """The gradient of the weighted mean loss sum_i w_i loss_i / sum_j w_j w.r.t. ``params``, from ONE
        backward of the unweighted per-sample losses; the capture keeps their unweighted gradients.

        This is the real side of a gradient-matching step in one call: it replaces
        ``torch.autograd.grad(weighted_loss, params)``, and afterwards ``grad_dot`` / ``grad_norm_sq`` score
        the unweighted per-sample losses without any ``sample_weights`` (none may be given). No score
        divides by a weight, so zero weights (a cold temperature) are fine.

        Args:
            losses: per-sample losses [B] of the batch whose forward ran inside this capture.
            weights: [B] non-negative, finite, not all zero (any scale; normalised here); None = uniform.
            params: the parameters to differentiate, e.g. ``list(net.parameters())``; each must belong to
                a module with a per-layer rule that ran in the forward.
        Returns:
            A tuple of gradients aligned with ``params`` (like ``torch.autograd.grad``), detached.
        """
        if losses.dim() != 1:
            raise ValueError(f"weighted_gradient: losses must be per-sample [B], got shape {tuple(losses.shape)}")
        b = losses.shape[0]
        if weights is None:
            factors = torch.full((b,), 1.0 / max(b, 1), dtype=losses.dtype, device=losses.device)
        else:
            w = torch.as_tensor(weights).detach().to(losses.device, losses.dtype)
            if w.shape != (b,):
                raise ValueError(f"weighted_gradient: weights must have shape [{b}], got {tuple(w.shape)}")
            bad = ~torch.isfinite(w) | (w < 0)
            if bool(bad.any()):
                raise ValueError(f"weighted_gradient: negative or non-finite weights at indices {format_indices(bad)}")
            total = w.sum()
            if not bool(total > 0):
                raise ValueError("weighted_gradient: all weights are zero")
            factors = w / total
        owners = param_owners(self.model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        unknown = [i for i, p in enumerate(params) if id(p) not in names]
        if unknown:
            raise ValueError(f"weighted_gradient: params {unknown} are not parameters of the captured model")
        self._modules_for([names[id(p)] for p in params])  # refuses modules without a rule, by name
        if not self.calls:
            raise RuntimeError("weighted_gradient: nothing was captured: run the forward inside the capture block")
        self._weighting = _Weighting(factors, {})
        try:
            wrt = self.gradient_inputs()
            torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
            grads = self._weighting.grads
        finally:
            self._weighting = None
        self._unweighted_sum = True
        missing = [names[id(p)] for p in params if id(p) not in grads]
        if missing:
            called = {id(c.module) for c in self.calls}
            idle = [n for n in missing if not any(id(o.module) in called for o in owners[n])]
            raise RuntimeError(f"weighted_gradient: no gradient reached parameters {missing}"
                               + (f" (their modules did not run in the forward: {idle})" if idle else ""))
        return tuple(grads[id(p)] for p in params)

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
                term = _call_dot(owner.module, self._rescaled(rec, scale), v, ops)
                total = term if total is None else total + term
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
            recs = [self._rescaled(r, scale) for r in self._records(owner)]
            term = rule_for(owner.module).norm_sq(owner.module, recs, [local for _, local in pairs], ops)
            total = term if total is None else total + term
        return total

    def _streamed_dots(self, sample_weights: SampleWeights) -> torch.Tensor:
        st = self._stream
        if st is None or st.stacked is None:
            raise ValueError("grad_dot() without directions reads streamed scores: pass directions to capture()")
        self._check_streamed(st.dots, st.dot_total, lambda c: c.dot_done)
        total = st.dot_total
        scale = self._inverse(sample_weights, total.shape[0], total.device)
        if scale is not None:
            total = total * scale.to(total.dtype).unsqueeze(1)
        return total[:, 0] if st.stacked.single else total

    def _streamed_norms(self, params: Optional[Sequence[str]], sample_weights: SampleWeights) -> torch.Tensor:
        if params is not None and sorted(params) != sorted(self._norm_names):
            raise ValueError(f"this capture streamed the norms of {sorted(self._norm_names)}; got params "
                             f"{sorted(params)}: capture with norm_sq=<those names>")
        st = self._stream
        self._check_streamed(st.norms, st.norm_total, lambda c: c.norm_done)
        total = st.norm_total
        scale = self._inverse(sample_weights, total.shape[0], total.device)
        return total if scale is None else total * scale.to(total.dtype).pow(2)

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
        """Factors undoing the differentiated loss's per-sample weights (none after weighted_gradient)."""
        if self._unweighted_sum:
            if sample_weights is not None and not (isinstance(sample_weights, str) and sample_weights == "sum"):
                raise ValueError("sample_weights: this capture's backward ran through weighted_gradient, on the "
                                 "unweighted per-sample losses; its scores need no sample_weights")
            return None
        return _inverse_sample_weights(sample_weights, batch, device)

    @staticmethod
    def _rescaled(rec: Record, scale: Optional[torch.Tensor]) -> Record:
        if scale is None:
            return rec
        shape = (-1,) + (1,) * (rec.delta.dim() - 1)
        return Record(rec.x, rec.delta * scale.to(rec.delta.dtype).reshape(shape))


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
                         f"bad indices: {bad.nonzero().flatten().tolist()[:10]}")
    return 1.0 / w.to(torch.float64)


def capture(model: nn.Module, directions: Optional[Directions] = None, impl: str = "auto",
            norm_sq: Union[bool, Sequence[str]] = False) -> Capture:
    """Record what ``model``'s supported layers see during forward and backward; see :class:`Capture`.

    With ``directions`` the dots, with ``norm_sq`` (True or parameter names) the squared per-sample
    norms, are computed during the backward (streaming, lowest memory)."""
    return Capture(model, directions, impl, norm_sq)
