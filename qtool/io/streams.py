"""A stateful model's streams: which inputs carry state, from which outputs, and each stream's first state.

With the recipe's `data.state`, every data file (an audio file, a .npy/.npz holding several samples
stacked) is one stream and its samples are the stream's chunks in order. The data source fills the
state inputs with the first state; qtool.runtime.streams feeds each later chunk the state outputs of
the chunk before it, for calibration and validation alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qtool.errors import RecipeError
from qtool.io.arrays import read_npz
from qtool.io.batching import InputSpec
from qtool.recipe.inputs import StateSpec


@dataclass(frozen=True)
class StreamState:
    """State input name -> the output that carries it (`carry`), and each stream's first state (`initial`);
    `shapes`: each state input's declared shape (None: a symbolic dim), `where`: the recipe, for messages."""

    carry: dict[str, str]
    initial: dict[str, np.ndarray]
    shapes: dict[str, tuple] = field(default_factory=dict)
    where: str = "recipe"

    def misfit(self, name: str, shape: tuple) -> bool:
        """Whether an array of `shape` cannot be state input `name` (its rank or a fixed dim differs)."""
        declared = self.shapes.get(name)
        return declared is not None and (len(shape) != len(declared) or any(
            isinstance(want, int) and want > 0 and got != want for got, want in zip(shape, declared)))


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
    if initial_path is not None and not initial_path.is_file():
        raise RecipeError(f"{where}: data.state.initial: no such file {initial_path}")
    given = read_npz(initial_path) if initial_path is not None else {}
    extra = sorted(set(given) - set(spec.carry))
    if extra:
        raise RecipeError(f"{where}: data.state.initial {initial_path}: key {extra[0]!r} is not a state input "
                          f"({', '.join(spec.carry)})")
    shapes = {name: specs[name].shape for name in spec.carry if specs[name].shape is not None}
    state = StreamState(dict(spec.carry), {}, shapes, where)
    for name in spec.carry:
        declared = specs[name]
        if name in given:
            state.initial[name] = np.asarray(given[name], dtype=declared.dtype)
            if state.misfit(name, state.initial[name].shape):
                raise RecipeError(f"{where}: data.state.initial {initial_path}: {name} has shape "
                                  f"{list(state.initial[name].shape)}; the state input is {declared.describe()}")
            continue
        if declared.shape is None:
            raise RecipeError(f"{where}: data.state: input {declared.describe()} has no declared shape for "
                              "its zero state; give data.state.initial (an .npz keyed by input name)")
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else 1 for dim in declared.shape)
        state.initial[name] = np.zeros(shape, dtype=declared.dtype)
    return state
