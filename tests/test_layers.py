"""Layers point one way: a package imports only from packages below its own (DESIGN.md, STYLE.md).

A unit is a sub-package of qtool (qtool/io/, qtool/search/, ...) or one of the modules at the top
(errors, numerics, api, the public __init__, __main__). Modules inside one unit may import each other.
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "qtool"
# Lowest first. A new unit gets a row here, and the test says where it may not reach.
LAYERS = [
    {"errors", "numerics"},
    {"recipe"},
    {"io"},
    {"runtime"},
    {"distributed"},
    {"calibration"},
    {"quantization"},
    {"evaluation", "authoring"},
    {"reporting"},
    {"api"},
    {"search"},
    {"cli", "__init__"},
    {"__main__"},
]
RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}
# Printing and terminal libraries belong to the CLI alone: nothing below it may import them.
CLI_ONLY = {"click", "rich"}


def unit_of(path) -> str:
    """The unit a source file belongs to: its sub-package, or its own name at the top."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imports(path) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in a file; `from qtool import x` gives qtool.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "qtool":
                found += [(node.lineno, f"qtool.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(path) for path in sources()}
    assert units == set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}; gone: {sorted(set(RANK) - units)}"


def test_imports_point_down():
    upward = []
    for path in sources():
        own = unit_of(path)
        for line, name in imports(path):
            parts = name.split(".")
            if parts[0] != "qtool" or len(parts) < 2 or parts[1] not in RANK or parts[1] == own:
                continue  # not qtool, the package itself (`__version__`), or inside the same unit
            if RANK[parts[1]] >= RANK[own]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}: {own} (layer {RANK[own]}) "
                              f"may not import {parts[1]} (layer {RANK[parts[1]]})")
    assert upward == []


def test_only_the_cli_prints():
    offending = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in sources() if unit_of(path) not in {"cli", "__main__"}
                 for line, name in imports(path) if name.split(".")[0] in CLI_ONLY]
    assert offending == []


def test_every_package_says_its_job():
    packages = sorted(path.parent for path in PACKAGE.glob("*/__init__.py"))
    undocumented = [str(p.relative_to(ROOT)) for p in packages
                    if len((ast.get_docstring(ast.parse((p / "__init__.py").read_text())) or "").split()) < 12]
    assert packages and undocumented == []
