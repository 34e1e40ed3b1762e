"""What a run read: the model file's sha256 and size, taken as it is loaded, so that a report names
the model that was quantized even if the file is replaced while the run goes on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import ModelError
from qtool.io.model import check_model_file, file_sha256, model_file_bytes


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    stat: tuple  # (device, inode, size, mtime_ns) of the model file when it was hashed
    bytes: int | None = None  # with external data; known once the model has loaded


def _stat(path: Path) -> tuple:
    found = os.stat(path)
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def fingerprint(path: Path) -> Fingerprint:
    """Hash of the model file as it is now (taken just before loading it)."""
    path = Path(path)
    check_model_file(path)
    before = _stat(path)
    return Fingerprint(file_sha256(path), before)


def as_loaded(path: Path, taken: Fingerprint) -> Fingerprint:
    """`taken` with the model's size, once it has loaded: if a writer replaced the file in between,
    what was loaded is not what was hashed, and that is an error."""
    try:
        now = _stat(Path(path))
    except OSError:
        now = None
    if now != taken.stat:
        raise ModelError(f"{path}: the model file changed while it was being read; run again once "
                         "whatever writes it is done")
    return Fingerprint(taken.sha256, taken.stat, model_file_bytes(Path(path)))
