"""Forward-mode scores: s = J v, the forward-mode derivative of the per-sample loss vector along v.

About two to three forwards per direction and no backward. Works for any layer, including train-mode
BatchNorm, where d loss_i / d theta along v flows through the batch statistics (the batch-coupled
meaning). Uses torch.autograd.forward_ad dual numbers (eager, so in-place buffer updates of
train-mode BatchNorm work). Buffers are cloned so the caller's running statistics are never touched.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

__all__ = ["grad_dot_jvp"]


def grad_dot_jvp(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    directions: Mapping[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """[B, K] per-sample directional derivatives; ``directions`` maps names to [K, *param.shape]."""
    names = list(directions)
    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in names}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    k = next(iter(directions.values())).shape[0]
    directions = _zero_padding_rows(model, directions)

    columns = []
    for j in range(k):
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(primals[n], directions[n][j].to(primals[n].dtype)) for n in names}
            out = functional_call(model, {**duals, **buffers}, (inputs,), strict=False)
            column = fwAD.unpack_dual(loss_fn(out, labels)).tangent
        columns.append(column if column is not None else torch.zeros(inputs.shape[0], dtype=out.dtype, device=out.device))
    return torch.stack(columns, dim=1)


def _zero_padding_rows(model: torch.nn.Module, directions: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Autograd gives an Embedding's padding row no gradient; forward mode must agree, so drop v there."""
    out = dict(directions)
    for mod_name, mod in model.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(mod, torch.nn.Embedding) and mod.padding_idx is not None and name in out:
            v = out[name].clone()
            v[:, mod.padding_idx] = 0
            out[name] = v
    return out
