"""No import cycle among the project's modules (counting imports inside functions too, which only defer a cycle),
and every module imports in a fresh interpreter in dependency order."""
from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

from conftest import ROOT

PACKAGES = ("rewards", "sharpening", "testing", "toyworld")
TOP_LEVEL = ("reward", "evaluate", "train_sft_diffusion_sharpening_sdxl", "train_rlhf_diffusion_sharpening_sdxl")


def project_modules() -> dict[str, ast.Module]:
    files = {name: ROOT / f"{name}.py" for name in TOP_LEVEL}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return {name: ast.parse(path.read_text()) for name, path in files.items()}


def imports_of(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    package = name if name in PACKAGES else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}".rstrip(".") if base else package
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def test_no_import_cycle_and_every_module_imports_in_dependency_order():
    trees = project_modules()
    graph = {name: imports_of(name, tree, set(trees)) for name, tree in trees.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
    code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % order
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
