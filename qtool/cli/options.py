"""The option decorators and JSON output every command spells and means the same way."""

from __future__ import annotations

import json
import logging

import click


def _quiet_libraries(ctx: click.Context, param, quiet: bool) -> bool:
    """--quiet holds for the libraries too: their log records below an error (Ray's note on the token
    of the cluster it starts) are dropped until the command ends, instead of reaching stderr through
    Python's last-resort handler."""
    if quiet:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        ctx.call_on_close(lambda: logging.disable(previous))
    return quiet


def output_options(command):
    """`--quiet`, `--verbose` and `--json`, spelled and meant the same on every command."""
    command = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout, and nothing else there.")(command)
    command = click.option("--verbose", "-v", is_flag=True, help="Print more detail.")(command)
    command = click.option("--quiet", "-q", is_flag=True, callback=_quiet_libraries,
                           help="Print nothing but errors.")(command)
    return command


def _parse_providers(ctx: click.Context, param, value: str | None):
    """The providers `--provider` names, parsed (None: not given, ORT's default); an empty value is
    refused as the names it lacks are, never read as CPU."""
    from qtool.runtime.session import parse_providers

    return None if value is None else parse_providers(value)


def provider_option(command):
    """`--provider`: ONNX Runtime execution providers for every session of the command."""
    return click.option(
        "--provider", "providers", metavar="NAME[:K=V;..][,NAME..]", callback=_parse_providers,
        help="ONNX Runtime execution providers, in order of preference, with options where needed "
             "(e.g. TensorRT:trt_fp16_enable=1,CUDA,CPU; short names add ExecutionProvider) for every "
             "session of the command: calibration, validation, trials, per-layer and latency; recorded in "
             "the report; an option the provider does not take is refused. Default: CPU.")(command)


def executor_options(what: str):
    """`--executor local|ray` and `--ray-address`: where `what` (trials, calibration shards) run."""
    def decorate(command):
        command = click.option(
            "--ray-address", metavar="ADDR",
            help="Ray cluster to run on with --executor ray (default: RAY_ADDRESS, else a local Ray "
                 "instance started for this run).")(command)
        return click.option(
            "--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
            help=f"Where {what} run: processes on this machine, or Ray tasks on a cluster "
                 "(pip install 'qtool-onnx[ray]'; docs/scale-out.md).")(command)
    return decorate


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))
