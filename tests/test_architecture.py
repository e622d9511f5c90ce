"""The package's layers import one way (docs/DESIGN.md), and the engine works without its optional backends.

The import walk parses every module of iwd_fast/ and kernels/ (no code runs), resolves relative
imports, and checks each arrow against the layer order; a synthetic module with a wrong arrow proves
the checker can fail. The cold-import tests run fresh interpreters with triton and iwd_fast._C made
unimportable (a None entry in sys.modules makes ``import x`` raise and ``find_spec`` return None).
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer rank: a module may import modules of its own rank or below.
RANKS = {"scoring": 0, "kernels": 0, "weighting": 1, "top": 1, "support": 2, "distill": 3, "app": 4}
SUPPORT = ("iwd_fast.data", "iwd_fast.networks", "iwd_fast.evaluate", "iwd_fast.runtime")
BACKEND_FAMILIES = ("compiled", "triton")


def layer_of(module: str) -> str:
    if module == "iwd_fast":
        return "top"
    if module == "iwd_fast.__main__":
        return "app"
    for name in ("scoring", "kernels", "weighting", "distill", "app"):
        if module == f"iwd_fast.{name}" or module.startswith(f"iwd_fast.{name}."):
            return name
    if any(module == m or module.startswith(m + ".") for m in SUPPORT):
        return "support"
    raise AssertionError(f"module {module} belongs to no layer: add it to docs/DESIGN.md and this test")


def module_name(path: Path) -> str:
    """iwd_fast/scoring/api.py -> iwd_fast.scoring.api; kernels/conv_dot.py -> iwd_fast.kernels.conv_dot."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["iwd_fast", "kernels"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {module_name(p) for p in list((ROOT / "iwd_fast").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))}


MODULES = _modules()


IMPORT_CALLS = ("importlib.import_module", "import_module", "__import__")


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def imports_of(module: str, source: str, is_package: bool):
    """[(imported module, line)] of every import statement, relative ones resolved, at any depth, and of every
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _called_name(node.func) in IMPORT_CALLS and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.args[0].value, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


def violations(module: str, source: str, is_package: bool = False):
    """Every import of ``module`` that breaks docs/DESIGN.md's rules, as readable strings."""
    mine = layer_of(module)
    bad = []
    stdlib = set(sys.stdlib_module_names)
    for target, line in imports_of(module, source, is_package):
        top = target.split(".")[0]
        where = f"{module}:{line} imports {target}"
        if top == "kernels":
            bad.append(f"{where}: the Triton kernels are iwd_fast.kernels (a top-level 'kernels' is another project)")
            continue
        if target == "iwd_fast" and mine not in ("app", "top"):
            bad.append(f"{where}: only the app layer imports the package's top level (it imports every layer)")
            continue
        if top != "iwd_fast":
            if mine in ("scoring", "kernels") and top not in stdlib and top not in ("torch", "triton"):
                bad.append(f"{where}: the engine imports torch (and triton in its backend) only")
            if top == "triton" and mine == "scoring" and module != "iwd_fast.scoring.backends.triton_ops":
                bad.append(f"{where}: only the Triton backend imports triton")
            continue
        try:
            theirs = layer_of(target)
        except AssertionError:
            continue  # "from pkg import name" where name is not a module
        if RANKS[theirs] > RANKS[mine]:
            bad.append(f"{where}: layer {mine} may not import layer {theirs}")
        if mine == "support" and theirs == "scoring" and target != "iwd_fast.scoring.checks":
            bad.append(f"{where}: data/networks/evaluate/runtime use only scoring.checks of the engine")
        if theirs == "kernels" and mine != "kernels" and module != "iwd_fast.scoring.backends.triton_ops":
            bad.append(f"{where}: only scoring.backends.triton_ops imports the Triton kernels")
        if mine == "kernels" and theirs == "scoring" and target != "iwd_fast.scoring.eager_ops":
            bad.append(f"{where}: the kernels import only the spec helpers of scoring.eager_ops")
        if module.startswith("iwd_fast.scoring.backends.") and target.startswith("iwd_fast.scoring.backends."):
            fam = [f for f in BACKEND_FAMILIES if module.split(".")[-1].startswith(f)]
            other = [f for f in BACKEND_FAMILIES if target.split(".")[-1].startswith(f)]
            if fam and other and fam != other:
                bad.append(f"{where}: backends never import each other")
    return bad


def package_modules():
    for path in sorted(list((ROOT / "iwd_fast").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))):
        yield module_name(path), path.read_text(), path.name == "__init__.py"


def test_every_import_runs_down_the_layers():
    bad = [v for mod, src, pkg in package_modules() for v in violations(mod, src, pkg)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module,source,needle", [
    ("iwd_fast.scoring.api", "from ..weighting import InfluenceWeighter\n", "layer scoring may not import layer weighting"),
    ("iwd_fast.scoring.capture", "import matplotlib\n", "imports torch"),
    ("iwd_fast.weighting.dropin", "from ..distill import METHODS\n", "may not import layer distill"),
    ("iwd_fast.distill.base", "from ..app.presets import PRESETS\n", "may not import layer app"),
    ("iwd_fast.data.loaders", "from ..scoring.api import grad_dot\n", "only scoring.checks"),
    ("iwd_fast.scoring.backends.compiled_ops", "from . import triton_ops\n", "never import each other"),
    ("iwd_fast.scoring.rules", "from .. import kernels\n", "only scoring.backends.triton_ops"),
    ("iwd_fast.scoring.api", "def f():\n    import triton\n", "only the Triton backend"),
    ("iwd_fast.data.loaders", "from ..scoring import grad_dot\n", "only scoring.checks"),
    ("iwd_fast.runtime", "from iwd_fast import grad_dot\n", "only the app layer imports the package's top level"),
    ("iwd_fast.distill.base", "import kernels\n", "another project"),
    ("iwd_fast.app.cli", "from kernels.conv_dot import conv_dot\n", "another project"),
    ("iwd_fast.scoring.api", "import importlib\nm = importlib.import_module('iwd_fast.app.cli')\n",
     "may not import layer app"),
    ("iwd_fast.weighting.targets", "__import__('iwd_fast.distill')\n", "may not import layer distill"),
])
def test_checker_flags_wrong_arrows(module, source, needle):
    found = violations(module, source)
    assert any(needle in v for v in found), found


def test_layers_are_matched_at_a_dot_boundary():
    assert layer_of("iwd_fast.data.loaders") == "support" and layer_of("iwd_fast.data") == "support"
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of("iwd_fast.database")  # shares a prefix with iwd_fast.data, not its layer
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of("iwd_fast.networks_extra")


@pytest.mark.parametrize("module,source", [
    ("iwd_fast.data.loaders", "from ..scoring.checks import format_indices\n"),
    ("iwd_fast.app.score.inputs", "import importlib\nm = importlib.import_module(module_name)\n"),
    ("iwd_fast.__main__", "from iwd_fast.app.cli import main\n"),
    ("iwd_fast.app.env", "from .. import __version__\n"),
])
def test_checker_accepts_right_arrows(module, source):
    assert violations(module, source) == []




def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=str(ROOT / "tests"), timeout=300)


def test_import_is_lazy():
    proc = _run("""
        import sys
        import iwd_fast
        heavy = [m for m in ("triton", "iwd_fast._C", "iwd_fast.kernels", "matplotlib", "scipy", "sklearn")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    assert proc.returncode == 0, proc.stderr


def test_cold_import_without_triton_and_extension():
    proc = _run("""
        import sys
        sys.modules["triton"] = None
        sys.modules["iwd_fast._C"] = None
        import torch
        import iwd_fast
        from iwd_fast.networks import build_network

        torch.manual_seed(0)
        net = build_network("convnet", 1, 3, (8, 8), width=4, depth=2).double()
        x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
        v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
        fast = iwd_fast.grad_dot(net, x, y, v, impl="torch")
        ref = iwd_fast.grad_dot(net, x, y, v, impl="reference")
        assert torch.allclose(fast, ref, rtol=1e-10, atol=1e-12), (fast, ref)
        assert iwd_fast.grad_dot(net, x, y, v).shape == (5,)      # auto picks torch here
        for impl, reason in (("cpu", "iwd_fast._C not built"), ("triton", "triton not installed")):
            try:
                iwd_fast.grad_dot(net, x, y, v, impl=impl)
            except iwd_fast.ImplUnavailableError as err:
                assert reason in str(err), (impl, str(err))
            else:
                raise AssertionError(f"impl={impl} ran without its backend")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
