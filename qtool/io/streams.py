"""A stateful model's streams: which inputs carry state, from which outputs, and each stream's first state.

With the recipe's `data.state`, every data file (an audio file, a .npy/.npz holding several samples
stacked) is one stream and its samples are the stream's chunks in order. The data source fills the
state inputs with the first state; qtool.runtime.streams feeds each later chunk the state outputs of
the chunk before it, for calibration and validation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import RecipeError
from qtool.io.arrays import read_npz
from qtool.io.batching import InputSpec
from qtool.recipe.inputs import StateSpec


@dataclass(frozen=True)
class StreamState:
    """State input name -> the output that carries it (`carry`), and each stream's first state (`initial`)."""

    carry: dict[str, str]
    initial: dict[str, np.ndarray]


def stream_state(spec: StateSpec, inputs: list[InputSpec], initial_path: Path | None, where: str) -> StreamState:
    """The recipe's `data.state` checked against the model's inputs; initial states from `initial_path`
    (an .npz keyed by input name) or zeros of each state input's declared shape (a symbolic dim as 1).
    A name the model lacks, or zeros of an unknown shape, is a RecipeError naming `where` (the recipe)."""
    specs = {spec.name: spec for spec in inputs}
    unknown = [name for name in spec.carry if name not in specs]
    if unknown:
        raise RecipeError(f"{where}: data.state.carry: {unknown[0]!r} is not a model input; "
                          f"the model's inputs: {', '.join(specs)}")
    if len(spec.carry) >= len(specs):
        raise RecipeError(f"{where}: data.state.carry names every model input as state; "
                          "at least one input must come from the data")
    given = read_npz(initial_path) if initial_path is not None else {}
    extra = sorted(set(given) - set(spec.carry))
    if extra:
        raise RecipeError(f"{where}: data.state.initial {initial_path}: key {extra[0]!r} is not a state input "
                          f"({', '.join(spec.carry)})")
    initial = {}
    for name in spec.carry:
        declared = specs[name]
        if name in given:
            initial[name] = np.asarray(given[name], dtype=declared.dtype)
            continue
        if declared.shape is None:
            raise RecipeError(f"{where}: data.state: input {declared.describe()} has no declared shape for "
                              "its zero state; give data.state.initial (an .npz keyed by input name)")
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else 1 for dim in declared.shape)
        initial[name] = np.zeros(shape, dtype=declared.dtype)
    return StreamState(dict(spec.carry), initial)
