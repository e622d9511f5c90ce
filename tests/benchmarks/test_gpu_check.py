"""benchmarks/gpu_check.py --cpu-smoke runs end to end on CPU, so the GPU session's script cannot rot.

The smoke run takes the same code paths as the GPU run with tiny shapes (impls torch, cpu, jvp, and
triton under the interpreter). It runs with tqdm, matplotlib, scikit-learn, scipy and safetensors
made unimportable, as on the GPU machine, which has only the GPU stack. About 35 s on 2 busy cores.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BLOCKED = ("tqdm", "matplotlib", "sklearn", "scipy", "safetensors")

# Runs the script as __main__ with the modules above absent: a None entry in sys.modules makes
# ``import x`` raise ModuleNotFoundError and importlib.util.find_spec("x") return None, as if not installed.
_RUNNER = r"""
import runpy, sys
BLOCKED, SCRIPT = sys.argv[1].split(","), sys.argv[2]
for name in BLOCKED:
    sys.modules[name] = None
sys.argv = [SCRIPT] + sys.argv[3:]
runpy.run_path(SCRIPT, run_name="__main__")
"""


def test_cpu_smoke_passes_and_writes_json(tmp_path):
    out = tmp_path / "x.json"
    env = dict(os.environ)
    # The Triton interpreter runs the kernels on CPU tensors (set before triton is imported, so here in the
    # child's environment). On a CUDA machine, as in conftest.py, Triton is left to the GPU tests.
    interpret = not torch.cuda.is_available()
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _RUNNER, ",".join(BLOCKED), str(SCRIPT), "--cpu-smoke",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout[-4000:] + "\n" + proc.stderr[-4000:])
    assert proc.returncode == 0, tail
    result = json.loads(out.read_text())

    assert result["summary"]["correctness"] == "PASS" and result["summary"]["complete"], result["summary"]
    checks = result["checks"]
    ran = {c["impl"] for c in checks if c.get("impl")}
    expected = {"torch", "jvp"}
    if result["environment"]["availability"]["cpu"]["cpu"] == "ok":
        expected.add("cpu")
    if interpret and importlib.util.find_spec("triton") is not None:
        expected.add("triton")  # under the interpreter
    assert expected <= ran, (expected, ran)
    for impl in ran:
        mine = [c for c in checks if c.get("impl") == impl]
        assert all(c["status"] == "PASS" for c in mine), [c for c in mine if c["status"] != "PASS"]
        assert any(c["section"] == "model" for c in mine), impl
        assert all(c["err"] <= c["allowed"] for c in mine), impl
    for kernel_impl in ran & {"cpu", "triton"}:
        assert any(c["section"] == "layer" and c.get("impl") == kernel_impl for c in checks), kernel_impl
    assert {c["model"] for c in checks if c["section"] == "model"} == {"convnet3", "resnet18"}

    timed = {(t.get("model"), t["name"]) for t in result["timings"] if t["status"] == "ok"}
    assert ("convnet3", "plain fwd+bwd") in timed and ("resnet18", "plain fwd+bwd") in timed, timed
    assert any(t["section"] == "conv_micro" and t["status"] == "ok" for t in result["timings"])
    assert result["targets"] and all(t["status"] in ("PASS", "MISS", "n/a", "info") for t in result["targets"])
