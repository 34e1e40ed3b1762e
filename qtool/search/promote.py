"""The search: promote the most sensitive nodes a precision step, a few at a time, until the gates pass.

Steps above the recipe are float, then 16-bit activations. For each step the
number of promoted nodes grows 1, 2, 4, ... until the gates pass, taken in two
orders side by side: sensitivity order ("top k") and graph order ("first k": one
float region from the inputs, which removes every rounding inside it, where lone
nodes promoted in sensitivity order leave their inputs and outputs rounded). The
smaller passing set wins; its count is bisected back in its own order, each
promoted node is tried demoted again (last in its order first, but those left
with only quantized neighbours, which cost a conversion on every side, first of
all), and the nodes left are tried at the other steps. A float promotion also
takes the integer regions it encloses (`fill`): a Conv kept float whose output
is still quantized by its readers keeps the rounding error it was promoted to
remove, and pays conversions besides.
Among the trials that pass, the fastest wins (each timed as its batch ends), then the smallest;
`confirm` re-times the close finalists with more rounds once the search is done. Trials go out
`jobs` at a time through `evaluate`; the search never sees processes. A trial `evaluate` does not
return (an executor lost it) counts as failed.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from qtool.evaluation.compare import GATES
from qtool.evaluation.latency import RatioEstimate
from qtool.search.trial import TrialResult, TrialSpec

Evaluate = Callable[[list[TrialSpec]], Iterator[TrialResult]]
LATENCY_TIE = 0.03  # latency ratios closer than this are a tie: one noisy timing should not beat a smaller model
FINALISTS = 4  # passing trials re-timed at the end: the fastest and those whose interval overlaps it

# gate -> (figure the search maximizes, as read from a TrialResult)
OBJECTIVES = {"max_accuracy_drop": "accuracy", "min_top1_agreement": "top1_agreement",
              "min_sqnr_db": "sqnr_db", "min_cosine": "cosine", "min_exact_match": "exact_match"}


def objective_name(gates: dict[str, float], integer_only: bool = False) -> str:
    """The figure the search maximizes: the first gate's of OBJECTIVES; exact match where every output is
    integer (tags, class ids), which have no cosine or SQNR."""
    if integer_only:
        return "exact_match"
    return next((OBJECTIVES[gate] for gate in OBJECTIVES if gate in gates), "sqnr_db")


def objective(result: TrialResult, name: str) -> float:
    """Larger is better; -inf when the figure is missing."""
    if name == "accuracy":
        value = result.accuracy.get("candidate")
    else:
        value = result.figure(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value)


def shortfall(result: TrialResult) -> tuple[int, float]:
    """How far a trial is from passing: (failed gates, their summed shortfall, each relative to its
    threshold's magnitude so that dB, cosine and ratios add up). A gate without a value counts as
    infinitely short; (0, 0.0) for a trial that meets every gate."""
    failed = [gate for gate in result.gates if not gate.passed]
    total = 0.0
    for gate in failed:
        if gate.value is None or math.isnan(gate.value):
            return len(failed), math.inf
        _, larger_is_better = GATES[gate.name]
        gap = gate.threshold - gate.value if larger_is_better else gate.value - gate.threshold
        total += max(gap, 0.0) / (abs(gate.threshold) or 1.0)
    return len(failed), total


def preference(result: TrialResult, name: str, latency_ratio: float | None = None) -> tuple:
    """Sort key, best first: passing, the fastest (ratios within LATENCY_TIE of each other tie;
    untimed trials all tie), then the smallest model, the fewest promotions. Failing: the closest to
    passing (`shortfall`: fewest failed gates, then the smallest shortfall on them), then the best
    figure (a trial tied on the objective but nearer on a failing gate was passed over).
    A trial that quantizes nothing comes last: it is the float model, no compromise to hand back."""
    figure = objective(result, name)
    promotions = len(result.spec.promotions)
    if result.passed:
        speed = math.inf if latency_ratio is None else round(latency_ratio / LATENCY_TIE)
        return (0, speed, result.size_bytes, promotions, -figure)
    return (1 if result.quantized_nodes else 2, *shortfall(result), -figure, promotions, result.size_bytes)


def promotion_spec(nodes: Iterable[str], step: str, label: str) -> TrialSpec:
    promotions = tuple((node, step) for node in nodes)
    digest = hashlib.sha256(repr(promotions).encode()).hexdigest()[:8]
    return TrialSpec(f"{label} [{digest}]" if promotions else "recipe as given", "search" if promotions else "baseline",
                     promotions)


class BudgetSpent(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Search:
    """One search's trials and its best so far; `on_improvement` fires whenever the best changes."""

    ranking: list[str]
    steps: tuple[str, ...]
    evaluate: Evaluate
    objective: str
    max_trials: int
    deadline: float | None = None  # time.monotonic() value
    jobs: int = 1
    on_trial: Callable[[TrialResult], None] | None = None
    on_improvement: Callable[[TrialResult], None] | None = None
    # latency ratio (quantized / float) of a trial that passes the gates, timed when its batch is done
    time_trial: Callable[[TrialResult], RatioEstimate] | None = None
    latency: dict[tuple, RatioEstimate] = field(default_factory=dict)
    # node -> the nodes it reads from or writes to (graph order does not matter); empty: no
    # neighbourhood moves (isolated promotions demoted first, integer islands filled)
    neighbours: dict[str, frozenset[str]] = field(default_factory=dict)
    quantizable: frozenset[str] = frozenset()  # nodes the recipe quantizes (the others are float already)
    weighted: frozenset[str] = frozenset()  # of those, the ones with a stored weight (Conv, Gemm, MatMul)
    # the ranked nodes in graph order (inputs first): the second order the search grows ("first k");
    # empty: sensitivity order only
    graph_order: list[str] = field(default_factory=list)
    results: dict[tuple, TrialResult] = field(default_factory=dict)
    order: list[TrialResult] = field(default_factory=list)
    best: TrialResult | None = None
    stop_reason: str = ""

    def run_batch(self, specs: list[TrialSpec], *, timed: bool = True) -> dict[tuple, TrialResult]:
        """Run the specs not run yet (up to the trials left); raise BudgetSpent when nothing may run.
        `timed=False` runs them even past the deadline (the recipe as given: a search with nothing to
        show for a budget that setup alone spent would end in no model at all)."""
        fresh, seen = [], set()
        for spec in specs:
            if spec.promotions not in self.results and spec.promotions not in seen:
                fresh.append(spec)
                seen.add(spec.promotions)
        left = self.max_trials - len(self.order)
        if fresh and left <= 0:
            raise BudgetSpent(f"--max-trials {self.max_trials} reached")
        if fresh and timed and self.deadline is not None and time.monotonic() >= self.deadline:
            raise BudgetSpent("time budget spent")
        batch = []
        for result in self.evaluate(fresh[:left]) if fresh else ():
            self.results[result.spec.promotions] = result
            self.order.append(result)
            batch.append(result)
            if self.on_trial:
                self.on_trial(result)
        for result in batch:  # timed once the batch is done: no trial of ours runs beside the timing
            if result.passed and self.time_trial is not None:
                self.latency[result.spec.promotions] = self.time_trial(result)
            if self.best is None or self._preference(result) < self._preference(self.best):
                self.best = result
                if self.on_improvement:
                    self.on_improvement(result)
        if len(fresh) > left:
            raise BudgetSpent(f"--max-trials {self.max_trials} reached")
        return {spec.promotions: self.results[spec.promotions] for spec in specs if spec.promotions in self.results}

    def _preference(self, result: TrialResult) -> tuple:
        timing = self.latency.get(result.spec.promotions)
        return preference(result, self.objective, timing.median if timing is not None else None)

    def confirm(self, retime: Callable[[TrialResult], RatioEstimate], count: int = FINALISTS) -> list[TrialResult]:
        """Re-time the finalists with `retime` (more rounds than the search's timing) and choose again.

        Finalists: the best passing trial and the passing trials whose ratio interval overlaps its
        (the first timing could not tell them apart), up to `count` at a time. Their new figures
        replace the old; when that makes another trial the best, it and its overlapping trials are
        re-timed too (at most 2 × `count` in all), so the chosen trial's figure is always a second
        timing. `on_improvement` fires when the best changes. Returns the finalists, fastest first.
        """
        done: dict[tuple, TrialResult] = {}
        while len(done) < 2 * count:
            best = min(self.order, key=self._preference) if self.order else None
            if best is None or not best.passed or best.spec.promotions not in self.latency \
                    or best.spec.promotions in done:
                break
            high = self.latency[best.spec.promotions].high
            close = sorted((r for r in self.order if r.passed and r.spec.promotions in self.latency
                            and r.spec.promotions not in done and self.latency[r.spec.promotions].low <= high),
                           key=lambda r: (r is not best, self.latency[r.spec.promotions].median))
            for result in close[:min(count, 2 * count - len(done))]:
                self.latency[result.spec.promotions] = retime(result)
                done[result.spec.promotions] = result
        best = min(self.order, key=self._preference) if self.order else None
        if best is not None and best is not self.best:
            self.best = best
            if self.on_improvement:
                self.on_improvement(best)
        return sorted(done.values(), key=lambda r: self.latency[r.spec.promotions].median)

    def passes(self, nodes: list[str], step: str, label: str) -> bool:
        spec = promotion_spec(nodes, step, label)
        result = self.run_batch([spec]).get(spec.promotions)  # None: the executor lost the trial
        return result is not None and result.passed

    def run(self) -> TrialResult | None:
        try:
            self._search()
        except BudgetSpent as spent:
            self.stop_reason = spent.reason
        return self.best

    def _search(self) -> None:
        if self.passes([], "", "recipe as given"):
            self.stop_reason = "the recipe as given passes the gates: nothing to promote"
            return
        for step in self.steps:
            grown = self._grow(step)
            if grown is None:
                continue
            name, order, known_fail, known_pass = grown
            while known_pass - known_fail > 1:  # bisect back in that order, `jobs` probes at a time
                gap = known_pass - known_fail
                probes = sorted({known_fail + max(1, round(gap * (i + 1) / (self.jobs + 1)))
                                 for i in range(self.jobs)} - {known_pass})
                specs = [self._spec(order[:k], step, f"{step} {name} {k}") for k in probes]
                outcome = self.run_batch(specs)
                for k, spec in zip(probes, specs):
                    if spec.promotions in outcome and outcome[spec.promotions].passed:
                        known_pass = k
                        break
                    known_fail = k
            promoted = self._prune(list(order[:known_pass]), step, name)
            # The same nodes at the other steps: the cheapest precision that fixes them wins (preference).
            others = [other for other in self.steps if other != step]
            self.run_batch([promotion_spec(promoted, other, f"{other} same {len(promoted)}") for other in others])
            steps = sorted({s for _, s in self.best.spec.promotions})
            self.stop_reason = f"gates pass with {len(self.best.spec.promotions)} promotion(s) to {', '.join(steps)}"
            return
        self.stop_reason = "no promotion tried passes the gates"

    def orders(self) -> list[tuple[str, list[str]]]:
        """The orders the search grows promotions in, by label: sensitivity ("top"), then graph order
        ("first") where it is given and differs."""
        ranked = set(self.ranking)
        graph = [node for node in self.graph_order if node in ranked]
        return [("top", self.ranking)] + ([("first", graph)] if graph and graph != self.ranking else [])

    def _grow(self, step: str) -> tuple[str, list[str], int, int] | None:
        """Promote the first 1, 2, 4, ... nodes of each order (`orders`), the same count in every order
        side by side, `jobs` trials at a time, until a trial passes. Returns (order label, order, the
        largest count of that order that failed below it, the passing count) for the passing trial with
        the fewest promotions (the first order on a tie), None when no count passes."""
        orders, count = self.orders(), len(self.ranking)
        sizes = sorted({min(count, 2**i) for i in range(0, max(1, math.ceil(math.log2(max(count, 1)))) + 1)})
        candidates = [(k, name, order) for k in sizes for name, order in orders]
        failed = {name: 0 for name, _ in orders}
        for start in range(0, len(candidates), self.jobs):
            batch = candidates[start: start + self.jobs]
            specs = [self._spec(order[:k], step, f"{step} {name} {k}") for k, name, order in batch]
            outcome = self.run_batch(specs)
            passed = [spec.promotions in outcome and outcome[spec.promotions].passed for spec in specs]
            if any(passed):
                _, chosen = min((len(spec.promotions), i) for i, spec in enumerate(specs) if passed[i])
                k, name, order = batch[chosen]
                known_fail = max([failed[name]] + [j for (j, n, _), ok in zip(batch, passed)
                                                   if n == name and j < k and not ok])
                return name, order, known_fail, k
            for k, name, _ in batch:
                failed[name] = max(failed[name], k)
        return None

    def _spec(self, nodes: list[str], step: str, label: str) -> TrialSpec:
        """The trial promoting `nodes` to `step`; to float, with the integer regions they leave
        enclosed filled (`fill`)."""
        if step != "float" or not self.neighbours:
            return promotion_spec(nodes, step, label)
        filled = self.fill(nodes)
        extra = len(filled) - len(nodes)
        # one order for one set (sensitivity order): a dropped node that comes back enclosed is the same trial
        rank = {node: i for i, node in enumerate(self.ranking)}
        filled = sorted(filled, key=lambda n: (rank.get(n, len(rank)), n))
        return promotion_spec(filled, step, f"{label} + {extra} enclosed" if extra else label)

    def isolated(self, promoted: list[str]) -> list[str]:
        """Promoted nodes whose every neighbour the recipe quantizes and the promotions leave quantized:
        a float node there costs a conversion on each side."""
        chosen = set(promoted)
        return [node for node in promoted if self.neighbours.get(node)
                and all(n in self.quantizable and n not in chosen for n in self.neighbours[node])]

    def fill(self, promoted: list[str]) -> list[str]:
        """`promoted` plus the integer regions it encloses: each connected set of quantized nodes whose
        every neighbour outside it is float (promoted, not quantized by the recipe, or a graph input),
        when it is one node or holds no weighted node (`weighted`: a Conv, Gemm, MatMul with a stored
        weight, where an integer kernel pays). Such a region runs integer kernels between conversions
        that cost more than they save, and its values are rounded once more on the way; filling it
        makes float regions contiguous. Sensitivity order kept, the added nodes after."""
        chosen, rank = set(promoted), {node: i for i, node in enumerate(self.ranking)}
        left = {node for node in self.quantizable - chosen}
        added: set[str] = set()
        while left:
            region, todo = set(), [left.pop()]
            while todo:
                node = todo.pop()
                region.add(node)
                for n in self.neighbours.get(node, ()):
                    if n in left:
                        left.discard(n)
                        todo.append(n)
            border = {n for node in region for n in self.neighbours.get(node, ())} - region
            enclosed = all(n not in self.quantizable or n in chosen for n in border)
            if enclosed and region <= rank.keys() and (len(region) == 1 or not region & self.weighted):
                added |= region
        return list(promoted) + sorted(added, key=lambda n: (rank[n], n))

    def _prune(self, promoted: list[str], step: str, name: str = "top") -> list[str]:
        """Demote promoted nodes again while the gates still pass; the nodes left. Isolated promotions
        (`isolated`: the costliest for latency) are tried first, then the rest, last in their order
        (`name`'s: the least sensitive, or the deepest) first. Of a batch whose trials pass, the first
        node is demoted and the others are tried again without it (they passed beside it, not without it)."""
        first = self.isolated(promoted)
        untried = list(reversed(first)) + [n for n in reversed(promoted) if n not in first]
        while untried and len(promoted) > 1:
            batch, untried = untried[: self.jobs], untried[self.jobs:]
            specs = [self._spec([n for n in promoted if n != drop], step,
                                    f"{step} {name} {len(promoted)} without 1") for drop in batch]
            outcome = self.run_batch(specs)
            passed = [drop for drop, spec in zip(batch, specs)
                      if spec.promotions in outcome and outcome[spec.promotions].passed]
            if passed:
                promoted = [n for n in promoted if n != passed[0]]
                untried = passed[1:] + untried
        return promoted


def pareto_frontier(results: list[TrialResult], name: str) -> list[TrialResult]:
    """Trials no other trial beats on both size (smaller) and the objective (larger)."""
    frontier = []
    for result in results:
        size, figure = result.size_bytes, objective(result, name)
        dominated = any(
            other.size_bytes <= size and objective(other, name) >= figure
            and (other.size_bytes < size or objective(other, name) > figure)
            for other in results
        )
        if not dominated:
            frontier.append(result)
    return sorted(frontier, key=lambda r: r.size_bytes)


_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)h)?(?:(\d+(?:\.\d*)?|\.\d+)m)?(?:(\d+(?:\.\d*)?|\.\d+)s)?")


def parse_duration(text: str) -> float:
    """'90s', '30m', '1.5h', '1h30m', '2m30s' or plain seconds -> seconds; else a ValueError."""
    text = text.strip().lower()
    parts = _DURATION.fullmatch(text)
    try:
        value = (sum(float(part or 0) * scale for part, scale in zip(parts.groups(), (3600.0, 60.0, 1.0)))
                 if text and parts else float(text))
    except ValueError:
        raise ValueError(f"expected a duration like 90s, 30m, 1h or 1h30m, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return value
