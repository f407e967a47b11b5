"""The package's shape: imports run one way (base <- format <- families <- quant <- pipeline stages <-
the orchestrator; runtime <- format, families, quant; hub, diffusers <- runtime) and never in a circle.

Walks every ``import`` statement of ``bfq/`` with ``ast``, including the ones inside functions
(a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bfq"

# Each layer may import itself and the layers it lists (the base layer is allowed everywhere).
BASE = "base"
LAYERS = {
    BASE: set(),
    "format": set(),
    "families": {"format"},
    "quant": {"format", "families"},
    "tinysd": {"format", "families", "quant"},
    "tinysdxl": {"format", "families", "quant", "tinysd"},
    "tinypixart": {"format", "families", "quant", "tinysd"},
    "pipeline": {"format", "families", "quant", "tinysd", "tinysdxl"},
    "runtime": {"format", "families", "quant", "tinysd", "tinysdxl"},
    "diffusers": {"format", "families", "quant", "tinysd", "tinysdxl", "pipeline", "runtime"},
    "hub": {"format", "families", "quant", "tinysd", "tinysdxl", "runtime"},
}
BASE_MODULES = {"bfq", "bfq.errors", "bfq._io", "bfq._quiet", "bfq.download", "bfq._diffusers_hook"}
# Stages of bfq.pipeline in the order a user runs them: a stage imports only earlier ones.
STAGES = [("models", "plots", "sensitivity"), ("analyze",), ("allocate",), ("finetune",), ("export",), ("quantize",)]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every bfq module `path` imports: ``from bfq.x import y`` counts as bfq.x.y when that is a
    module (importing a submodule is not a dependency on its package's ``__init__``), else bfq.x."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name == "bfq" or name.startswith("bfq.")}


def _modules() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path, set(files)) if m in files and m != name} for name, path in files.items()}


def _layer(module: str) -> str:
    if module in BASE_MODULES:
        return BASE
    parts = module.split(".")
    assert parts[1] in LAYERS, f"{module}: not in any layer; add its package to tests/test_layout.py"
    return parts[1]


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "pipeline":
        return None
    for rank, names in enumerate(STAGES):
        if parts[2] in names:
            return rank
    raise AssertionError(f"{module}: not a known pipeline stage; add it to STAGES in tests/test_layout.py")


def test_imports_follow_the_layers():
    wrong = []
    for module, deps in sorted(_modules().items()):
        layer = _layer(module)
        for dep in sorted(deps):
            other = _layer(dep)
            if other not in (BASE, layer) and other not in LAYERS[layer]:
                wrong.append(f"{module} imports {dep} ({layer} may not import {other})")
            if layer == BASE and other != BASE:
                wrong.append(f"{module} imports {dep} (the base layer imports only the base layer)")
            mine, theirs = _stage(module), _stage(dep)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} imports {dep}: a stage never imports a later stage or the orchestrator")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _modules()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layout_checker_sees_violations(tmp_path, monkeypatch):
    """The checker itself can fail: a module of the format layer importing torch-side code is caught."""
    fake = tmp_path / "bfq" / "format"
    fake.mkdir(parents=True)
    (tmp_path / "bfq" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from bfq.quant.nn import QuantLinear\n")
    (tmp_path / "bfq" / "quant").mkdir()
    (tmp_path / "bfq" / "quant" / "__init__.py").write_text("")
    (tmp_path / "bfq" / "quant" / "nn.py").write_text("from bfq.format import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "bfq")
    with pytest.raises(AssertionError, match="format may not import quant"):
        test_imports_follow_the_layers()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


def test_no_module_is_a_900_line_room():
    """Modules stay under ~400 lines unless their docstring says why they are one cohesive thing."""
    big = []
    for path in PACKAGE.rglob("*.py"):
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > 420 and "one cohesive" not in doc:
            big.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not big, "\n".join(big)


def test_import_bfq_format_does_not_load_torch():
    code = ("import sys, bfq, bfq.format, bfq.format.inspect, bfq.format.pack, bfq.families; "
            "bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad, sorted(bad)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
