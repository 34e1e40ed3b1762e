"""stdout and stderr as qtool prints to them: any encoding, full disks and closed pipes handled in one place.

Text a stream's encoding cannot hold (an ASCII-only locale) is spelled in ASCII (→ as ->); a reader
that closed the pipe raises StdoutClosed (the CLI ends quietly); any other OSError is a WriteError
naming the stream (exit 2), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import Iterator

from qtool.errors import WriteError

ASCII_SPELLING = str.maketrans({
    "→": "->", "←": "<-", "×": "x", "…": "...", "≥": ">=", "≤": "<=", "–": "-", "—": "-", "·": "*",
    "µ": "u", "±": "+/-", "‘": "'", "’": "'", "“": '"', "”": '"', "✓": "ok", "✗": "x", "█": "#", "━": "-",
})


class StdoutClosed(BaseException):
    """The reader of stdout (or stderr) went away: not an error of the run, the CLI exits quietly."""


class StreamError(WriteError):
    """stdout or stderr cannot be written (a full disk behind `>`): exit 2, the stream then silenced."""


class GuardedStream:
    """A text stream that never raises an encoding error and turns OSError into qtool's errors.

    It hides the wrapped stream's binary `buffer`, so that click writes through it too.
    """

    def __init__(self, stream, name: str):
        self._stream = stream
        self._name = name

    def write(self, text) -> int:
        if not isinstance(text, str):
            raise TypeError("write() argument must be str")  # click probes streams with b""
        try:
            try:
                return self._stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self._stream, "encoding", None) or "ascii"
                text = text.translate(ASCII_SPELLING).encode(encoding, "backslashreplace").decode(encoding)
                return self._stream.write(text)
        except OSError as exc:
            raise self._error(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._error(exc) from None
        except ValueError:  # flushing a closed file
            pass

    def _error(self, exc: OSError) -> BaseException:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET) or isinstance(exc, BrokenPipeError):
            return StdoutClosed()
        return StreamError(f"{self._name}: cannot write: {exc.strerror or exc}")

    def __getattr__(self, name: str):
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self._stream, name)


@contextlib.contextmanager
def guard_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr guarded inside; flushed (through the guard) on the way out."""
    saved = sys.stdout, sys.stderr
    guarded = [GuardedStream(stream, name) if stream is not None and not isinstance(stream, GuardedStream)
               else stream for stream, name in zip(saved, ("stdout", "stderr"))]
    sys.stdout, sys.stderr = guarded
    try:
        yield
        for stream in guarded:
            if stream is not None:
                stream.flush()
    finally:
        sys.stdout, sys.stderr = saved
