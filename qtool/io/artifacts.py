"""Writing results safely: output paths that never touch the inputs, atomic files and folders.

A failed or interrupted run leaves nothing half-written where a later CI step
would pick it up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from qtool.errors import UsageError

STAGING_SUFFIX = ".qtool-tmp"


def check_output_path(output: Path, model_path: Path, overwrite: bool, protected: tuple = ()) -> None:
    """The output folder may not be, or contain, the input model or any other input
    (`protected`: data folders, labels, recipe); an existing one needs --overwrite."""
    out = output.resolve()
    for given in (model_path, *(Path(p) for p in protected if p is not None)):
        source = given.resolve()
        if out == source or source.is_relative_to(out):
            what = "the input model" if given == model_path else "the input"
            raise UsageError(f"{output}: output folder would contain {what} {given}; choose another")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{output}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")


def write_artifacts(output: Path, overwrite: bool, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every artifact into a temporary folder beside `output`, then rename it into place.

    A failure or an interrupt (KeyboardInterrupt, SystemExit) at any point
    leaves `output` as it was (absent, or the old folder) and no temporary
    folder behind: an old folder replaced with --overwrite is first moved
    aside, and only deleted once the new one is in place.
    """
    output = output.resolve()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=STAGING_SUFFIX, dir=output.parent))
    except OSError as exc:
        raise UsageError(f"{output}: cannot create the output folder: {exc.strerror or exc}") from None
    retired = staging.with_name(staging.name[: -len(STAGING_SUFFIX)] + ".old" + STAGING_SUFFIX)
    try:
        for name, write in writers.items():
            try:
                write(staging / name)
            except OSError as exc:
                raise UsageError(f"{output / name}: cannot write: {exc.strerror or exc}") from None
        if output.exists():
            if not overwrite:
                raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")
            output.rename(retired)
        try:
            staging.rename(output)
        except BaseException:
            if retired.exists() and not output.exists():
                retired.rename(output)  # put the old folder back
            raise
    finally:
        for leftover in (staging, retired):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside `path`, then rename over it: a reader sees the old file or the new one, never half."""
    staging = path.with_name(f".{path.name}{STAGING_SUFFIX}")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    replace_file(path, lambda staging: staging.write_text(text, encoding="utf-8"))
