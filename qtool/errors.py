"""User-facing failures: one exception family, each class carrying its exit code.

The CLI maps a QtoolError to one line on stderr and its exit code; anything
else escaping the library is a bug (exit 3).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_SIDE_FILE = 4  # the artifacts were written, a side file (JUnit, step summary, cache) was not
EXIT_BROKEN_PIPE = 141  # stdout closed by the reader (`qtool ... | head`): 128 + SIGPIPE, quietly
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15


class QtoolError(Exception):
    """A failure caused by what the user gave us; its message is one line."""

    exit_code = EXIT_BAD_INPUT


class UsageError(QtoolError):
    """Command-line arguments that contradict each other or the file system."""


class RecipeError(QtoolError):
    """A recipe that does not parse or does not match the schema."""


class ModelError(QtoolError):
    """A model file that cannot be loaded, is unsafe, or cannot be quantized."""


class DataError(QtoolError):
    """A data folder, data file or labels file that cannot feed the model."""


class CalibrationError(QtoolError):
    """A calibration table that is malformed or does not match the model."""


class WriteError(QtoolError):
    """A file or folder that cannot be written: read-only, disk full, no permission, a busy mount."""


class SideFileError(QtoolError):
    """The artifacts are complete, but a file written beside them (JUnit, step summary, cache) is not.

    `result`, when set, is what the call would have returned (its report and gates), so that the
    caller still reports them: a failed gate outranks a missing side file (exit 1, not 4).
    """

    exit_code = EXIT_SIDE_FILE

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class WorkerError(QtoolError):
    """A worker process died (killed, or out of memory) before it was done."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` cleans up on the way out."""


def one_line(text: str) -> str:
    """A message squeezed onto one line (library messages often span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
