"""The `qtool` console entry: loads the CLI under a Ctrl-C guard.

Importing the CLI loads numpy, onnx, onnxruntime and pydantic (seconds on a busy machine); a Ctrl-C
then printed a 30-line KeyboardInterrupt traceback. Here it gets the CLI's own line and exit code.
"""

from __future__ import annotations

import sys

from qtool.errors import EXIT_INTERRUPTED


def main() -> None:
    """Run the CLI (qtool.cli.main.main); exit 130 with one line when interrupted while it loads."""
    try:
        from qtool.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted: nothing was written.\n")
        sys.exit(EXIT_INTERRUPTED)
    run()
