"""The public Python API: exactly the documented names, importable and typed."""

from __future__ import annotations

import re
import typing

import qtool
from conftest import ROOT


def documented_api() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- public-api:start -->", 1)[1].split("<!-- public-api:end -->", 1)[0]
    return re.findall(r"^- `qtool\.(\w+)", section, flags=re.MULTILINE)


def test_all_is_exactly_the_documented_api():
    documented = documented_api()
    assert len(documented) == len(set(documented))
    assert sorted(qtool.__all__) == sorted(documented)


def test_every_public_name_is_importable_and_typed():
    namespace: dict = {}
    exec(f"from qtool import {', '.join(qtool.__all__)}", namespace)  # noqa: S102 - our own names
    for name in qtool.__all__:
        value = namespace[name]
        if callable(value) and not isinstance(value, type):
            hints = typing.get_type_hints(value)
            assert "return" in hints, f"qtool.{name} has no return annotation"


def test_package_ships_py_typed():
    assert (ROOT / "qtool" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    shipped = re.search(r'\[tool\.setuptools\.package-data\]\s*\nqtool = \[([^\]]*)\]', pyproject)
    assert shipped and '"py.typed"' in shipped[1] and '"recipe/presets/*.yaml"' in shipped[1]


def test_library_inspect_matches_the_cli_view():
    facts = qtool.inspect(ROOT / "sample_models" / "digits_cnn" / "model.onnx")
    assert isinstance(facts, qtool.Inspection)
    assert facts.quantizable and facts.decisions
