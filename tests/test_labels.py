"""Labels and validation data an accuracy gate can trust: labels the model cannot produce and conflicting
lines are refused (exit 2 naming the line); partial labels, a float accuracy at chance and validating on
the calibration folder are warned about."""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner

from conftest import SAMPLE
from qtool import api
from qtool.cli.main import main
from qtool.errors import DataError
from qtool.evaluation.labels import label_warnings
from qtool.io.data import read_labels
from qtool.recipe.schema import Recipe

MODEL = SAMPLE / "model.onnx"  # digits_cnn: [N, 10] scores


@pytest.fixture
def eval_copy(tmp_path):
    """The first 16 evaluation samples of digits_cnn and their labels, in a folder of the test's own."""
    folder = tmp_path / "eval"
    folder.mkdir()
    lines = (SAMPLE / "eval" / "labels.txt").read_text().splitlines()[:16]
    for line in lines:
        shutil.copy(SAMPLE / "eval" / line.split()[0], folder)
    return folder, [line.split() for line in lines]


def write_labels(folder, pairs):
    (folder / "labels.txt").write_text("".join(f"{name} {label}\n" for name, label in pairs))


def compare(folder, tmp_path, *extra):
    result = CliRunner().invoke(main, ["compare", str(MODEL), str(MODEL), "--data", str(folder), "--output",
                                       str(tmp_path / "out"), "--gate", "max_accuracy_drop=0.01", *extra],
                                env={"GITHUB_STEP_SUMMARY": None})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_a_label_the_model_cannot_produce_is_exit_2_naming_its_line(eval_copy, tmp_path):
    folder, pairs = eval_copy
    write_labels(folder, [(name, 12 if i == 3 else label) for i, (name, label) in enumerate(pairs)])
    result = compare(folder, tmp_path)
    assert result.exit_code == 2
    assert f"labels.txt:4: label 12 for {pairs[3][0]} is not a class of the model" in result.stderr
    assert "10 classes, 0–9" in result.stderr


def test_quantize_refuses_out_of_range_labels_too(eval_copy, tmp_path):
    folder, pairs = eval_copy
    write_labels(folder, [(name, -1) for name, _ in pairs])
    with pytest.raises(DataError, match=r"labels.txt:1: label -1 .* is not a class of the model"):
        api.quantize(MODEL, SAMPLE / "calib", Recipe(), tmp_path / "q", validation_data=folder)


def test_conflicting_lines_for_one_file_are_refused_and_repeats_accepted(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("a.npy 1\nb.npy 2\na.npy 1\n")
    assert read_labels(path) == {"a.npy": 1, "b.npy": 2}
    path.write_text("a.npy 1\nb.npy 2\na.npy 3\n")
    with pytest.raises(DataError, match=r"labels.txt:3: a.npy is labelled 3 here but 1 on line 1"):
        read_labels(path)


def test_float_accuracy_at_chance_and_partial_labels_are_warned_about(eval_copy, tmp_path):
    folder, pairs = eval_copy
    wrong = [(name, (int(label) + 1) % 10) for name, label in pairs[:10]]  # every label wrong, 10 of 16 files
    write_labels(folder, wrong)
    result = compare(folder, tmp_path)
    assert result.exit_code == 0  # the same model on both sides: the gate passes, but on what?
    text = " ".join(result.stdout.split())
    assert "labels 10 of the 16 validation samples" in text
    assert "at or below chance (1/10 = 10.0%)" in text
    report = yaml.safe_load((tmp_path / "out" / "report.json").read_text())
    assert any("at or below chance" in warning for warning in report["warnings"])


def test_labels_that_measure_nothing_are_warned_about(eval_copy, tmp_path):
    """A new user's --labels on speech_embedding (an embedding [N, 1, 1, 96], no class scores), or a
    labels file naming none of the files: no accuracy, and no word of why."""
    folder, pairs = eval_copy
    write_labels(folder, [(f"other-{name}", label) for name, label in pairs])
    result = CliRunner().invoke(main, ["compare", str(MODEL), str(MODEL), "--data", str(folder), "--output",
                                       str(tmp_path / "out")], env={"GITHUB_STEP_SUMMARY": None})
    assert result.exit_code == 0, result.output
    report = yaml.safe_load((tmp_path / "out" / "report.json").read_text())
    assert "accuracy" not in report["validation"]
    assert report["warnings"] == [f"{folder / 'labels.txt'} labels none of the 16 validation samples (it names "
                                  "none of their files): no top-1 accuracy measured"]
    assert label_warnings(16, 0, None, 0, "labels.txt") == [
        "labels.txt labels none of the 16 validation samples (the model's first output is not class scores "
        "[N, classes]): no top-1 accuracy measured"]


def test_right_labels_for_every_file_warn_nothing(eval_copy, tmp_path):
    folder, pairs = eval_copy
    write_labels(folder, pairs)
    result = compare(folder, tmp_path)
    assert result.exit_code == 0
    assert "warning" not in result.stdout


def test_validating_on_the_calibration_folder_is_called_optimistic(tmp_path):
    """Finding 16: the warning came only when validation data was absent, not when --validation-data
    named the --data folder itself (here through another spelling of its path)."""
    result = api.quantize(MODEL, SAMPLE / "calib", Recipe(), None,
                          validation_data=SAMPLE / "calib" / ".." / "calib")
    assert any(w.startswith("validation ran on the calibration data") and "figures are optimistic" in w
               for w in result.report["warnings"])
    other = api.quantize(MODEL, SAMPLE / "calib", Recipe(), None, validation_data=SAMPLE / "eval")
    assert not any("optimistic" in w for w in other.report["warnings"])


def test_sensitivity_refuses_labels_the_model_cannot_produce(eval_copy, tmp_path):
    """tune and sensitivity score trials against the same labels: refused there too, before any trial."""
    from qtool.search import api as search_api

    folder, pairs = eval_copy
    write_labels(folder, [(name, 10 if i == 0 else label) for i, (name, label) in enumerate(pairs)])
    with pytest.raises(DataError, match=r"labels.txt:1: label 10 for .* 10 classes, 0–9"):
        search_api.sensitivity(MODEL, SAMPLE / "calib", Recipe(), tmp_path / "sens", validation_data=folder)
