"""Layers point one way: a module imports only from layers below its own (DESIGN.md)."""

from __future__ import annotations

import ast

from conftest import ROOT

# Lowest first. A new module gets a row here, and the test says where it may not reach.
LAYERS = [
    {"errors", "numerics", "metrics", "rules", "executor", "terminal"},
    {"recipe", "model", "artifacts"},
    {"images", "runner", "prepare", "weights", "recipe_file"},
    {"data", "observers", "bench", "hessians"},
    {"observer_pool"},
    {"calibrate", "compare", "conventions"},
    {"plan", "layers", "starter"},
    {"qdq", "inspection", "report"},
    {"html_report", "sensitivity", "validation"},
    {"search_report", "tune", "report_files"},
    {"api"},
    {"trials"},
    {"tuning"},
    {"cli_options"},
    {"cli_quantize", "cli_recipe", "cli_search"},
    {"cli", "__init__"},
    {"__main__"},
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def qtool_imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qtool":
            parts = node.module.split(".")
            names |= {alias.name for alias in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qtool.")}
    return {name for name in names if name in RANK}


def test_every_module_has_a_layer():
    modules = {path.stem for path in (ROOT / "qtool").glob("*.py")}
    assert modules == set(RANK), f"add to LAYERS: {sorted(modules - set(RANK))}; gone: {sorted(set(RANK) - modules)}"


def test_imports_point_down():
    upward = []
    for path in sorted((ROOT / "qtool").glob("*.py")):
        for imported in qtool_imports(path):
            if RANK[imported] >= RANK[path.stem]:
                upward.append(f"{path.stem} (layer {RANK[path.stem]}) imports {imported} (layer {RANK[imported]})")
    assert upward == []
