"""No written path reaches an input (finding 1 of the new-user pass): through symbolic links (data
folders of links, a linked data folder, a link as the written path), nor onto inputs that are not
data (a --data-loader file, a recipe's base file). Every case builds its folders in tmp_path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import matmul_chain, save_npy_folder, with_fused_recipe
from qtool.cli.main import main


@pytest.fixture
def linked(tmp_path):
    """tmp/model.onnx; tmp/store/*.npy (the real samples); tmp/calib/*.npy links to them;
    tmp/calib_link -> tmp/store (a linked folder)."""
    onnx.save(matmul_chain(), str(tmp_path / "model.onnx"))
    rng = np.random.RandomState(1)
    store = save_npy_folder(tmp_path / "store", [rng.randn(1, 8) for _ in range(4)])
    (tmp_path / "calib").mkdir()
    for sample in sorted(store.iterdir()):
        (tmp_path / "calib" / sample.name).symlink_to(sample)
    (tmp_path / "calib_link").symlink_to(store, target_is_directory=True)
    return tmp_path


def state(folder: Path) -> dict:
    """Every entry under `folder`: a link's target, else the file's sha256."""
    return {p.name: (str(p.readlink()) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def run(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in with_fused_recipe(list(args))])


def quantize(root: Path, data: Path, *extra, env=None):
    return run("quantize", root / "model.onnx", "--data", data, "--output", root / "out", "--no-bench", *extra,
               env=env)


@pytest.mark.parametrize("data, written", [("calib", "calib/0000.npy"), ("calib", "store/0001.npy"),
                                           ("calib_link", "calib_link/0000.npy"), ("calib_link", "store/0002.npy"),
                                           ("calib", "calib_link/0003.npy")])
def test_junit_on_a_sample_reached_through_links_is_refused(linked, data, written):
    before = state(linked / "store"), state(linked / "calib")
    result = quantize(linked, linked / data, "--junit", linked / written)
    assert result.exit_code == 2, result.output
    assert "--junit file would" in result.stderr and "choose" in result.stderr
    assert (state(linked / "store"), state(linked / "calib")) == before and not (linked / "out").exists()


def test_step_summary_through_a_link_in_the_data_folder_is_refused(linked):
    before = state(linked / "store"), state(linked / "calib")
    result = quantize(linked, linked / "calib", env={"GITHUB_STEP_SUMMARY": str(linked / "calib" / "0001.npy")})
    assert result.exit_code == 2 and "GITHUB_STEP_SUMMARY file would be written inside the input folder" \
        in result.stderr
    assert (state(linked / "store"), state(linked / "calib")) == before


def test_a_link_at_the_written_path_pointing_at_a_sample_is_refused(linked):
    """The written path is outside every input folder, but it is a link to a sample."""
    (linked / "gates.xml").symlink_to(linked / "store" / "0000.npy")
    before = state(linked / "store")
    result = quantize(linked, linked / "calib", "--junit", linked / "gates.xml")
    assert result.exit_code == 2 and f"would overwrite {linked / 'store' / '0000.npy'}" in result.stderr
    assert state(linked / "store") == before


@pytest.mark.parametrize("command", ["table", "cache"])
def test_calibrate_and_sensitivity_outputs_through_links_are_refused(linked, command):
    before = state(linked / "store"), state(linked / "calib")
    if command == "table":
        result = run("calibrate", linked / "model.onnx", "--data", linked / "calib", "--output",
                     linked / "calib" / "0000.npy", "--overwrite")
    else:
        result = run("sensitivity", linked / "model.onnx", "--data", linked / "calib", "--output", linked / "s",
                     "--cache", linked / "store" / "0001.npy")
    assert result.exit_code == 2, result.output
    assert (state(linked / "store"), state(linked / "calib")) == before


def test_an_output_folder_holding_the_samples_a_data_folder_links_to_is_refused(linked):
    result = run("quantize", linked / "model.onnx", "--data", linked / "calib", "--output", linked / "store",
                 "--overwrite", "--no-bench")
    assert result.exit_code == 2 and "output folder would contain" in result.stderr
    assert len(list((linked / "store").iterdir())) == 4


def test_writing_beside_a_data_folder_of_links_still_works(linked):
    result = quantize(linked, linked / "calib", "--junit", linked / "gates.xml")
    assert result.exit_code == 0, result.output
    assert (linked / "gates.xml").read_text().startswith("<?xml")


def test_a_data_loader_file_is_an_input_too(linked):
    """--data-loader's .py file was not among the inputs: --junit could replace the user's code."""
    loader = linked / "loader.py"
    loader.write_text("import numpy as np\n\ndef feeds():\n    for _ in range(4):\n"
                      "        yield {'x': np.ones((1, 8), np.float32)}\n")
    (linked / "loader_link.py").symlink_to(loader)
    before = loader.read_text()
    for written in (loader, linked / "loader_link.py"):
        result = run("quantize", linked / "model.onnx", "--data-loader", f"{loader}:feeds", "--output", linked / "out",
                     "--no-bench", "--junit", written)
        assert result.exit_code == 2 and "--junit file would overwrite the input" in result.stderr, result.output
    assert loader.read_text() == before and (linked / "loader_link.py").is_symlink()


def test_a_recipes_base_file_is_an_input_too(linked):
    """`base: common.yaml` is read like the recipe itself: --junit naming it is refused, --overwrite or not."""
    (linked / "common.yaml").write_text("version: 1\n")
    (linked / "r.yaml").write_text("version: 1\nbase: common.yaml\n")
    result = quantize(linked, linked / "calib", "--recipe", linked / "r.yaml", "--junit", linked / "common.yaml",
                      "--overwrite")
    assert result.exit_code == 2 and f"--junit file would overwrite the input {linked / 'common.yaml'}" \
        in result.stderr, result.output
    assert (linked / "common.yaml").read_text() == "version: 1\n"
