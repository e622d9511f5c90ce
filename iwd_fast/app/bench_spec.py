"""Benchmark-suite specs: a TOML grid of methods x datasets x IPC x noise x weighting variants x seeds.

    name = "evidence"
    preset = "cpu"                        # every cell starts from this preset
    methods = ["dc", "dsa", "dm"]
    datasets = ["fashion-mnist"]
    ipc = [10]
    seeds = [0, 1, 2]
    noise = [[0.0, "symmetric"], [0.2, "symmetric"], [0.2, "pairflip"]]
    variants = ["unweighted", "static"]   # names from the [variants] table (default: all of them)

    [config]                              # DistillConfig overrides for every cell (nested tables allowed)
    train_size = 10000

    [variants.unweighted]                 # each variant: DistillConfig overrides
    weighting = "none"
    iwd = { init = "random" }

    [variants.static]
    weighting = "static"
    iwd = { init = "weighted" }

    [[grid]]                              # more grids: the top level's keys, changed
    name = "field-loops"
    methods = ["dc"]
    config = { outer_loop = 10, inner_loop = 50 }

Each cell is one distillation run in its own folder; the cell list is deterministic, so shards and
resumes agree on it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from ..distill.config import DistillConfig, validate
from .presets import preset_config

__all__ = ["Cell", "load_spec", "expand_cells"]

GRID_KEYS = {"name", "preset", "methods", "datasets", "ipc", "seeds", "noise", "variants", "config"}


@dataclass(frozen=True)
class Cell:
    """One run of the suite: its coordinates and its full config."""

    grid: str
    method: str
    dataset: str
    ipc: int
    noise: float
    noise_kind: str
    variant: str
    seed: int
    config: DistillConfig

    @property
    def key(self) -> str:
        """The cell's folder name (unique within a suite)."""
        noise = f"{self.noise_kind}{self.noise:g}"
        return f"{self.grid}/{self.method}_{self.dataset}_ipc{self.ipc}_{noise}_{self.variant}_s{self.seed}"

    def coordinates(self) -> Dict[str, Any]:
        return {"grid": self.grid, "method": self.method, "dataset": self.dataset, "ipc": self.ipc,
                "noise": self.noise, "noise_kind": self.noise_kind, "variant": self.variant, "seed": self.seed,
                "preset": self.config.preset}


def load_spec(path: str) -> Dict[str, Any]:
    """Read and check a TOML spec (tomllib on Python >= 3.11, else the tomli package)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(path, "rb") as fh:
        spec = tomllib.load(fh)
    if not spec.get("variants"):
        raise ValueError(f"{path}: a spec needs a [variants] table (e.g. [variants.unweighted] weighting = \"none\")")
    unknown = sorted(set(spec) - GRID_KEYS - {"grid"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; expected {sorted(GRID_KEYS | {'grid'})}")
    return spec


def _merge(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _grids(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    top = {k: v for k, v in spec.items() if k in GRID_KEYS}
    top.setdefault("name", spec.get("name", "main"))
    grids = [top]
    for extra in spec.get("grid", []):
        bad = sorted(set(extra) - GRID_KEYS)
        if bad or "name" not in extra:
            raise ValueError(f"every [[grid]] needs a name and only the keys {sorted(GRID_KEYS)}; got {sorted(extra)}")
        grids.append({**{k: v for k, v in top.items() if k != "config"}, **extra,
                      "config": _merge(top.get("config", {}), extra.get("config", {}))})
    names = [g["name"] for g in grids]
    if len(set(names)) != len(names):
        raise ValueError(f"grid names must be distinct, got {names}")
    return grids


def expand_cells(spec: Dict[str, Any]) -> List[Cell]:
    """Every cell of the spec, in a fixed order; each config is validated (a bad cell fails the whole spec)."""
    variants: Dict[str, Dict[str, Any]] = spec["variants"]
    cells: List[Cell] = []
    for grid in _grids(spec):
        chosen = grid.get("variants", list(variants))
        missing = [v for v in chosen if v not in variants]
        if missing:
            raise ValueError(f"grid {grid['name']!r} names variants {missing} that the [variants] table lacks")
        noise: List[Tuple[float, str]] = [(float(r), str(k)) for r, k in grid.get("noise", [[0.0, "symmetric"]])]
        for method in grid.get("methods", ["dc"]):
            for dataset in grid.get("datasets", ["digits"]):
                for ipc in grid.get("ipc", [10]):
                    for rate, kind in noise:
                        for variant in chosen:
                            for seed in grid.get("seeds", [0]):
                                cfg = _cell_config(grid, variants[variant], method, dataset, int(ipc), rate, kind,
                                                   int(seed))
                                cells.append(Cell(grid["name"], method, dataset, int(ipc), rate, kind, variant,
                                                  int(seed), cfg))
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the spec expands to duplicate cells (a method, dataset or seed listed twice?)")
    return cells


def _cell_config(grid, variant, method, dataset, ipc, rate, kind, seed) -> DistillConfig:
    changes = _merge(grid.get("config", {}), variant)
    pdd_base = changes.get("pdd", {}).get("base") if method == "pdd" else None  # PDD's preset depends on its base
    base = preset_config(grid.get("preset", "cpu"), method, dataset, ipc, base=pdd_base).to_dict()
    merged = _merge(base, changes)
    merged.update(noise=rate, noise_kind=kind, seed=seed)
    try:
        cfg = DistillConfig.from_dict(merged)
    except TypeError as err:  # an unknown nested key
        raise ValueError(f"grid {grid['name']!r}: {err}") from None
    validate(cfg)
    return dataclasses.replace(cfg, method=method, dataset=dataset, ipc=ipc)


def spec_digest(cells: List[Cell]) -> str:
    """A short hash of every cell's config, whatever their order: two runs of the same suite agree on it."""
    import hashlib

    blob = json.dumps(sorted([c.key, c.config.to_dict()] for c in cells), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
