"""Which axis of each model input is the batch axis, read from the model's declared shapes, and
how samples are stacked along it into one ONNX Runtime run.

The batch axis is the symbolic dimension the inputs share (`batch`, `N`, ...: the name held by
the most inputs, the earlier axis on a tie); where no name is shared, each input's first
symbolic dimension; where no dimension is symbolic, a leading 1 (a fixed batch of one: one
sample per run). An input without it (a scalar, a fixed-shape flag or state) is fed as it is
with every sample; samples are stacked into one run only while those inputs hold equal values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """What the model declares for one input; dims are ints, names or None; shape None: rank unknown."""

    name: str
    dtype: np.dtype
    shape: tuple | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype} [rank unknown]"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


@dataclass(frozen=True)
class BatchAxis:
    """One input's batch axis (None: fed unbatched); `fixed`: declared 1, so one sample per run."""

    axis: int | None
    reason: str
    fixed: bool = False

    def as_dict(self) -> dict:
        return {"axis": self.axis, "fixed": self.fixed, "reason": self.reason}


def _symbolic(dim) -> bool:
    """A dimension the model leaves open: a name, unnamed, or a non-positive size (some exporters write -1)."""
    return dim is None or isinstance(dim, str) or dim <= 0


def batch_axes(inputs: list[InputSpec]) -> dict[str, BatchAxis]:
    """Each input's batch axis, with the reason it was chosen."""
    shaped = [spec for spec in inputs if spec.shape is not None]
    counts: Counter = Counter()
    first_at: dict[str, int] = {}
    for spec in shaped:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and dim:
                counts[dim] += dim not in spec.shape[:axis]
                first_at[dim] = min(first_at.get(dim, axis), axis)
    shared = [name for name, count in counts.items() if count >= 2]
    axes: dict[str, BatchAxis] = {}
    if shared:
        name = max(shared, key=lambda n: (counts[n], -first_at[n]))
        for spec in inputs:
            if spec.shape is not None and name in spec.shape:
                axes[spec.name] = BatchAxis(spec.shape.index(name), f"symbolic dimension '{name}', "
                                            f"shared by {counts[name]} inputs")
            else:
                axes[spec.name] = BatchAxis(None, _unbatched(spec, f"no dimension '{name}'"))
        return axes
    if any(_symbolic(dim) for spec in shaped for dim in spec.shape):
        for spec in inputs:
            axis = next((i for i, dim in enumerate(spec.shape or ()) if _symbolic(dim)), None)
            axes[spec.name] = (BatchAxis(axis, f"its first symbolic dimension ({_dim_name(spec.shape[axis])})")
                               if axis is not None else BatchAxis(None, _unbatched(spec, "no symbolic dimension")))
        return axes
    for spec in inputs:
        if spec.shape and spec.shape[0] == 1:
            axes[spec.name] = BatchAxis(0, "fixed batch of 1 declared by the model: one sample per run",
                                        fixed=True)
        else:
            axes[spec.name] = BatchAxis(None, _unbatched(spec, "no symbolic dimension"))
    return axes


def _dim_name(dim) -> str:
    return f"'{dim}'" if isinstance(dim, str) and dim else "unnamed" if not dim else str(dim)


def _unbatched(spec: InputSpec, why: str) -> str:
    if spec.shape is None:
        return "rank unknown: fed as it is with every sample"
    if not spec.shape:
        return "a scalar: fed as it is with every sample"
    return f"{why}: fed as it is with every sample"


def per_run_limit(axes: dict[str, BatchAxis]) -> int | None:
    """At most this many samples in one run (None: no limit of the model's)."""
    batched = [axis for axis in axes.values() if axis.axis is not None]
    if not batched or any(axis.fixed for axis in batched):
        return 1
    return None


def stack_key(sample: dict[str, np.ndarray], axes: dict[str, BatchAxis]) -> tuple:
    """Samples with equal keys stack into one run: batched inputs' other dims agree, unbatched
    inputs hold the same values."""
    key = []
    for name, array in sample.items():
        axis = axes[name].axis
        if axis is None:
            key.append((name, array.shape, array.dtype.str, array.tobytes()))
        else:
            key.append((name, array.shape[:axis] + array.shape[axis + 1:], array.dtype.str))
    return tuple(key)


def stack(samples: list[dict[str, np.ndarray]], axes: dict[str, BatchAxis]) -> dict[str, np.ndarray]:
    """One run's feeds: batched inputs concatenated along their axis, unbatched ones taken once."""
    first = samples[0]
    if len(samples) == 1:
        return dict(first)
    return {name: first[name] if axes[name].axis is None
            else np.concatenate([sample[name] for sample in samples], axis=axes[name].axis)
            for name in first}


def take(feeds: dict[str, np.ndarray], axes: dict[str, BatchAxis], start: int, stop: int) -> dict[str, np.ndarray]:
    """Samples start..stop of a run's feeds (views)."""
    out = {}
    for name, array in feeds.items():
        axis = axes[name].axis
        if axis is None:
            out[name] = array
        else:
            index = (slice(None),) * axis + (slice(start, stop),)
            out[name] = array[index]
    return out
