"""Writing results safely: atomic files and folders, every OSError turned into one clear error.

A failed or interrupted run leaves nothing half-written where a later CI step
would pick it up. Every file qtool writes goes through `guarded` (an OSError
becomes a WriteError, exit 2, naming the path); staging names are short and
carry the writer's pid, so a later run removes those a killed run left.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from qtool.errors import UsageError, WriteError

STAGING_SUFFIX = ".qtool-tmp"
# Whose staging it is: the writer's pid and a tag of its host (a folder shared by containers or
# machines holds pids that mean nothing here).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_STAGING_NAME = re.compile(r"^\.(\d+)\.([0-9a-f]{6})-[0-9a-f]+(\.old)?" + re.escape(STAGING_SUFFIX) + "$")


@contextlib.contextmanager
def guarded(path: Path, action: str = "write") -> Iterator[None]:
    """Any OSError inside becomes a WriteError naming `path` (disk full, read-only, permissions...)."""
    try:
        yield
    except OSError as exc:
        raise WriteError(f"{path}: cannot {action}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM recorded, not acted on, inside (then raised again on the way out): for the
    steps between creating a staging path and the `finally` that removes it. Handlers, not a
    signal mask: any thread may receive the signal, the handler always runs on the main one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


def staging_name() -> str:
    """`.<pid>.<host>-<random>.qtool-tmp` (33 characters): short whatever the output's name, and
    says whose it is."""
    return f".{os.getpid()}.{_HOST}-{secrets.token_hex(4)}{STAGING_SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove staging files and folders in `folder` written on this host by a process (the pid in
    the name) that is no longer running, and which belong to this user; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = _STAGING_NAME.match(entry.name)
        if not found or found.group(2) != _HOST or int(found.group(1)) == os.getpid() \
                or _alive(int(found.group(1))):
            continue
        try:
            if entry.lstat().st_uid != os.getuid():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(target: Path, action: str = "create the output folder") -> None:
    """Before any work: the folder where writing `target` would make its first entry (the staging
    path, or the folders up to it) takes one. A read-only mount, a folder without write permission
    or a file where a folder must be failed only after calibration and validation had run.
    Raises WriteError naming `target`, as the write itself would."""
    target = Path(target).absolute()
    folder = target if target.is_dir() and os.path.ismount(target) else target.parent  # where staging goes
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent  # the first missing folder is made here
    probe: Path | None = None
    try:
        with signals_deferred(), guarded(target, action):
            probe = folder / staging_name()
            probe.mkdir(mode=0o700)
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                probe.rmdir()


def write_artifacts(output: Path, overwrite: bool, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every artifact into a temporary folder beside `output`, then rename it into place.

    A failure or an interrupt (KeyboardInterrupt, SystemExit) at any point
    leaves `output` as it was (absent, or the old folder) and no temporary
    folder behind: an old folder replaced with --overwrite is first moved
    aside, and only deleted once the new one is in place. An `output` that is
    a mount point (a container volume) cannot be renamed: its contents are
    replaced instead, entry by entry. The folder gets the umask's mode, as mkdir gives.
    """
    output = output.resolve()
    with guarded(output, "create the output folder"):
        output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output.parent)
    in_place = output.is_dir() and os.path.ismount(output)
    if in_place and not overwrite:
        raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")
    staging: Path | None = None
    retired: Path | None = None
    try:
        with signals_deferred(), guarded(output, "create the output folder"):
            staging = (output if in_place else output.parent) / staging_name()
            staging.mkdir(mode=0o777)
        for name, write in writers.items():
            with guarded(output / name):
                write(staging / name)
        if in_place:
            with guarded(output, "replace the contents of"):
                retired = _replace_contents(output, staging)
            return
        if output.exists() and not overwrite:
            raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")
        with signals_deferred():  # both renames, or neither
            if output.exists():
                retired = staging.with_name(staging.name[: -len(STAGING_SUFFIX)] + ".old" + STAGING_SUFFIX)
                try:
                    output.rename(retired)
                except OSError as exc:
                    retired = None
                    if exc.errno not in (errno.EBUSY, errno.EXDEV):  # a mount point seen only now
                        raise WriteError(f"{output}: cannot move aside the old folder: {exc.strerror}") from None
                    with guarded(output, "replace the contents of"):
                        retired = _replace_contents(output, staging)
                    return
            with guarded(output, "rename the new folder into place"):
                staging.rename(output)
    finally:
        if retired is not None and retired.exists() and not output.exists():
            with contextlib.suppress(OSError):
                retired.rename(output)  # put the old folder back
        for leftover in (staging, retired):
            if leftover is not None and leftover.exists() and leftover != output:
                shutil.rmtree(leftover, ignore_errors=True)


def _replace_contents(output: Path, staging: Path) -> Path:
    """Swap `output`'s entries for `staging`'s (both inside `output`); the old ones go into a
    folder that is returned for removal, and come back if a move fails."""
    retired = staging.with_name(staging.name[: -len(STAGING_SUFFIX)] + ".old" + STAGING_SUFFIX)
    retired.mkdir()
    moved: list[str] = []
    placed: list[str] = []
    try:
        for entry in list(output.iterdir()):
            if entry not in (staging, retired):
                entry.rename(retired / entry.name)
                moved.append(entry.name)
        for entry in list(staging.iterdir()):
            entry.rename(output / entry.name)
            placed.append(entry.name)
    except BaseException:
        for name in placed:
            with contextlib.suppress(OSError):
                (output / name).rename(staging / name)
        for name in moved:
            with contextlib.suppress(OSError):
                (retired / name).rename(output / name)
        with contextlib.suppress(OSError):
            retired.rmdir()
        raise
    return retired


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside `path`, then rename over it: a reader sees the old file or the new one, never half.
    An OSError becomes a WriteError naming `path`."""
    path = Path(path)
    staging: Path | None = None
    try:
        with guarded(path):
            remove_stale_staging(path.parent)
            with signals_deferred():
                staging = path.with_name(staging_name())
            write(staging)
            os.replace(staging, path)
    finally:
        if staging is not None:
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    replace_file(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def append_text(path: Path, text: str) -> None:
    """Append to a file others write too (a CI step summary); an OSError becomes a WriteError."""
    with guarded(path, "append to"), open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


@contextlib.contextmanager
def temporary_folder(prefix: str) -> Iterator[Path]:
    """A scratch folder in the system's temporary folder (TMPDIR), removed on the way out."""
    try:
        folder = tempfile.TemporaryDirectory(prefix=prefix)
    except OSError as exc:  # FileNotFoundError "No usable temporary directory" included
        raise WriteError(f"no usable temporary folder (TMPDIR={os.environ.get('TMPDIR', 'unset')}): "
                         f"{exc.strerror or exc}; set TMPDIR to a writable folder") from None
    with folder as name:
        yield Path(name)
