"""Runs a stateful model chunk by chunk: each chunk of a stream gets the state outputs of the chunk
before it, the first chunk the data's first state. Calibration and validation both run through it."""

from __future__ import annotations

from typing import Callable

import numpy as np

from qtool.errors import RecipeError
from qtool.io.samples import Batch
from qtool.io.streams import StreamState

Execute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class StateCarry:
    """The state one model carries along the stream it is running (`state` None: nothing is carried).

    One per model: float and quantized models carry their own state over the same chunks."""

    def __init__(self, state: StreamState | None):
        self.state = state
        self.carried: dict[str, np.ndarray] | None = None

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """The batch's feeds, the state inputs replaced by the carried state unless it begins a stream."""
        if self.state is None or self.carried is None or (batch.starts is not None and batch.starts[0]):
            return batch.feeds
        return {**batch.feeds, **self.carried}

    def keep(self, outputs: dict[str, np.ndarray]) -> None:
        """Take the state outputs of a run (copies: outputs may live in buffers the next run reuses)."""
        if self.state is None:
            return
        where = self.state.where
        missing = [output for output in self.state.carry.values() if output not in outputs]
        if missing:
            raise RecipeError(f"{where}: data.state.carry: {missing[0]!r} is not an output of the model; "
                              f"its outputs: {', '.join(outputs)}")
        for name, output in self.state.carry.items():
            if self.state.misfit(name, outputs[output].shape):
                raise RecipeError(f"{where}: data.state.carry: {{{name}: {output}}}: output {output} has shape "
                                  f"{list(outputs[output].shape)}, state input {name} takes "
                                  f"{list(self.state.shapes[name])}; name the output that returns {name}'s next value")
        self.carried = {name: np.array(outputs[output]) for name, output in self.state.carry.items()}

    def run(self, execute: Execute, batch: Batch) -> dict[str, np.ndarray]:
        """`execute` on the batch's feeds with the carried state; the state it returns is kept."""
        outputs = execute(self.feeds(batch))
        self.keep(outputs)
        return outputs
