"""The Python blocks of README.md and docs/*.md as a newcomer meets them.

Every ```python block compiles. A block that uses no name from outside itself runs, in a fresh process.
Every other name a block uses must be one a reader has been given before it: bound by an earlier block of
the same file (read top to bottom), or named in backticks in the prose between the previous block and this
one (for a recipe: the authors' own variables it relies on, which the prose lists beside it).
"""
import ast
import builtins
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
TICKED = re.compile(r"`([^`]+)`")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def python_blocks(path: Path):
    """(line of the block's first code line, code, prose since the previous fenced block) per python block."""
    text, previous_end, out = path.read_text(), 0, []
    for m in FENCE.finditer(text):
        if m.group(1) == "python":
            out.append((text[:m.start()].count("\n") + 2, m.group(2), text[previous_end:m.start()]))
        previous_end = m.end()
    return out


def bound_and_used(tree: ast.AST):
    """(names the code binds, names it reads that it does not bind and Python does not provide)."""
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return bound, used - bound - set(dir(builtins))


def given_in(prose: str) -> set:
    """Identifiers a reader was given in backticks (`images_all`, `weighter.weights()`: both names)."""
    return {name for tick in TICKED.findall(prose) for name in IDENT.findall(tick)}


CASES = [pytest.param(path, line, code, prose, id=f"{path.name}:{line}")
         for path in DOCS for line, code, prose in python_blocks(path)]


def test_the_docs_have_python_blocks():
    assert len(CASES) >= 6, [c.id for c in CASES]  # the extraction finds the README's examples and recipes


@pytest.mark.parametrize("path,line,code,prose", CASES)
def test_block_compiles_and_names_only_what_the_reader_has(path, line, code, prose):
    tree = compile(code, f"{path.name}:{line}", "exec", ast.PyCF_ONLY_AST)
    earlier = set()
    for other_line, other_code, _ in python_blocks(path):
        if other_line >= line:
            break
        earlier |= bound_and_used(ast.parse(other_code))[0]
    _, used = bound_and_used(tree)
    missing = sorted(used - earlier - given_in(prose))
    assert not missing, (f"{path.name}:{line} uses {missing}, which no earlier block binds and the prose before it "
                         f"does not name")


STANDALONE = [c for c in CASES if not bound_and_used(ast.parse(c.values[2]))[1]]


@pytest.mark.parametrize("path,line,code,prose", STANDALONE)
def test_standalone_block_runs(tmp_path, path, line, code, prose):
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"{path.name}:{line} failed:\n{run.stderr[-2000:]}"
