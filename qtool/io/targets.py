"""Where qtool may write: every path it writes is checked against the run's inputs before work starts.

A written path may not be an input (same file, whatever the spelling), may not contain one, may not
lie inside an input folder (data), and a folder it would replace may not be the working folder or
one of its parents.
"""

from __future__ import annotations

import os
from pathlib import Path

from qtool.errors import UsageError


def _inputs(model_path: Path | None, protected) -> list[tuple[Path, str]]:
    given = [(model_path, "the input model")] if model_path is not None else []
    return given + [(Path(p), "the input") for p in protected if p is not None and str(p) != ""]


def _is_same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _external_data(model_path: Path) -> list[Path]:
    """The model's external-data files (read only when a written path lies in the model's folder)."""
    import onnx

    from qtool.io.model import external_data_files

    try:
        header = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the loader, later
        return []
    return [model_path.parent / location for location in external_data_files(header)]


def refuse_inputs(target: Path, model_path: Path | None, protected=(), what: str = "output") -> None:
    """`target` may not be an input nor contain one (model, its external data, recipe, data, tables)."""
    out = Path(target).resolve()
    inputs = _inputs(model_path, protected)
    if model_path is not None and Path(model_path).is_file() and out.is_relative_to(Path(model_path).resolve().parent):
        inputs += [(path, "the model's external data") for path in _external_data(Path(model_path))]
    for given, label in inputs:
        source = given.resolve()
        if (given.exists() and out.exists() and _is_same(out, given)) or out == source:
            verb = "contain" if what.endswith("folder") else "overwrite"
            raise UsageError(f"{target}: {what} would {verb} {label} {given}; choose another path")
        if source.is_relative_to(out):
            raise UsageError(f"{target}: {what} would contain {label} {given}; choose another path")
        if given.is_dir() and out.is_relative_to(source):  # a data file replaced, or a stray file the next run reads
            raise UsageError(f"{target}: {what} would be written inside {label} folder {given}; "
                             "choose a path outside it")


def refuse_working_folder(target: Path, what: str = "output folder") -> None:
    """A folder qtool replaces may not be the working folder or hold it (`--output ""` names it)."""
    out = Path(target).resolve()
    if Path.cwd().resolve().is_relative_to(out):
        raise UsageError(f"{str(target) or '(empty)'}: {what} would replace the working folder {Path.cwd()} "
                         "or one of its parents (an empty --output names the working folder); choose another")


def check_output_path(output: Path, model_path: Path, overwrite: bool, protected: tuple = ()) -> None:
    """The output folder may not be, or contain, the input model or any other input
    (`protected`: data folders, labels, recipe), nor the working folder; an existing one needs --overwrite."""
    refuse_working_folder(output)
    refuse_inputs(output, model_path, protected, "output folder")
    out = Path(output).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{output}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")


def check_output_file(path: Path, model_path: Path | None, protected=(), *, what: str,
                      overwrite: bool = True) -> None:
    """A file qtool writes or appends to (JUnit, step summary, cache, table, recipe): not an input,
    not a folder, not the working folder; an existing one only with `overwrite`."""
    if str(path) == "":
        raise UsageError(f"{what}: empty path (an unset variable?); give a file name")
    refuse_inputs(path, model_path, protected, what)
    resolved = Path(path).resolve()
    if resolved.is_dir():
        raise UsageError(f"{path}: {what} is a folder; give a file name")
    if resolved.exists() and not resolved.is_file():
        raise UsageError(f"{path}: {what} exists and is not a regular file")
    if resolved.exists() and not overwrite:
        raise UsageError(f"{path}: {what} exists; pass --overwrite to replace it")
