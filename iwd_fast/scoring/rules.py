"""Per-layer rules: from what a layer saw (input, output gradient) to per-sample dots and norms.

A rule knows one family of modules. Given the records of every call of a module during a forward
(its input ``x`` and the gradient ``delta`` of the sum of per-sample losses at its output), it returns

* ``dot``:     [B, K] per-sample <dL_i/dtheta_module, V_k>, summed over calls (the gradient is linear);
* ``norm_sq``: [B]    per-sample ||dL_i/dtheta_module||^2 restricted to some of its parameters.

Both are linear (norms quadratic) in a sample's output gradient, so a loss that weighted sample i by c_i
gives c_i (c_i^2) times the unweighted result (``Capture`` divides it out).

The heavy products go through ``ops`` (a backend: the eager formulas in ``reference`` or a kernel
backend with the same signatures). Rules never run a layer's parameters through autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import eager_ops

__all__ = ["Record", "UnsupportedLayerError", "rule_for", "couples_samples", "sample_slices", "SUPPORTED_TYPES"]


class UnsupportedLayerError(ValueError):
    """A module whose per-sample gradient the hook path cannot express."""


@dataclass
class Record:
    """One call of a module: its input and the (rescaled) gradient at its output."""

    x: torch.Tensor
    delta: Optional[torch.Tensor] = None


def couples_samples(module: nn.Module) -> bool:
    """True for a layer whose output for one sample depends on the others (BatchNorm on batch statistics)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


class _Rule:
    types: tuple = ()

    def check(self, name: str, module: nn.Module) -> None:
        """Raise UnsupportedLayerError if this configuration of the module is not supported."""

    def dot(self, module: nn.Module, rec: Record, v: Dict[str, torch.Tensor], ops) -> torch.Tensor:
        raise NotImplementedError

    def norm_sq(self, module: nn.Module, recs: Sequence[Record], names: Sequence[str], ops) -> torch.Tensor:
        raise NotImplementedError


def _batch(t: torch.Tensor) -> int:
    return t.shape[0]


_MIN_TEMP_BYTES = 4 << 20  # below this a rule's per-layer temporaries are not split


def sample_slices(batch: int, per_sample_bytes: int, live_bytes: int) -> List[slice]:
    """Split a batch so that one slice's temporaries stay within a quarter of ``live_bytes`` (the bytes
    of the layer's output gradient, already alive) or 4 MiB, whichever is larger: a rule then adds a
    bounded amount to the peak memory whatever the layer's unfold or per-sample-gradient size."""
    budget = max(_MIN_TEMP_BYTES, live_bytes // 4)
    step = max(1, min(batch, budget // max(1, per_sample_bytes)))
    return [slice(i, i + step) for i in range(0, batch, step)] or [slice(0, 0)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LinearRule(_Rule):
    types = (nn.Linear,)

    @staticmethod
    def _flat(module, rec):
        if rec.x.dim() < 2:
            raise UnsupportedLayerError("Linear called on an unbatched 1-D input")
        b = _batch(rec.x)
        return rec.x.reshape(b, -1, module.in_features), rec.delta.reshape(b, -1, module.out_features)

    def dot(self, module, rec, v, ops):
        a, d = self._flat(module, rec)
        out = 0
        if "weight" in v:
            out = out + ops.linear_dot(a, v["weight"], d)
        if "bias" in v:
            out = out + ops.affine_dot(d.transpose(1, 2), v["bias"])
        return out

    def norm_sq(self, module, recs, names, ops):
        flat = [self._flat(module, r) for r in recs]
        a, d = (t[0] if len(t) == 1 else torch.cat(t, dim=1) for t in zip(*flat))  # calls join along positions
        out = 0
        if "weight" in names:
            t, din, p = a.shape[1], a.shape[2], d.shape[2]
            method = eager_ops.choose_norm_method(t, din, p)
            per_sample = (2 * t * t if method == "ghost" else p * din) * d.element_size()
            out = out + torch.cat([ops.linear_grad_norm_sq(a[sl], d[sl], method)
                                   for sl in sample_slices(a.shape[0], per_sample, _nbytes(d))])
        if "bias" in names:
            out = out + d.sum(dim=1).pow(2).sum(dim=1)
        return out



class ConvRule(_Rule):
    types = (nn.Conv1d, nn.Conv2d)

    def check(self, name, module):
        if isinstance(module.padding, str) and module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in total):
                raise UnsupportedLayerError(f"{name}: padding='same' with an even receptive field pads asymmetrically")

    @staticmethod
    def _geometry(module, x):
        """Explicit zero padding: returns (x padded for non-zero padding modes, padding ints)."""
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            return x, (0,) * len(module.kernel_size)
        if isinstance(module.padding, str):
            if module.padding == "valid":
                return x, (0,) * len(module.kernel_size)
            return x, tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
        return x, tuple(module.padding)

    def dot(self, module, rec, v, ops):
        out = 0
        if "weight" in v:
            x, padding = self._geometry(module, rec.x)
            out = out + ops.conv_dot(x, v["weight"], rec.delta, tuple(module.stride), padding,
                                     tuple(module.dilation), module.groups)
        if "bias" in v:
            out = out + ops.affine_dot(rec.delta.flatten(2), v["bias"])
        return out

    def norm_sq(self, module, recs, names, ops):
        out = 0
        if "weight" in names:
            # The unfolded input is kernel-area times the input: build it one slice of samples at a time.
            positions = sum(r.delta[0].numel() // r.delta.shape[1] for r in recs)
            cols_per_sample = positions * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            per_sample = 2 * cols_per_sample * module.groups * recs[0].delta.element_size()
            live = sum(_nbytes(r.delta) for r in recs)
            out = out + torch.cat([self._weight_norm_sq(module, recs, sl, ops)
                                   for sl in sample_slices(recs[0].delta.shape[0], per_sample, live)])
        if "bias" in names:
            out = out + sum(r.delta.flatten(2).sum(dim=2) for r in recs).pow(2).sum(dim=1)
        return out

    def _weight_norm_sq(self, module, recs, sl, ops):
        """[b] squared norms of the weight gradient for the samples ``sl`` (all calls of the module)."""
        g = module.groups
        cols, deltas = [], []
        for r in recs:
            x, padding = self._geometry(module, r.x[sl])
            cols.append(eager_ops.conv_unfold(x, module.kernel_size, module.stride, padding, module.dilation))
            deltas.append(r.delta[sl].flatten(2).transpose(1, 2))  # [b, T, Cout]
        a = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
        d = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
        cin_g, cout_g = a.shape[2] // g, d.shape[2] // g
        out = 0
        for j in range(g):
            a_j = a[:, :, j * cin_g:(j + 1) * cin_g]
            d_j = d[:, :, j * cout_g:(j + 1) * cout_g]
            method = eager_ops.choose_norm_method(a_j.shape[1], a_j.shape[2], d_j.shape[2])
            out = out + ops.linear_grad_norm_sq(a_j, d_j, method)
        return out


class NormRule(_Rule):
    """Affine parameters of GroupNorm, LayerNorm, InstanceNorm and eval-mode BatchNorm."""

    types = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)

    def check(self, name, module):
        if couples_samples(module):
            raise UnsupportedLayerError(
                f"{name} ({type(module).__name__}) normalises with batch statistics (training mode), which couple "
                "samples: a per-sample gradient is not defined. Use impl='jvp' (forward mode through the batch "
                "statistics) or call model.eval()")

    @staticmethod
    def _xhat_delta(module, rec):
        """Normalised input and output gradient as [B, C, P] (C = the affine parameter's numel)."""
        x, b = rec.x, _batch(rec.x)
        if isinstance(module, nn.LayerNorm):
            c = 1
            for s in module.normalized_shape:
                c *= s
            xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            return xhat.reshape(b, -1, c).transpose(1, 2), rec.delta.reshape(b, -1, c).transpose(1, 2)
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        elif module.running_mean is not None and not (module.training and isinstance(module, nn.modules.instancenorm._InstanceNorm)):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            xhat = (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
        else:
            xhat = F.instance_norm(x, eps=module.eps)
        return xhat.reshape(b, x.shape[1], -1), rec.delta.reshape(b, x.shape[1], -1)

    @staticmethod
    def _slices(recs):
        """Sample slices bounding the normalised input and its product with delta (each delta-sized)."""
        live = sum(_nbytes(r.delta) for r in recs)
        return sample_slices(recs[0].delta.shape[0], 2 * live // max(1, recs[0].delta.shape[0]), live)

    def dot(self, module, rec, v, ops):
        flat = {k: t.reshape(t.shape[0], -1) for k, t in v.items()}
        parts = []
        for sl in self._slices([rec]):
            xhat, d = self._xhat_delta(module, Record(rec.x[sl], rec.delta[sl]))
            parts.append(ops.affine_dot(d, flat.get("bias"), xhat if "weight" in flat else None, flat.get("weight")))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def norm_sq(self, module, recs, names, ops):
        parts = []
        for sl in self._slices(recs):
            g_w, g_b = 0, 0
            for r in recs:
                xhat, d = self._xhat_delta(module, Record(r.x[sl], r.delta[sl]))
                g_w = g_w + (xhat * d).sum(dim=2)
                g_b = g_b + d.sum(dim=2)
            out = 0
            if "weight" in names:
                out = out + g_w.pow(2).sum(dim=1)
            if "bias" in names:
                out = out + g_b.pow(2).sum(dim=1)
            parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class EmbeddingRule(_Rule):
    """Embedding tables: a gather, so every backend uses the eager formula."""

    types = (nn.Embedding,)

    def check(self, name, module):
        if module.scale_grad_by_freq:
            raise UnsupportedLayerError(f"{name}: Embedding(scale_grad_by_freq=True) scales by batch counts, coupling samples")

    def dot(self, module, rec, v, ops):
        b = _batch(rec.x)
        idx = rec.x.reshape(b, -1)
        d = rec.delta.reshape(b, idx.shape[1], -1)
        return eager_ops.embedding_dot(idx, v["weight"], d, module.padding_idx)

    def norm_sq(self, module, recs, names, ops):
        b = _batch(recs[0].x)
        idx = torch.cat([r.x.reshape(b, -1) for r in recs], dim=1)
        d = torch.cat([r.delta.reshape(b, r.x[0].numel(), -1) for r in recs], dim=1)
        if module.padding_idx is not None:
            d = d * (idx != module.padding_idx).unsqueeze(-1).to(d.dtype)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)  # [B, T, T]
        return (same * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))


_RULES: List[_Rule] = [LinearRule(), ConvRule(), NormRule(), EmbeddingRule()]
SUPPORTED_TYPES: tuple = tuple(t for r in _RULES for t in r.types)


def rule_for(module: nn.Module) -> Optional[_Rule]:
    """The rule for ``module``, or None when the hook path cannot handle it."""
    for rule in _RULES:
        if isinstance(module, rule.types) and _forward_is_torchs(module):
            return rule
    return None


def _forward_is_torchs(module: nn.Module) -> bool:
    """A subclass that overrides ``forward`` (LoRA, quantised layers, ...) computes something else: refuse it."""
    owner = next(c for c in type(module).__mro__ if "forward" in c.__dict__)
    return owner.__module__.startswith("torch.nn.modules")

