"""The layers hold: who may import whom, no import cycles, no source file over 600 lines.

Every import counts, those inside functions and under TYPE_CHECKING included: a lazy
import is still a dependency (it fails at run time instead of import time), and a cycle
through one is still a cycle. Part of `make lint` and `make test`.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("cli", "shared", "services", "workflows", "deploy")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The project modules a file imports, resolved to the deepest module that exists."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> str:
    """`services.<name>` is one layer per service; the other packages are one each."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else parts[0]


def _allowed(importer: str, imported: str) -> bool:
    a, b = _layer(importer), _layer(imported)
    if a == b or a == "cli":
        return True  # a layer uses itself; the CLI is the top and may use everything
    if a == "shared":
        return False  # the ground imports only itself
    if a.startswith("services"):
        return b == "shared" or b == "services"  # `services` is the bare namespace package
    if a == "workflows":
        return b == "shared"  # orchestration knows a stage only by its command line
    return a == "deploy" and b in ("shared", "workflows")  # chart tooling renders workflows


def test_every_import_goes_down_the_layers() -> None:
    wrong = sorted(
        f"{importer} -> {imported}"
        for importer, imported_set in GRAPH.items()
        for imported in imported_set
        if not _allowed(importer, imported)
    )
    assert wrong == []


def test_there_are_no_import_cycles() -> None:
    # A package's __init__ is imported by its submodules implicitly; only explicit imports
    # are edges, so a cycle here is one a reader would have to untangle.
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_no_source_file_is_over_600_lines() -> None:
    sources = [
        *MODULES.values(),
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
    ]
    long = {
        str(path.relative_to(ROOT)): n
        for path in sources
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_rules_catch_what_they_are_for() -> None:
    """The checks above would see a violation (a guard against a vacuous graph)."""
    assert "shared.stage_registry" in MODULES and "cli.main" in MODULES
    assert "workflows.commands" in GRAPH["cli.main"]
    assert not _allowed("shared.stage", "workflows.pipeline")
    assert not _allowed("services.evaluator.sections", "services.sae.train")
    assert not _allowed("workflows.pipeline", "services.ot.stage")
    assert _allowed("services.ot.stage", "shared.store")
    assert _allowed("cli.main", "services.evaluator.commands")
