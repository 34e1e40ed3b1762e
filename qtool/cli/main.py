"""The command line: the `qtool` group, its commands, and one place that maps errors to exit codes."""

from __future__ import annotations

import signal
import sys
import threading
import traceback

import click

from qtool import __version__
from qtool.cli import authoring
from qtool.cli import pipeline
from qtool.cli import search
from qtool.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, QtoolError, one_line, reason


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` cleans up on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class QtoolGroup(click.Group):
    """Turns every failure into one line and its exit code, in one place.

    User errors (QtoolError) exit 2 with `Error: ...`; SIGINT exits 130 and
    SIGTERM 143, after the api's cleanup ran; anything else is a bug: exit 3.
    """

    def invoke(self, ctx: click.Context):
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
        try:
            return super().invoke(ctx)
        except QtoolError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            click.echo(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'}: "
                       "nothing was written.", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: one line, or the traceback with --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            else:
                click.echo(f"Internal error ({type(exc).__name__}: {reason(exc)}); "
                           "run again with --debug for the traceback and report it.", err=True)
            sys.exit(EXIT_INTERNAL)
        finally:
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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
