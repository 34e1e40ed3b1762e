"""Where qtool may write: every path it writes is checked against the run's inputs before work starts.

A written path may not be an input (same file, whatever the spelling), may not contain one, may not
lie inside an input folder (data), and a folder it would replace may not be the working folder or
one of its parents. Symbolic links count both ways: a written path is checked where its entry lies
(its folders' links resolved: a rename replaces the link) and where it points (an append writes
through it), and an input folder's links (files or folders elsewhere) are inputs too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qtool.errors import UsageError
from qtool.io.artifacts import check_writable


@dataclass(frozen=True)
class _Input:
    given: Path                 # as the user spelled it
    label: str                  # "the input model", "the input", "the model's external data"
    places: frozenset[Path]     # where it lies: its entry and, for a link, its target (both resolved)
    folder: bool
    links: tuple[tuple[Path, Path], ...] = ()  # (link inside the folder, its target resolved)


def _places(path: Path) -> frozenset[Path]:
    """Where `path` lies: its entry (the folders above resolved, a link itself not followed) and
    where it points (every link followed)."""
    absolute = Path(os.path.abspath(path))
    entry = absolute.parent.resolve() / absolute.name if absolute.name else absolute
    return frozenset({entry, absolute.resolve()})


MAX_WALKED = 1_000_000  # entries looked at under one input folder: bounded time on a link to a huge tree


def _folder_links(folder: Path) -> tuple[tuple[Path, Path], ...]:
    """Every symbolic link under `folder` with its target resolved; links to folders are walked
    too (each real folder once, so a loop of links ends; at most MAX_WALKED entries in all)."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    pending = [folder]
    walked = 0
    while pending and walked < MAX_WALKED:
        current = pending.pop()
        real = current.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        walked += len(entries)
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    found.append((path, path.resolve()))
                    if entry.is_dir():
                        pending.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
            except (OSError, RuntimeError):  # a broken or looping link: nothing to protect behind it
                continue
    return tuple(found)


def _input(path: Path, label: str) -> _Input:
    folder = path.is_dir()
    return _Input(path, label, _places(path), folder, _folder_links(path) if folder else ())


def _inputs(model_path: Path | None, protected) -> list[_Input]:
    given = [(Path(model_path), "the input model")] if model_path is not None else []
    given += [(Path(p), "the input") for p in protected if p is not None and str(p) != ""]
    return [_input(path, label) for path, label in given]


def _is_same(a: Path, b: Path) -> bool:
    """One file under two names (a hard link, or a link followed)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _external_data(model_path: Path) -> list[Path]:
    """The model's external-data files (read only when a written path lies in the model's folder)."""
    import onnx

    from qtool.io.model import external_data_files

    try:
        header = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the loader, later
        return []
    return [model_path.parent / location for location in external_data_files(header)]


def _inside(places, folders) -> bool:
    return any(place.is_relative_to(folder) for place in places for folder in folders)


def refuse_inputs(target: Path, model_path: Path | None, protected=(), what: str = "output") -> None:
    """`target` may not be an input nor contain one (model, its external data, recipe, data, tables),
    nor lie inside an input folder or on a file an input folder links to; raises UsageError (exit 2)."""
    written = _places(Path(target))
    inputs = _inputs(model_path, protected)
    if model_path is not None and Path(model_path).is_file() \
            and _inside(written, {p.parent for p in _places(Path(model_path))}):
        inputs += [_input(path, "the model's external data") for path in _external_data(Path(model_path))]
    verb = "contain" if what.endswith("folder") else "overwrite"
    for source in inputs:
        if written & source.places or (Path(target).exists() and _is_same(target, source.given)):
            raise UsageError(f"{target}: {what} would {verb} {source.label} {source.given}; choose another path")
        if _inside(source.places, written):
            raise UsageError(f"{target}: {what} would contain {source.label} {source.given}; choose another path")
        if source.folder and _inside(written, source.places):  # a data file replaced, or a stray file read next run
            raise UsageError(f"{target}: {what} would be written inside {source.label} folder {source.given}; "
                             "choose a path outside it")
        for link, real in source.links:
            if _inside(written, {real}) or _inside({real}, written):
                raise UsageError(f"{target}: {what} would {verb} {real}, which {link} in {source.label} folder "
                                 f"{source.given} links to; choose another path")


def refuse_working_folder(target: Path, what: str = "output folder") -> None:
    """A folder qtool replaces may not be the working folder or hold it (`--output ""` names it)."""
    out = Path(target).resolve()
    if Path.cwd().resolve().is_relative_to(out):
        raise UsageError(f"{str(target) or '(empty)'}: {what} would replace the working folder {Path.cwd()} "
                         "or one of its parents (an empty --output names the working folder); choose another")


def begins_like(pattern: bytes) -> Callable[[Path], bool]:
    """A test of whether a file's first 4 KiB match the regular expression `pattern` (what qtool's own
    files of a kind begin with)."""
    compiled = re.compile(pattern)

    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as handle:
                return compiled.match(handle.read(4096)) is not None
        except OSError:
            return False
    return test


_REPORT = begins_like(rb'\{\s*"schema_version":\s*\d+,\s*"command":\s*"')
# (what such a folder is, a test that recognises one): what --overwrite may replace besides an empty folder
REPORT_FOLDER = ("folder qtool wrote (a report.json of qtool's)", lambda folder: _REPORT(folder / "report.json"))


def check_output_path(output: Path, model_path: Path, overwrite: bool, protected: tuple = (),
                      ours: tuple[str, Callable[[Path], bool]] = REPORT_FOLDER) -> None:
    """The output folder may not be, or contain, the input model or any other input
    (`protected`: data folders, labels, recipe), nor the working folder; an existing one needs
    --overwrite, and even then must be empty or one `ours` recognises (a folder of the user's data
    typed as --output is not deleted), and its place must take a new folder (WriteError, exit 2, before
    any work). Raises UsageError (exit 2) naming the folder."""
    refuse_working_folder(output)
    refuse_inputs(output, model_path, protected, "output folder")
    out = Path(output).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{output}: exists and is not a folder")
    if out.exists():
        kind, recognise = ours
        names = sorted(entry.name for entry in out.iterdir())
        if names and not recognise(out):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise UsageError(f"{output}: output folder holds {shown} and is not a {kind}; --overwrite replaces "
                             "only an empty folder or one qtool wrote: choose another path, or remove it yourself")
        if not overwrite:
            raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")
    check_writable(output)


def check_output_file(path: Path, model_path: Path | None, protected=(), *, what: str,
                      overwrite: bool = True, ours: tuple[str, Callable[[Path], bool]] | None = None) -> None:
    """A file qtool writes or appends to (JUnit, step summary, cache, table, recipe): not an input,
    not a folder, not the working folder; an existing one only with `overwrite`, or, given `ours`
    (what qtool's own file of that kind is called, and a test that recognises one), when it is
    empty or one of qtool's own. Raises UsageError (exit 2) naming the path."""
    if str(path) == "":
        raise UsageError(f"{what}: empty path (an unset variable?); give a file name")
    refuse_inputs(path, model_path, protected, what)
    resolved = Path(path).resolve()
    if resolved.is_dir():
        raise UsageError(f"{path}: {what} is a folder; give a file name")
    if resolved.exists() and not resolved.is_file():
        raise UsageError(f"{path}: {what} exists and is not a regular file")
    if resolved.exists() and not overwrite:
        if ours is None:
            raise UsageError(f"{path}: {what} exists; pass --overwrite to replace it")
        kind, recognise = ours
        if resolved.stat().st_size and not recognise(resolved):
            raise UsageError(f"{path}: {what} exists and is not a {kind}; pass --overwrite to replace it, "
                             "or choose another path")
