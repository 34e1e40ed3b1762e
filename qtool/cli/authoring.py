"""The commands that help write a recipe: inspect a model, init a starter recipe, print the recipe's or a report's schema."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qtool import api
from qtool.authoring import starter
from qtool.cli import terminal
from qtool.cli.options import echo_json, output_options
from qtool.errors import UsageError
from qtool.io.artifacts import write_text_atomic
from qtool.recipe.builtin import PRESETS, preset_names, preset_summary
from qtool.recipe.schema import recipe_json_schema
from qtool.reporting.schemas import REPORT_SCHEMAS, report_schema


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Recipe whose rules decide what would be quantized (a file or a preset name; "
                   "default: int8's settings without its gates).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Calibration data (a folder or file, read as the recipe says): placement fast is "
                   "previewed on its first sample's tensor shapes, as quantize plans it (without: as fused).")
@output_options
def inspect(model: Path, recipe_path: Path | None, data_dir: Path | None, quiet: bool, verbose: bool,
            as_json: bool) -> None:
    """Show what MODEL is and what qtool would do to it.

    Inputs and outputs (symbolic dims named), opset, op types, external data,
    the problems qtool would refuse or change, and which nodes the recipe
    would quantize, with the reason each other node stays float. Exits 0
    even when it lists problems; 2 only for an unreadable file or --data
    that cannot feed the model.

    \b
    Example:
      qtool inspect model.onnx --recipe int8 --data calib/
    """
    facts = api.inspect(model, recipe_path, data_dir)
    if as_json:
        echo_json(facts.as_dict())
    elif not quiet:
        terminal.print_inspection(terminal.make_console(), facts, verbose)


@click.command()
@output_options
def recipes(quiet: bool, verbose: bool, as_json: bool) -> None:
    """List the built-in presets, one line each.

    A preset's name works wherever a recipe file does (`--recipe int8`), and a
    recipe can start from one (`base: int8`, then only the keys it changes).
    --verbose adds the folder they are read from.

    \b
    Example:
      qtool recipes
    """
    names = preset_names()
    if as_json:
        echo_json([{"name": name, "summary": preset_summary(name), "path": str(PRESETS / f"{name}.yaml")}
                   for name in names])
        return
    if quiet:
        return
    width = max(map(len, names))
    for name in names:
        click.echo(f"{name:<{width}}  {preset_summary(name)}")
    if verbose:
        click.echo(f"(from {PRESETS})")


@click.command()
@click.argument("kind", type=click.Choice(["recipe", *REPORT_SCHEMAS]), default="recipe")
@click.option("--output", "output_path", type=click.Path(path_type=Path),
              help="Write the schema to this file instead of stdout.")
@click.option("--overwrite", is_flag=True, help="Replace the --output file if it exists.")
@output_options
def schema(kind: str, output_path: Path | None, overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Print a JSON Schema: the recipe's (default, for editors and validators), or a report.json's.

    KIND: recipe; report (what quantize and compare write); tune-report (what sensitivity and tune
    write). The schema is JSON already: --json changes nothing here.

    \b
    Example:
      qtool schema --output qtool-recipe.schema.json
      qtool schema report --output report.schema.json
    """
    document = recipe_json_schema() if kind == "recipe" else report_schema(kind)
    text = json.dumps(document, indent=2) + "\n"
    if output_path is None:
        click.echo(text, nl=False)
        return
    if output_path.exists() and not overwrite:
        raise UsageError(f"{output_path}: file exists; pass --overwrite to replace it")
    write_text_atomic(output_path, text)
    if verbose:
        click.echo(f"wrote {output_path}", err=True)


def _float_list(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(part) for part in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter("expected numbers separated by commas, e.g. 0.485,0.456,0.406") from None
    if len(numbers) not in (1, 3):
        raise click.BadParameter(f"expected 1 or 3 values, got {len(numbers)}")
    return numbers


def _size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and 0 < int(part) <= 65536 for part in parts):
        raise click.BadParameter("expected HxW, e.g. 320x320")
    return int(parts[0]), int(parts[1])


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Calibration data folder or file; images there pre-fill data.images, text "
              "data.text, audio data.audio.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation folder to name in validation.data (labels.txt there adds an accuracy gate).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Recipe file to write.")
@click.option("--channels", type=click.Choice(["RGB", "BGR", "GRAY"]),
              help="Channel order the model was trained on (default: the model family's, GRAY for a "
              "1-channel input, else RGB marked CHECK).")
@click.option("--mean", callback=_float_list, help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", callback=_float_list, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True),
              help="Pixels are divided by this first (default 255).")
@click.option("--size", callback=_size, help="Image size HxW (default: the model's static dims, else the "
              "model family's, else the images' one size or a square of their median shorter side, "
              "rounded to multiples of 32).")
@click.option("--schema", "schema_ref",
              help="Path or URL for the `$schema` line (default: write qtool-recipe.schema.json beside the recipe).")
@click.option("--overwrite", is_flag=True, help="Replace an existing recipe file.")
@output_options
def init(model: Path, data_dir: Path | None, validation_data: Path | None, output_path: Path,
         channels: str | None, mean, std, scale: float | None, size, schema_ref: str | None,
         overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Write a starter recipe for MODEL, every section commented.

    Inputs come from the model; with image data, data.images is pre-filled:
    size and layout from the model (or from the images when its H and W are
    dynamic); channel order and mean/std from the options, else from a model
    family the file identifies (PaddleOCR detector, classifier, recogniser),
    else neutral defaults marked CHECK. Text data (.txt, .jsonl) fills
    data.text with a tokenizer.json found beside the model or the data, audio
    (.wav .flac .ogg) data.audio, and inputs named like state (h0, c, state,
    hidden, ...) with an output of their shape data.state. The recipe loads as
    written; `qtool quantize` runs it unchanged. With --data, the recipe's int8
    model (placed as quantize places it) is timed against float on the first
    sample: above 0.9x float a warning says that its max_latency_ratio gate will
    likely fail on this machine; where placement fast keeps every node float
    (quantize refuses: no 8-bit kernel pays) it says so, timing placement fused.

    \b
    Example:
      qtool init model.onnx --data calib/ --channels BGR \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --output recipe.yaml
    """
    choices = starter.ImageChoices(channels=channels, mean=mean, std=std, scale=scale, size=size)
    with terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result = api.init_recipe(model, output_path, data_dir=data_dir, validation_data=validation_data,
                                 image=choices, schema=schema_ref, overwrite=overwrite, progress=progress)
    recipe, schema_file = result.recipe, result.schema
    for line in result.warnings if not quiet else ():
        click.echo(f"warning: {line}", err=True)
    if as_json:
        echo_json({"recipe": str(recipe), "schema": str(schema_file) if schema_file else None,
                   "latency_ratio": result.latency_ratio, "warnings": result.warnings})
        return
    if quiet:
        return
    click.echo(f"wrote {recipe}" + (f" and {schema_file}" if schema_file else ""))
    if verbose:
        click.echo(recipe.read_text(encoding="utf-8"), nl=False)
    if "# CHECK:" in recipe.read_text(encoding="utf-8"):
        click.echo("check the values marked CHECK in it: they are defaults, not read from your model", err=True)
