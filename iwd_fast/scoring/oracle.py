"""The model oracle: torch.func ``vmap(grad)``, materialising every per-sample gradient.

Slow and memory hungry, exact: the ``"reference"`` impl, against which every other path is tested.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence

import torch

__all__ = ["per_sample_grads", "grad_dot_reference", "grad_norm_sq_reference"]



def per_sample_grads(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    param_names: Sequence[str],
    chunk_size: int | None = None,
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients {name: [B, *param.shape]} of ``loss_fn`` for the named parameters.

    ``loss_fn(outputs [B, ...], labels [B, ...]) -> [B]`` is a per-sample loss; each sample is run
    through the model alone (batch of one), so layers that couple samples are not supported here.
    """
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if n in set(param_names)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one_loss(p, x, y):
        out = functional_call(model, {**frozen, **p, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    if inputs.shape[0] == 0:
        return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
    return vmap(grad(one_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, labels)


def grad_dot_reference(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    directions: Mapping[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[B, K] = <per-sample gradient, direction_k>; ``directions`` maps names to [K, *param.shape]."""
    grads = per_sample_grads(model, inputs, labels, loss_fn, list(directions), chunk_size)
    out = None
    for name, v in directions.items():
        g = grads[name].flatten(1).to(v.dtype)  # [B, P]
        term = g @ v.flatten(1).transpose(0, 1)  # [B, K]
        out = term if out is None else out + term
    return out


def grad_norm_sq_reference(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    param_names: Sequence[str],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[B] = ||per-sample gradient restricted to ``param_names``||^2."""
    grads = per_sample_grads(model, inputs, labels, loss_fn, param_names, chunk_size)
    total = inputs.new_zeros(inputs.shape[0], dtype=next(iter(grads.values())).dtype)
    for g in grads.values():
        total = total + g.flatten(1).pow(2).sum(dim=1)
    return total
