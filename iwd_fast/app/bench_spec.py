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

A dataset may be a folder of images in class subfolders or a tensors file (``datasets = ["data/mine"]``,
relative to the working directory); ``[config] data = { test = "...", image_size = [H, W], test_fraction = 0.2,
split_seed = 0 }`` says how it is read (iwd_fast.data.user_data). The preset is scaled to such a dataset
(iwd_fast.app.scaling; the spec's own settings win), its cells are named by the folder's or file's name, and
it is opened (labels, sizes and classes checked) when the cells are expanded, before any cell runs.

Each cell is one distillation run in its own folder; the cell list is deterministic, so shards and
resumes agree on it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..data.user_data import UserData, UserDataSpec, dataset_label, is_user_dataset, open_user_data
from ..distill.config import DistillConfig, validate
from .presets import preset_config
from .scaling import scaled_config

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
    """Read and check a TOML spec (tomllib on Python >= 3.11, else the tomli package); every refusal names
    the file and the offending key."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder, not a TOML spec file")
    try:
        with open(path, "rb") as fh:
            spec = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise ValueError(f"{path}: a spec needs a [variants] table (e.g. [variants.unweighted] weighting = \"none\")")
    unknown = sorted(set(spec) - GRID_KEYS - {"grid"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; expected {sorted(GRID_KEYS | {'grid'})}")
    bad = next((f"[variants.{k}] must be a table of config overrides, got {v!r}" for k, v in spec["variants"].items()
                if not isinstance(v, dict)), None)
    grids = spec.get("grid", [])
    if bad is None and not (isinstance(grids, list) and all(isinstance(g, dict) for g in grids)):
        bad = "grid must be a list of [[grid]] tables"
    top = {k: v for k, v in spec.items() if k != "variants"}  # at the top level, variants is the table itself
    for where, table in [("top level", top)] + [(f"[[grid]] {i}", g) for i, g in enumerate(spec.get("grid", []))
                                                  if isinstance(g, dict)]:
        bad = bad or _type_problem(table, where)
    if bad:
        raise ValueError(f"{path}: {bad}")
    return spec


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rate_and_kind(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (int, float)) and not isinstance(v[0], bool) \
        and isinstance(v[1], str)


# grid key -> (check of one entry, what it must be); list keys hold lists of such entries
_TYPES = {"name": (lambda v: isinstance(v, str), "a string"), "preset": (lambda v: isinstance(v, str), "a string"),
          "config": (lambda v: isinstance(v, dict), "a table of config overrides")}
_LISTS = {"methods": (lambda v: isinstance(v, str), "strings"), "datasets": (lambda v: isinstance(v, str), "strings"),
          "variants": (lambda v: isinstance(v, str), "strings"), "ipc": (_is_int, "integers"),
          "seeds": (_is_int, "integers"),
          "noise": (_is_rate_and_kind, "[rate, kind] pairs such as [0.2, \"symmetric\"]")}


def _type_problem(table: Dict[str, Any], where: str) -> str:
    """The first key of ``table`` whose value has the wrong type, described in one line ("" if none)."""
    for key, value in table.items():
        if key in _TYPES and not _TYPES[key][0](value):
            return f"{where}: {key} must be {_TYPES[key][1]}, got {value!r}"
        if key in _LISTS:
            ok, what = _LISTS[key]
            if not isinstance(value, list) or not value:
                return f"{where}: {key} must be a non-empty list of {what}, got {value!r}"
            wrong = [i for i, v in enumerate(value) if not ok(v)]
            if wrong:
                return f"{where}: {key} must be a list of {what}; entries {wrong[:5]} are not ({value[wrong[0]]!r})"
    return ""


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


def expand_cells(spec: Dict[str, Any], notes: Optional[Dict[str, List[str]]] = None) -> List[Cell]:
    """Every cell of the spec, in a fixed order; each config is validated (a bad cell fails the whole spec).
    ``notes``: filled with what scaling a preset to a dataset of one's own chose, by dataset, method and IPC."""
    variants: Dict[str, Dict[str, Any]] = spec["variants"]
    cells: List[Cell] = []
    opened: Dict[str, UserData] = {}
    notes = {} if notes is None else notes
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
                                                   int(seed), opened, notes)
                                cells.append(Cell(grid["name"], method, dataset_label(dataset), int(ipc), rate, kind,
                                                  variant, int(seed), cfg))
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the spec expands to duplicate cells (a method, dataset or seed listed twice, or two "
                         "datasets of one's own with the same name?)")
    return cells


def _data_spec(overrides: Dict[str, Any]) -> UserDataSpec:
    """The data spec of a cell (its test path made absolute, relative to the working directory)."""
    try:
        spec = UserDataSpec(**overrides.get("data", {}))
    except TypeError as err:
        raise ValueError(f"[config] data: {err}") from None
    return dataclasses.replace(spec, test=str(Path(spec.test).resolve()) if spec.test else None)


def _cell_config(grid, variant, method, dataset, ipc, rate, kind, seed, opened, notes) -> DistillConfig:
    """A cell's config: the grid's preset (scaled to a dataset of one's own), its config, the variant, the
    noise and seed; refused here, naming the grid, not when the cell runs."""
    preset, overrides = grid.get("preset", "cpu"), _merge(grid.get("config", {}), variant)
    try:
        pdd_base = overrides.get("pdd", {}).get("base") if method == "pdd" else None  # PDD's preset needs it
        if is_user_dataset(dataset):  # any name that is not built in is a folder or tensors file
            data_spec, dataset = _data_spec(overrides), str(Path(dataset).resolve())
            key = json.dumps([dataset, dataclasses.asdict(data_spec)])
            if key not in opened:
                opened[key] = open_user_data(dataset, data_spec)
            cfg, said = scaled_config(preset, method, dataset, opened[key], ipc, fixed=set(overrides), base=pdd_base)
            notes[f"{dataset_label(dataset)} ({method}, ipc {ipc}, preset {preset})"] = said
            base = cfg.replace(data=data_spec).to_dict()
            overrides = {k: v for k, v in overrides.items() if k != "data"}
        else:
            base = preset_config(preset, method, dataset, ipc, base=pdd_base).to_dict()
        merged = _merge(base, overrides)
        merged.update(noise=rate, noise_kind=kind, seed=seed)
        cfg = DistillConfig.from_dict(merged)
        validate(cfg)
    except ValueError as err:  # an unknown preset, method or key, a value of the wrong type or out of range
        raise ValueError(f"grid {grid['name']!r} ({method}, {dataset}, ipc {ipc}): {err}") from None
    return dataclasses.replace(cfg, method=method, dataset=dataset, ipc=ipc)


def spec_digest(cells: List[Cell]) -> str:
    """A short hash of every cell's config, whatever their order: two runs of the same suite agree on it."""
    import hashlib

    blob = json.dumps(sorted([c.key, c.config.to_dict()] for c in cells), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
