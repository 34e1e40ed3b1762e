"""What a recipe value may be beyond its type: booleans are not numbers, and each gate's threshold lies
within what its figure can take (else the gate could never pass, or never fail)."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

from pydantic import BaseModel


def boolean_as_number(value: Any, annotation: Any) -> bool:
    """A boolean (at any depth of `value`) where the type takes numbers and no booleans: YAML reads
    yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0."""
    return holds_bool(value) and _numeric(annotation) and not _may_hold_bool(annotation)


def holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(map(holds_bool, value))
    return isinstance(value, dict) and any(map(holds_bool, value.values()))


def _numeric(annotation: Any) -> bool:
    """The type takes numbers somewhere (int, float, Literal[1], list[float], ...)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(arg, (int, float)) for arg in typing.get_args(annotation))
    return any(_numeric(arg) for arg in typing.get_args(annotation))


def _may_hold_bool(annotation: Any) -> bool:
    """True where a boolean is a value of the type (bool, Literal[True]), or a nested section checks its own."""
    if annotation is bool or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(arg, bool) for arg in typing.get_args(annotation))
    return any(_may_hold_bool(arg) for arg in typing.get_args(annotation))


# Each gate's valid thresholds: the values its figure can take (lowest, highest, lowest excluded?, in words).
# Outside them a gate could never pass, or never fail.
GATE_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "min_cosine": (-1.0, 1.0, False, "a cosine from -1 to 1"),
    "min_sqnr_db": (-math.inf, math.inf, False, "a finite number of dB"),
    "min_slice_sqnr_db": (-math.inf, math.inf, False, "a finite number of dB"),
    "max_accuracy_drop": (-1.0, 1.0, False, "a fraction from -1 to 1 (0.01: one point of top-1)"),
    "min_top1_agreement": (0.0, 1.0, False, "a fraction from 0 to 1"),
    "max_latency_ratio": (0.0, math.inf, True, "a ratio above 0"),
    "min_size_ratio": (0.0, math.inf, True, "a ratio above 0"),
    "min_exact_match": (0.0, 1.0, False, "a fraction from 0 to 1"),
}


def gate_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be gate `name`'s threshold (what is allowed), or None when it can."""
    lo, hi, open_low, allowed = GATE_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected {allowed}"
    if value < lo or value > hi or (open_low and value == lo):
        return f"{value:g} is outside what {name} measures: expected {allowed}"
    return None
