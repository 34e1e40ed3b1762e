"""How calibration runs the data: which tensors each pass over it exposes, and how many samples share a run.

Decided from one sample's tensor sizes before the rest runs, and kept apart from running it: ONNX
Runtime holds every exposed tensor until a run ends, so the plan alone bounds a run's memory, and
it can be read (and tested) without a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassPlan:
    groups: list[list[str]]  # the exposed tensors of each pass over the data, in order; one group: one pass
    per_run: int  # samples per ONNX Runtime run (at least one)


def plan_passes(exposed: list[str], sizes: dict[str, float], budget: float) -> PassPlan:
    """The passes that keep a run's tensors within `budget` bytes.

    `sizes`: bytes per sample of every tensor measured (`exposed`, and any reduced in the graph). A run
    holds as many samples as fit when all of them are counted (their bytes bound ONNX Runtime's own
    working memory too, and the runs, which a moving average and the summaries follow, stay the same
    whatever the passes); `exposed` is split into consecutive groups, each one pass, where one sample of
    them all is over the budget (a tensor over it alone gets a pass of its own).
    """
    groups: list[list[str]] = [[]]
    used = 0.0
    for name in exposed:
        if groups[-1] and used + sizes[name] > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += sizes[name]
    return PassPlan(groups, max(1, int(budget // max(sum(sizes.values()), 1.0))))
