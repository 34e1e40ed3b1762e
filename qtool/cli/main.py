"""The command line: the `qtool` group, its commands, and one place that maps errors to exit codes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

import click

from qtool import __version__
from qtool.cli import authoring
from qtool.cli import pipeline
from qtool.cli import search
from qtool.cli.streams import StdoutClosed, StreamError, guard_streams
from qtool.errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, QtoolError, Terminated,
                          one_line, reason)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class QtoolGroup(click.Group):
    """Turns every failure into one line and its exit code, in one place.

    User errors (QtoolError) exit 2 with `Error: ...`; SIGINT exits 130 and
    SIGTERM 143, after the api's cleanup ran; a reader that closed stdout
    (`qtool ... | head`) ends the run quietly (141); anything else is a bug: exit 3.
    """

    def invoke(self, ctx: click.Context):
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
        try:
            with guard_streams():
                return super().invoke(ctx)
        except StdoutClosed:
            _silence_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
        except QtoolError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            _say(f"Error: {one_line(exc)}")
            if isinstance(exc, StreamError):
                _silence_stdout()
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            _say(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'}: nothing was written.")
            sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: one line, or the traceback with --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            else:
                _say(f"Internal error ({type(exc).__name__}: {reason(exc)}); "
                     "run again as `qtool --debug COMMAND ...` for the traceback and report it.")
            sys.exit(EXIT_INTERNAL)
        finally:
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _say(line: str) -> None:
    """One line on stderr, in whatever encoding stderr has; a closed stderr loses it, nothing more."""
    with guard_streams():
        try:
            click.echo(line, err=True)
        except StdoutClosed:
            pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's final flush would fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test runner's buffer)
        pass


@click.group(cls=QtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Post-training quantization of ONNX models.

    \b
    Example:
      qtool quantize model.onnx --recipe int8 --data calib/ --output out/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for command in (pipeline.quantize, pipeline.calibrate, authoring.inspect, authoring.schema,
                pipeline.compare, authoring.init, authoring.recipes, search.sensitivity, search.tune):
    main.add_command(command)
