"""pytest-benchmark timings of the grad_dot paths: one group per model, so its paths sit side by side.

    pytest benchmarks/test_bench_grad_dot.py --benchmark-only --bench-threads 1 \
        --benchmark-json=benchmarks/results/pytest_grad_dot.json
    pytest benchmarks/test_bench_grad_dot.py --benchmark-only --bench-quick      # tiny sizes (CI smoke)
    python benchmarks/bench_grad_dot.py --timings benchmarks/results/pytest_grad_dot.json   # + peak memory

The paths are those of grad_dot_paths.py (plain forward+backward, capture+X, capture streamed+X,
capture norm_sq+X, functional grad_dot X, Opacus and BackPACK anchors), for every usable impl X.
Before any path of a model is timed, every path passes the correctness gate (grad_dot_paths.check_paths:
compared with impl="reference", float32 outliers rechecked in float64); a WRONG path fails its test
and is never timed. The gate's call is each path's warmup. pytest-benchmark cannot measure peak
memory: bench_grad_dot.py does, and joins this file's JSON into one table of ratios to the baseline.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import harness  # noqa: E402 - benchmarks/ is on sys.path (conftest.py)
from grad_dot_paths import FULL, QUICK, build_paths, check_paths, impl_reasons, make_inputs  # noqa: E402

TOL = 1e-3            # the gate's float32 tolerance (max |s - s_ref| / max |s_ref|), as in bench_grad_dot.py
SLOW_ROUNDS = 2       # cap on timed rounds of the slow paths (vmap(grad) reference, anchors)
_CASES: Dict[tuple, dict] = {}


def _specs(config):
    table = QUICK if config.getoption("--bench-quick") else FULL
    wanted = config.getoption("--bench-models")
    return [s for s in table if "all" in wanted or any(s.key.startswith(m) for m in wanted)]


def pytest_generate_tests(metafunc):
    if "case_key" not in metafunc.fixturenames:
        return
    device = torch.device("cpu")
    reasons = impl_reasons(device)
    params = []
    for spec in _specs(metafunc.config):
        # the path names only (cheap): the real paths are built once per model by the fixture below
        names = [p.name for p in build_paths(make_inputs(replace(spec, batch=1), 1, 0, device), reasons,
                                              anchors=True)]
        params += [pytest.param((spec.key, name), id=f"{spec.key}|{name}") for name in names]
    metafunc.parametrize("case_key", params)


def _case(config, model: str) -> dict:
    """Inputs, paths and the gate's verdicts of one model, built and checked once per session."""
    key = (model, config.getoption("--bench-quick"), config.getoption("--bench-k"))
    if key not in _CASES:
        spec = next(s for s in _specs(config) if s.key == model)
        device = torch.device("cpu")
        reasons = impl_reasons(device)
        inp = make_inputs(spec, config.getoption("--bench-k"), 0, device)
        paths = build_paths(inp, reasons, anchors=True)
        check_paths(paths, inp, TOL, rebuild=lambda i: build_paths(i, reasons, anchors=True))
        _CASES[key] = {"spec": spec, "inputs": inp, "paths": {p.name: p for p in paths},
                       "env": harness.environment(device)}
    return _CASES[key]


def test_path(benchmark, request, case_key):
    model, name = case_key
    case = _case(request.config, model)
    spec, inp, path, env = case["spec"], case["inputs"], case["paths"][name], case["env"]
    benchmark.group = model
    benchmark.extra_info.update(
        model=model, path=name, kind=path.kind, impl=path.impl, network=spec.network, width=spec.width,
        norm=spec.norm, batch=spec.batch, input_shape=list(inp.x.shape), k=inp.k, dtype="float32",
        max_rel_err=path.err, n_outliers_fp32=path.n_outliers, max_rel_err_fp64_recheck=path.err64,
        gate=path.status, gate_note=path.reason, git_sha=env["git_sha"], git_dirty=env["git_dirty"],
        torch=env["torch"], threads=torch.get_num_threads(), load_avg_1min=env["load_avg_1min"],
        quick=bool(request.config.getoption("--bench-quick")))
    if path.status == "wrong":
        pytest.fail(f"{model} {name}: WRONG against impl='reference': {path.reason}")
    if path.status != "ok":
        pytest.skip(f"{model} {name}: {path.status}: {path.reason}")
    rounds = min(spec.repeats, SLOW_ROUNDS) if path.slow else spec.repeats
    benchmark.pedantic(path.fn, rounds=rounds, iterations=1, warmup_rounds=0)
