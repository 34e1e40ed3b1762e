"""The calibration table file: ranges plus what they were measured on, written and read back, and
the checks that a table fits the model and recipe it is used with."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qtool.calibration.calibrate import CalibrationTable, TensorRange
from qtool.errors import CalibrationError
from qtool.io.artifacts import guarded, write_text_atomic
from qtool.io.samples import DataSource
from qtool.recipe.schema import Recipe

TABLE_FORMAT = "qtool-calibration"
TABLE_VERSION = 1


def _json_safe(value):
    """JSON has no inf/nan: write them as strings (as the report does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def table_document(table: CalibrationTable, *, model_path: Path, model_sha256: str, data: DataSource,
                   recipe: dict, qtool_version: str) -> dict:
    """The calibration table file's content: ranges plus what they were measured on."""
    return _json_safe({
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "qtool_version": qtool_version,
        "model": {"path": str(model_path), "sha256": model_sha256},
        "data": {"path": str(data.folder), "listing_sha256": data.listing_hash()},
        "recipe": recipe,
        "samples": table.samples,
        "batching": table.batching,
        "tensors": {
            name: {"lo": r.lo, "hi": r.hi, "method": r.method, "summary": r.summary}
            for name, r in sorted(table.ranges.items())
        },
        **({"method_choice": table.method_choice} if table.method_choice else {}),  # calibration.method auto
    })


def save_table(document: dict, path: Path) -> None:
    """Write atomically: a temporary file beside `path`, renamed over it when complete."""
    path = Path(path)
    with guarded(path.parent, "create the folder"):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def _number(value, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{path}: {where}: expected a finite number, got {value!r}")
    return float(value)


def load_table(path: str | Path) -> CalibrationTable:
    """Read and check a table file written by `qtool calibrate`; any defect is a CalibrationError."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration table: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: not a calibration table (not valid JSON: {exc})") from None
    except RecursionError:  # json nests by recursion: thousands of [ or { exhaust Python's stack
        raise CalibrationError(f"{path}: not a calibration table (JSON nested too deeply)") from None
    if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
        raise CalibrationError(f"{path}: not a calibration table (expected \"format\": \"{TABLE_FORMAT}\"); "
                               "write one with `qtool calibrate`")
    if document.get("version") != TABLE_VERSION:
        raise CalibrationError(f"{path}: calibration table version {document.get('version')!r} is not "
                               f"supported (this qtool reads version {TABLE_VERSION})")
    tensors, model = document.get("tensors"), document.get("model")
    if not isinstance(tensors, dict) or not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
        raise CalibrationError(f"{path}: calibration table lacks its \"tensors\" or \"model.sha256\"")
    ranges = {}
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise CalibrationError(f"{path}: tensors.{name}: expected an object with lo, hi, method")
        lo = _number(entry.get("lo"), f"tensors.{name}.lo", path)
        hi = _number(entry.get("hi"), f"tensors.{name}.hi", path)
        if lo > hi:
            raise CalibrationError(f"{path}: tensors.{name}: lo {lo:g} is above hi {hi:g}")
        summary = entry.get("summary") if isinstance(entry.get("summary"), dict) else {}
        ranges[name] = TensorRange(lo, hi, str(entry.get("method", "")), summary)
    samples = document.get("samples")
    provenance = {key: document.get(key) for key in ("model", "data", "recipe", "qtool_version")}
    batching = document.get("batching") if isinstance(document.get("batching"), dict) else {}
    return CalibrationTable(ranges, samples if isinstance(samples, int) else 0, {"file": str(path), **provenance},
                            batching=batching)


def check_table(table: CalibrationTable, model_sha256: str, needed: list[str]) -> None:
    """Refuse a table measured on another model file, or one without a range the plan needs."""
    source = table.provenance.get("file", "calibration table")
    recorded = (table.provenance.get("model") or {}).get("sha256")
    imported = table.provenance.get("format", TABLE_FORMAT) != TABLE_FORMAT  # other tools' files name no model
    if recorded != model_sha256 and not imported:
        raise CalibrationError(
            f"{source}: calibration table was made for another model (sha256 {str(recorded)[:12]}…, "
            f"this model {model_sha256[:12]}…); run `qtool calibrate` on this model"
        )
    missing = [name for name in needed if name not in table.ranges]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CalibrationError(
            f"{source}: calibration table has no range for {len(missing)} tensor(s) this plan quantizes "
            f"({shown}); was it made with another recipe? run `qtool calibrate` with this recipe"
        )


# What a table's ranges depend on beyond the model and the data: how they were measured, how the data
# became inputs, and the activation type (entropy and mse search the type's grid).
RANGE_SETTINGS = (("calibration", ("method", "percentile", "moving_average", "bins", "overrides")),
                  ("data", ("images", "text", "audio", "state")),
                  ("quantization", ("activations",)))


def recipe_differences(table: CalibrationTable, recipe: Recipe) -> list[str]:
    """A warning naming each setting in RANGE_SETTINGS whose value in the recipe the table recorded
    (a qtool table written by `calibrate`) differs from `recipe`'s: the table's ranges are used as they
    are, so the recipe's value does not apply to them. [] when they agree or the table recorded none."""
    made_with = (table.provenance.get("recipe") or {}).get("resolved") or {}
    if not made_with:
        return []
    now = recipe.as_dict()
    differ = []
    for section, keys in RANGE_SETTINGS:
        for key in keys:
            then_value = (made_with.get(section) or {}).get(key)
            now_value = now[section][key]
            if key in (made_with.get(section) or {}) and then_value != now_value:
                differ.extend(_leaf_differences(f"{section}.{key}", then_value, now_value))
    if not differ:
        return []
    shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
    return [f"calibration table {table.provenance.get('file')} was made with {shown}: its ranges are used as "
            "measured, so this recipe's values do not apply to them; run `qtool calibrate` with this recipe "
            "to measure them its way"]


def _leaf_differences(where: str, then, now) -> list[str]:
    """`where` then (this recipe: now), per differing leaf of two nested dicts."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [line for key in sorted(set(then) | set(now))
                for line in _leaf_differences(f"{where}.{key}", then.get(key), now.get(key))
                if then.get(key) != now.get(key)]
    return [f"{where} {then} (this recipe: {now})"]
