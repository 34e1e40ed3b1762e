"""Docs are tested: docs/cli.md is the live --help, docs/recipe.md has every recipe field,
the README's commands and Python run, and its YAML recipes load."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from conftest import ROOT, SAMPLE
from qtool.cli.main import main
from qtool.recipe import schema as recipe_module
from qtool.recipe.load import parse_recipe

QTOOL = Path(sys.executable).parent / "qtool"


def load_make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_docs = load_make_docs()


def test_cli_md_is_the_live_help():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == make_docs.cli_markdown(), \
        "docs/cli.md is stale: run `make docs`"


def test_every_command_has_a_section_and_an_example():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for path in make_docs.command_paths(main):
        assert f"## `qtool {' '.join(path)}`" in text
        assert "Example:" in make_docs.help_text(main, path), f"qtool {' '.join(path)} --help has no example"


def test_a_new_command_makes_the_cli_doc_stale(monkeypatch):
    monkeypatch.setitem(main.commands, "zz-new", click.Command("zz-new", help="Not documented yet."))
    assert "## `qtool zz-new`" in make_docs.cli_markdown()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") != make_docs.cli_markdown()


def recipe_doc() -> str:
    return (ROOT / "docs" / "recipe.md").read_text(encoding="utf-8")


def test_recipe_md_lists_every_field_of_the_schema():
    doc = recipe_doc()
    rows = make_docs.field_rows(recipe_module.recipe_json_schema())
    missing = [key for key, *_ in rows if f"| `{key}` |" not in doc]
    assert not missing, f"docs/recipe.md lacks {missing}: run `make docs`"
    assert make_docs.recipe_markdown(doc) == doc, "docs/recipe.md's field table is stale: run `make docs`"


def test_a_new_recipe_field_makes_the_recipe_doc_stale(monkeypatch):
    real = recipe_module.recipe_json_schema

    def with_new_field():
        schema = real()
        schema["$defs"]["CalibrationSpec"]["properties"]["zz_new"] = {"type": "integer", "default": 1}
        return schema

    monkeypatch.setattr(recipe_module, "recipe_json_schema", with_new_field)
    rows = make_docs.field_rows(recipe_module.recipe_json_schema())
    assert ("calibration.zz_new", "integer", "`1`", "") in rows
    assert "| `calibration.zz_new` |" not in recipe_doc()
    assert make_docs.recipe_markdown(recipe_doc()) != recipe_doc()


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("doc", ["README.md", "docs/recipe.md"])
def test_yaml_recipes_in_docs_load(doc, tmp_path):
    blocks = fenced_blocks((ROOT / doc).read_text(encoding="utf-8"), "yaml")
    assert blocks
    for block in blocks:
        parse_recipe(block, tmp_path / "recipe.yaml")  # a RecipeError names the key


def shell_commands(text: str) -> list[str]:
    """`qtool ...` commands of the ```sh blocks, continuation lines joined."""
    commands = []
    for block in fenced_blocks(text, "sh"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #", 1)[0].strip()
            if command.startswith("qtool "):
                commands.append(" ".join(command.split()))
    return commands


def is_placeholder(command: str) -> bool:
    """Usage lines (MODEL.onnx, CALIB_DIR, [--overwrite]) describe; they do not run."""
    return "[" in command or bool(re.search(r"\b[A-Z][A-Z_]{2,}\b", command))


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A folder laid out as the README's examples assume: the sample model as model.onnx, calib/, eval/,
    plus sample_models/ as in a clone."""
    folder = tmp_path_factory.mktemp("user")
    shutil.copy(SAMPLE / "model.onnx", folder / "model.onnx")
    for name in ("calib", "eval"):
        (folder / name).symlink_to(SAMPLE / name)
    (folder / "sample_models").symlink_to(ROOT / "sample_models")
    return folder


def test_readme_shell_examples_run(user_folder):
    commands = shell_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    runnable = [command for command in commands if not is_placeholder(command)]
    assert any(command.startswith("qtool quantize ") for command in runnable)
    assert any(command.startswith("qtool init ") for command in runnable)
    for command in runnable:
        args = shlex.split(command)
        result = subprocess.run([str(QTOOL), *args[1:]], cwd=user_folder, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def test_readme_python_example_runs(user_folder):
    blocks = [b for b in fenced_blocks((ROOT / "README.md").read_text(encoding="utf-8"), "python")
              if "qtool.quantize(" in b]
    assert blocks
    result = subprocess.run([sys.executable, "-c", blocks[0]], cwd=user_folder, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (user_folder / "out" / "int8" / "model.onnx").is_file()


def test_bash_completion_script():
    env = {**os.environ, "_QTOOL_COMPLETE": "bash_source"}
    result = subprocess.run([str(QTOOL)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "_qtool_completion" in result.stdout and "complete " in result.stdout
    env = {**os.environ, "_QTOOL_COMPLETE": "bash_complete", "COMP_WORDS": "qtool ins", "COMP_CWORD": "1"}
    result = subprocess.run([str(QTOOL)], env=env, capture_output=True, text=True, timeout=60)
    assert "inspect" in result.stdout


def test_no_color_means_no_escape_codes_even_on_a_forced_terminal():
    args = [str(QTOOL), "inspect", str(SAMPLE / "model.onnx")]
    forced = {**os.environ, "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    forced.pop("NO_COLOR", None)
    coloured = subprocess.run(args, env=forced, capture_output=True, text=True, timeout=60)
    assert "\x1b[" in coloured.stdout  # the check below can see escapes
    plain = subprocess.run(args, env={**forced, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout + plain.stderr


def test_github_actions_example_runs_locally(tmp_path):
    """Parse the workflow and run its steps (all but the install) with its env pointed at the sample model."""
    import yaml

    workflow = yaml.safe_load((ROOT / "examples" / "github-actions.yml").read_text(encoding="utf-8"))
    job = workflow["jobs"]["quantize"]
    assert {"push", "pull_request"} <= set(workflow[True])  # YAML 1.1 reads the key `on` as True
    uses = [step["uses"].split("@")[0] for step in job["steps"] if "uses" in step]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nvalidation:\n  gates: {min_cosine: 0.99, max_accuracy_drop: 0.01}\n")
    local = {"MODEL": str(SAMPLE / "model.onnx"), "RECIPE": str(recipe), "CALIB": str(SAMPLE / "calib"),
             "EVAL": str(SAMPLE / "eval"), "OUT": "out/int8"}
    assert set(local) <= set(workflow["env"])
    summary = tmp_path / "summary.md"
    env = {**os.environ, **workflow["env"], **local, "GITHUB_STEP_SUMMARY": str(summary),
           "PATH": f"{QTOOL.parent}{os.pathsep}{os.environ['PATH']}"}
    ran = []
    for step in job["steps"]:
        if "run" not in step or "pip install" in step["run"]:
            continue
        result = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{step['name']}: {result.stderr}"
        ran.append(step["name"])
    assert any("qtool quantize" in step.get("run", "") for step in job["steps"])
    assert len(ran) == 2
    assert (tmp_path / "out" / "int8" / "model.onnx").is_file() and (tmp_path / "out" / "int8-gates.xml").is_file()
    # qtool appends report.md to the summary itself; the workflow must not append it a second time
    heading = (tmp_path / "out" / "int8" / "report.md").read_text(encoding="utf-8").splitlines()[0]
    assert summary.read_text(encoding="utf-8").count(heading) == 1
    assert workflow["env"]["QTOOL"] == "qtool-onnx"  # `qtool` on PyPI is another project
    assert "max_accuracy_drop" in summary.read_text()


def test_no_color_quantize_has_no_colour_codes(tmp_path):
    """Progress bars may move the cursor on a (forced) terminal; colour and bold never appear with NO_COLOR."""
    env = {**os.environ, "FORCE_COLOR": "1", "NO_COLOR": "1"}
    result = subprocess.run([str(QTOOL), "quantize", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                             "--output", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    assert not re.search(r"\x1b\[[0-9;]*m", result.stderr)


def test_the_readme_lists_every_command_with_the_output_options():
    """Finding 17: the README said quantize and calibrate had only --quiet (they have -v and --json too)."""
    import re

    from qtool.cli.main import main

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    sentence = text[text.index("Output options mean the same"):].split(" have all three")[0]
    listed = set(re.findall(r"`([a-z]+)`", sentence.split("nothing else there")[1]))
    having = {name for name, command in main.commands.items()
              if {"quiet", "verbose", "as_json"} <= {param.name for param in command.params}}
    assert listed == having
