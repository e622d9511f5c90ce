"""Directions in parameter space: validation, stacking, and which module owns which parameter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checks import format_indices

# {name: tensor}, a list of K such dicts, a sequence of tensors aligned with the trainable parameters
# (what torch.autograd.grad returns; None entries contribute 0), or a list of K such sequences.
Directions = Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]],
                   Sequence[Optional[torch.Tensor]], Sequence[Sequence[Optional[torch.Tensor]]]]

__all__ = ["Directions", "StackedDirections", "stack_directions", "aligned_to_dict", "ParamOwner", "param_owners",
           "trainable_parameters", "group_by_module"]


@dataclass
class StackedDirections:
    """Directions keyed by parameter name, each [K, *param.shape]; ``single`` means the caller gave one."""

    tensors: Dict[str, torch.Tensor]
    k: int
    single: bool


@dataclass(frozen=True)
class ParamOwner:
    """A module that uses a parameter directly, and the parameter's name inside that module."""

    module_name: str
    module: torch.nn.Module
    local_name: str


def trainable_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def stack_directions(model: torch.nn.Module, directions: Directions) -> StackedDirections:
    """Check directions against the model and stack them to [K, *shape] per parameter.

    ``directions`` is one of
      * {name: tensor} where every tensor is shaped like its parameter (one direction) or
        [K, *param.shape] (K directions);
      * a sequence of K such dicts of single directions;
      * a sequence of tensors aligned with the trainable parameters (``named_parameters`` order, those
        with requires_grad), as ``torch.autograd.grad(loss, params)`` returns them; None entries (unused
        parameters) contribute 0;
      * a sequence of K such aligned sequences.
    Parameters not named contribute 0. An already stacked :class:`StackedDirections` passes through.
    """
    if isinstance(directions, StackedDirections):
        return directions
    if isinstance(directions, torch.Tensor):
        raise ValueError("directions is a single tensor: give {param_name: tensor}, a list of such dicts, or a "
                         "sequence of tensors aligned with the trainable parameters")
    if not isinstance(directions, Mapping):
        items = list(directions)
        if items and all(_is_aligned(d) for d in items):
            return _check(model, aligned_to_dict(model, items), force_k=False)
        if items and all(isinstance(d, (list, tuple)) for d in items):
            items = [aligned_to_dict(model, list(d), where=f"direction {i}") for i, d in enumerate(items)]
            params = dict(model.named_parameters())
            named = [n for n in params if any(n in d for d in items)]
            items = [{n: d[n] if n in d else torch.zeros_like(params[n]) for n in named} for d in items]
        dicts = items
        if not dicts or not all(isinstance(d, Mapping) for d in dicts):
            raise ValueError("directions must be a dict {param_name: tensor}, a non-empty list of such dicts, or a "
                             "sequence of tensors aligned with the trainable parameters")
        names = set(dicts[0])
        for i, d in enumerate(dicts):
            if set(d) != names:
                raise ValueError(f"direction {i} names {sorted(d)} but direction 0 names {sorted(names)}")
        stacked = {n: torch.stack([d[n] for d in dicts]) for n in dicts[0]}
        out = _check(model, stacked, force_k=True)
        return out
    return _check(model, dict(directions), force_k=False)


def _is_aligned(entry) -> bool:
    return entry is None or isinstance(entry, torch.Tensor)


def aligned_to_dict(model: torch.nn.Module, tensors: Sequence[Optional[torch.Tensor]],
                    where: str = "directions") -> Dict[str, torch.Tensor]:
    """{name: tensor} from a sequence aligned with the trainable parameters; None entries are dropped."""
    names = list(trainable_parameters(model))
    if len(tensors) != len(names):
        raise ValueError(f"{where}: got a sequence of {len(tensors)} tensors but the model has {len(names)} trainable "
                         f"parameters (aligned in named_parameters order: {names[:4]}{' ...' if len(names) > 4 else ''})")
    out = {n: t for n, t in zip(names, tensors) if t is not None}
    if not out:
        raise ValueError(f"{where}: every entry of the aligned sequence is None")
    return out


def _check(model: torch.nn.Module, directions: Dict[str, torch.Tensor], force_k: bool) -> StackedDirections:
    if not directions:
        raise ValueError("directions is empty: name at least one trainable parameter")
    params = dict(model.named_parameters())
    unknown = sorted(set(directions) - set(params))
    if unknown:
        raise ValueError(f"directions name parameters the model does not have: {unknown}")
    frozen = sorted(n for n in directions if not params[n].requires_grad)
    if frozen:
        raise ValueError(f"directions name frozen parameters (requires_grad=False): {frozen}")
    ks = set()
    tensors = {}
    single = None
    for name, v in directions.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"direction for {name!r} is a {type(v).__name__}, not a tensor")
        shape = tuple(params[name].shape)
        if tuple(v.shape) == shape and not force_k:
            is_single, v = True, v.unsqueeze(0)
        elif tuple(v.shape[1:]) == shape:
            is_single = False
        else:
            raise ValueError(f"direction for {name!r} has shape {tuple(v.shape)}; expected {shape} or [K, *{shape}]")
        if single is not None and single != is_single:
            raise ValueError("directions mix single tensors and [K, ...] stacks; give all in one form")
        single = is_single
        bad = ~torch.isfinite(v.detach())
        if bool(bad.any()):
            raise ValueError(f"direction for {name!r} has non-finite values (NaN or Inf) at flat positions "
                             f"{format_indices(bad.reshape(-1))}")
        ks.add(v.shape[0])
        tensors[name] = v.to(device=params[name].device)
    if len(ks) != 1:
        raise ValueError(f"directions disagree on K (number of directions): {sorted(ks)}")
    return StackedDirections(tensors, ks.pop(), bool(single))


def param_owners(model: torch.nn.Module) -> Dict[str, List[ParamOwner]]:
    """{parameter name (as model.named_parameters gives it): every module that holds it directly}.

    A tied parameter (one tensor held by several modules) has several owners; its per-sample gradient is
    the sum of each owner's contribution.
    """
    by_id: Dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    owners: Dict[str, List[ParamOwner]] = {n: [] for n in by_id.values()}
    for mod_name, mod in model.named_modules():
        for local, p in mod.named_parameters(recurse=False):
            owners[by_id[id(p)]].append(ParamOwner(mod_name, mod, local))
    return owners


def group_by_module(
    names: Sequence[str], owners: Mapping[str, List[ParamOwner]]
) -> Dict[int, Tuple[ParamOwner, List[Tuple[str, str]]]]:
    """Group parameter names by owning module: {id(module): (owner, [(param_name, local_name), ...])}."""
    grouped: Dict[int, Tuple[ParamOwner, List[Tuple[str, str]]]] = {}
    for name in names:
        for owner in owners[name]:
            entry = grouped.setdefault(id(owner.module), (owner, []))
            entry[1].append((name, owner.local_name))
    return grouped
