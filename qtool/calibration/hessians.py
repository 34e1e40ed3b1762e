"""Second moments of the inputs a weight multiplies, streamed over calibration data.

H = E[x xᵀ] over the d inputs of one output (d = Cin/groups·kh·kw for Conv, K for
MatMul/Gemm) is what GPTQ rounding needs to spread each weight's rounding error
where the data will not see it. Memory is groups·d² float64 per node, whatever
the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATCH_BUDGET = 64 * 2**20  # bytes of im2col patches built at a time


@dataclass(frozen=True)
class Im2Col:
    """How a node's weight meets its input: plain values read off the node's attributes."""

    kind: str  # "conv": input [N, C, *spatial]; "rows": input [..., K] (MatMul, Gemm); "columns": Gemm transA
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends; auto_pad SAME_* resolved per input shape
    auto_pad: str = "NOTSET"


def im2col_of(node, weight_shape: tuple[int, ...]) -> Im2Col | None:
    """The geometry of a Conv, Gemm or 2-D-weight MatMul; None for what GPTQ does not handle here."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv" and len(weight_shape) >= 3:
        spatial = len(weight_shape) - 2
        ints = lambda key, default: tuple(attrs[key].ints) if key in attrs else default  # noqa: E731
        auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        return Im2Col("conv", attrs["group"].i if "group" in attrs else 1, tuple(weight_shape[2:]),
                      ints("strides", (1,) * spatial), ints("dilations", (1,) * spatial),
                      ints("pads", (0,) * 2 * spatial), auto_pad or "NOTSET")
    if node.op_type == "Gemm":
        return Im2Col("columns" if "transA" in attrs and attrs["transA"].i else "rows")
    if node.op_type == "MatMul" and len(weight_shape) == 2:
        return Im2Col("rows")
    return None


def hessian_inputs(nodes, decisions, initializers: dict, notes: list[str]) -> dict[str, tuple[str, Im2Col]]:
    """node -> (its weight's input tensor, geometry) for the nodes whose weights gptq rounds
    (plan's decisions); the ones it cannot handle are noted and rounded to nearest."""
    inputs: dict[str, tuple[str, Im2Col]] = {}
    for node, decision in zip(nodes, decisions):
        if decision.weight_input is None or decision.weights is None or decision.weights.rounding != "gptq":
            continue
        geometry = im2col_of(node, tuple(initializers[node.input[decision.weight_input]].dims))
        if geometry is None or node.input[0] in initializers:
            notes.append(f"{node.name} ({node.op_type}): weights.rounding gptq handles Conv, Gemm and 2-D "
                         "MatMul weights read by an activation; rounded to nearest")
            continue
        inputs[node.name] = (node.input[0], geometry)
    return inputs


def _conv_pads(geometry: Im2Col, spatial: tuple[int, ...]) -> tuple[int, ...]:
    if geometry.auto_pad in ("NOTSET", "VALID"):
        return geometry.pads if geometry.auto_pad == "NOTSET" else (0,) * 2 * len(spatial)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, geometry.kernel, geometry.strides, geometry.dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if geometry.auto_pad == "SAME_UPPER" else large)
        ends.append(large if geometry.auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def _conv_patches(x: np.ndarray, geometry: Im2Col) -> np.ndarray:
    """[groups, d, positions] patches of one batch, columns ordered like the weight's (c, *kernel)."""
    n, c = x.shape[:2]
    rank = len(geometry.kernel)
    pads = _conv_pads(geometry, x.shape[2:])
    x = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads[:rank], pads[rank:])))
    out = [(size - (k - 1) * d - 1) // s + 1
           for size, k, s, d in zip(x.shape[2:], geometry.kernel, geometry.strides, geometry.dilations)]
    taps = []
    for offset in np.ndindex(*geometry.kernel):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, s, m in zip(offset, geometry.dilations, geometry.strides, out))
        taps.append(x[(slice(None), slice(None)) + index])
    patches = np.stack(taps, axis=2)  # [N, C, taps, *out]
    g = geometry.groups
    patches = patches.reshape(n, g, (c // g) * len(taps), -1)  # [N, G, d, positions]
    return patches.transpose(1, 2, 0, 3).reshape(g, (c // g) * len(taps), -1)


class HessianObserver:
    """Accumulates Σ x xᵀ (float64) of a node's weight input and the number of rows summed."""

    def __init__(self, geometry: Im2Col):
        self.geometry = geometry
        self.sum: np.ndarray | None = None
        self.rows = 0

    def update(self, batch: np.ndarray) -> None:
        if self.geometry.kind != "conv":
            rows = batch.reshape(-1, batch.shape[-1]) if self.geometry.kind == "rows" else batch.T
            self._add(rows.T[None].astype(np.float64))
            return
        per_sample = max(batch[:1].nbytes * int(np.prod(self.geometry.kernel)), 1)
        step = max(1, PATCH_BUDGET // per_sample)
        for at in range(0, batch.shape[0], step):  # patches are kernel-size times the input
            self._add(_conv_patches(batch[at:at + step], self.geometry).astype(np.float64))

    def _add(self, patches: np.ndarray) -> None:
        """patches: [groups, d, positions]."""
        moment = patches @ patches.transpose(0, 2, 1)
        self.sum = moment if self.sum is None else self.sum + moment
        self.rows += patches.shape[2]

    def result(self) -> np.ndarray | None:
        """E[x xᵀ] per group, [groups, d, d]; None if nothing was observed."""
        return None if self.sum is None or not self.rows else self.sum / self.rows
