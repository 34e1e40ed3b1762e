"""Float vs quantized over the same feeds: streamed per-output metrics, accuracy, gates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from onnx import ModelProto

from qtool.errors import DataError
from qtool.evaluation.labels import check_label_range
from qtool.evaluation.metrics import is_classifier_output, top1, untied
from qtool.io.data import DataFolder
from qtool.runtime.session import make_session, run_batch
from qtool.runtime.streams import StateCarry

GATES = {
    # name: (figure it reads, True when larger is better)
    "min_cosine": ("cosine", True),
    "min_sqnr_db": ("sqnr_db", True),
    "min_slice_sqnr_db": ("slice_sqnr_db", True),  # worst slice along each output's feature axis
    "min_top1_agreement": ("top1_agreement", True),
    "max_accuracy_drop": ("accuracy_drop", False),
    "max_latency_ratio": ("latency_ratio", False),  # candidate median / reference median
    "min_size_ratio": ("size_ratio", True),  # reference bytes / candidate bytes
    "min_exact_match": ("exact_match", True),  # integer outputs: the fraction of elements equal
}
# Figures that mean nothing on integer outputs (class indices, token ids, counts): their gates skip them.
FLOAT_ONLY_FIGURES = {"cosine", "sqnr_db", "slice_sqnr_db", "top1_agreement"}

# Per-sample SQNR histogram bins (dB); values outside land in the end bins.
SQNR_EDGES = tuple(float(edge) for edge in range(0, 84, 4))


def feature_axis(shape: tuple[int, ...]) -> int | None:
    """The axis an output's features (channels, classes, box fields) run along, None if it has none.

    Axis 1 ([N, C], NCHW, [N, C, L]); for rank 3 the shorter of axes 1 and 2, since an output lists
    fewer features than positions (YOLOv8's [N, 84, anchors], YOLOv5's [N, anchors, 85], [N, T, classes]).
    None below rank 2 or when that axis has size 1.
    """
    if len(shape) < 2:
        return None
    axis = 2 if len(shape) == 3 and shape[2] < shape[1] else 1
    return axis if shape[axis] > 1 else None


class OutputStats:
    """Running sums that give cosine, SQNR and errors without keeping outputs."""

    def __init__(self, classifier: bool = True, slices: bool = True):
        self.dot = self.ref_sq = self.cand_sq = self.noise = self.abs_sum = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.samples = 0
        self.agree = self.agree5 = 0
        self.ties = 0  # samples whose reference top-1 is a tie (equal top scores): no agreement evidence
        self.classes = 0
        self.classifier = classifier  # False: skip top-k agreement (layers, weights)
        self.sqnr_counts = np.zeros(len(SQNR_EDGES) - 1, dtype=np.int64)
        # Signal and noise per slice along the feature axis (slices=False: not measured, as for layers).
        self.slices: bool = slices
        self.slice_axis: int | None = None
        self.slice_signal = self.slice_noise = np.zeros(0)
        self.integer = False  # an integer or bool output (an ArgMax): scored by exact match
        self.equal = self.scored = 0
        self.masked_by: str | None = None  # the input whose zeros (padding) exact match skipped

    def update(self, ref: np.ndarray, cand: np.ndarray, mask: tuple[str, np.ndarray] | None = None) -> None:
        """Add one run's outputs. `mask`: (input name, its [N, L] array) of a text model's attention
        mask; an integer output whose leading dims are the mask's is scored only where the mask is
        non-zero (a padded position's tag is no answer of the model's)."""
        if not self.count and (np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_):
            self.integer, self.classifier = True, False
        if self.integer:
            self._update_exact(ref, cand, mask)
        a, b = ref.astype(np.float64), cand.astype(np.float64)
        diff = a - b
        self.dot += float(np.sum(a * b))
        self.ref_sq += float(np.sum(a * a))
        self.cand_sq += float(np.sum(b * b))
        self.noise += float(np.sum(diff * diff))
        self.abs_sum += float(np.sum(np.abs(diff)))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff), initial=0.0)))
        if self.slices:
            self._update_slices(a, diff, first=not self.count)
        self.count += diff.size
        if a.ndim >= 1 and a.shape[0]:
            per_signal = np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)
            per_noise = np.sum(diff.reshape(a.shape[0], -1) ** 2, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_sqnr = 10.0 * np.log10(per_signal / per_noise)
            per_sqnr = np.nan_to_num(per_sqnr, nan=SQNR_EDGES[-1], posinf=SQNR_EDGES[-1], neginf=SQNR_EDGES[0])
            clipped = np.clip(per_sqnr, SQNR_EDGES[0], SQNR_EDGES[-1] - 1e-9)
            self.sqnr_counts += np.histogram(clipped, bins=SQNR_EDGES)[0]
        self.classifier = self.classifier and is_classifier_output(ref)
        if self.classifier:
            self.classes = ref.shape[1]
            ref_top1, judged = top1(ref), untied(ref)
            self.ties += int(np.sum(~judged))
            self.agree += int(np.sum((ref_top1 == top1(cand))[judged]))
            if self.classes > 5:
                top5 = np.argsort(-b.reshape(b.shape[0], -1), axis=1)[:, :5]
                self.agree5 += int(np.sum(np.any(top5 == ref_top1[:, None], axis=1)[judged]))
            self.samples += ref.shape[0]

    def _update_exact(self, ref: np.ndarray, cand: np.ndarray, mask: tuple[str, np.ndarray] | None) -> None:
        equal = ref == cand
        if mask is not None and ref.shape[:mask[1].ndim] == mask[1].shape:
            keep = np.broadcast_to((mask[1] != 0).reshape(mask[1].shape + (1,) * (ref.ndim - mask[1].ndim)),
                                   ref.shape)
            self.masked_by = mask[0]
            self.equal += int(np.sum(equal & keep))
            self.scored += int(np.sum(keep))
        else:
            self.equal += int(np.sum(equal))
            self.scored += equal.size

    def _update_slices(self, a: np.ndarray, diff: np.ndarray, first: bool) -> None:
        if first:  # the first batch fixes the axis
            self.slice_axis = feature_axis(a.shape)
            if self.slice_axis is not None:
                self.slice_signal = self.slice_noise = np.zeros(a.shape[self.slice_axis])
        axis = self.slice_axis
        if axis is None:
            return
        if a.ndim <= axis or a.shape[axis] != self.slice_signal.size:  # the feature axis changed size
            self.slice_axis = None
            return
        self.slice_signal = self.slice_signal + np.moveaxis(a * a, axis, 0).reshape(a.shape[axis], -1).sum(axis=1)
        self.slice_noise = self.slice_noise + np.moveaxis(diff * diff, axis, 0).reshape(a.shape[axis], -1).sum(axis=1)

    def worst_slice(self) -> dict | None:
        """The slice along the feature axis with the lowest SQNR (a collapsed part of the output)."""
        if self.slice_axis is None or not self.slice_signal.size:
            return None
        sqnr = [_sqnr(float(s), float(n)) for s, n in zip(self.slice_signal, self.slice_noise)]
        index = int(np.argmin(sqnr))
        return {"axis": self.slice_axis, "index": index, "sqnr_db": sqnr[index], "slices": len(sqnr)}

    def figures(self, histogram: bool = True) -> dict:
        norms = np.sqrt(self.ref_sq * self.cand_sq)
        figures = {
            "cosine": float(self.dot / norms) if norms > 0 else float(self.noise == 0),
            "sqnr_db": _sqnr(self.ref_sq, self.noise),
            "mse": self.noise / self.count if self.count else 0.0,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / self.count if self.count else 0.0,
        }
        if self.integer:
            figures["exact_match"] = self.equal / self.scored if self.scored else 1.0
            if self.masked_by is not None:  # padding left out: say which input marked it, and what was scored
                figures["exact_match_masked_by"] = self.masked_by
                figures["exact_match_positions"] = self.scored
        judged = self.samples - self.ties
        if self.classifier and judged:  # over the samples whose reference top-1 is one class
            figures["top1_agreement"] = self.agree / judged
            if self.classes > 5:
                # the reference's top-1 class is among the candidate's top 5
                figures["top5_agreement"] = self.agree5 / judged
        if self.classifier and self.ties:  # all of them: no top1_agreement, its gate fails (value n/a)
            figures["top1_ties"] = self.ties
        if self.slices:
            figures["worst_slice"] = self.worst_slice()
        if histogram:
            figures["sample_sqnr_histogram"] = {"edges_db": list(SQNR_EDGES),
                                                "counts": [int(c) for c in self.sqnr_counts]}
        return figures


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


@dataclass(frozen=True)
class Comparison:
    samples: int
    outputs: dict[str, dict]  # output name -> figures
    accuracy: dict[str, float] = field(default_factory=dict)  # "reference"/"candidate" -> top-1
    labelled: int = 0
    classes: int = 0  # the labelled output's class count (accuracy's chance level is 1/classes)

    def figure(self, name: str) -> float | None:
        """The worst value of a figure over all outputs (what a gate checks); cosine, SQNR and top-1
        figures skip integer outputs, which `exact_match` scores (None: no output has the figure)."""
        if name == "accuracy_drop":
            if not self.accuracy:
                return None
            return self.accuracy["reference"] - self.accuracy["candidate"]
        scored = [f for f in self.outputs.values() if name not in FLOAT_ONLY_FIGURES or "exact_match" not in f]
        if name == "slice_sqnr_db":  # an output without a feature axis is its own one slice
            values = [(f["worst_slice"] or {"sqnr_db": f["sqnr_db"]})["sqnr_db"]
                      for f in scored if "worst_slice" in f]
            return min(values) if values else None
        values = [figures[name] for figures in scored if name in figures]
        return min(values) if values else None


@dataclass(frozen=True)
class GateResult:
    name: str
    threshold: float
    value: float | None
    passed: bool  # False: failed (a not-applicable gate does not fail; `verdict` tells them apart)
    not_applicable: str = ""  # why no output has the figure: the gate checks nothing (never fails, never passes)

    @property
    def verdict(self) -> bool | None:
        """True passed, False failed, None not applicable (what the report's `passed` holds)."""
        return None if self.not_applicable else self.passed

    def describe(self) -> str:
        if self.not_applicable:
            return f"gate {self.name}: not applicable ({self.not_applicable})"
        shown = "n/a" if self.value is None else f"{self.value:.6g}"
        verdict = "passed" if self.passed else "FAILED"
        return f"gate {self.name}: {verdict} (value {shown}, threshold {self.threshold:g})"


def compare_models(
    reference: ModelProto,
    candidate: ModelProto,
    data: DataFolder,
    *,
    labels: dict[str, int] | None = None,
    batch_size: int = 8,
    optimize_candidate: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> Comparison:
    """Run both models on every sample; stream per-output figures and accuracy. A stateful model's
    streams (`data.state`) run chunk by chunk, each model fed back its own state outputs; text data's
    padding (`data.mask_input`, its attention mask) is left out of integer outputs' exact match.
    A label outside the first output's class range raises DataError naming its line."""
    ref_session = make_session(reference)
    cand_session = make_session(candidate, optimize=optimize_candidate)
    ref_carry, cand_carry = StateCarry(data.state), StateCarry(data.state)  # each model its own stream state
    stats: dict[str, OutputStats] = {}
    correct = {"reference": 0, "candidate": 0}
    labelled = samples = classes = 0
    total = data.total or 0
    for batch in data.batches(batch_size):
        if not batch.files:  # files that hold 0 samples
            continue
        ref_out = run_batch(ref_session, ref_carry.feeds(batch), batch.files, data, "the reference model")
        cand_out = run_batch(cand_session, cand_carry.feeds(batch), batch.files, data, "the candidate model")
        ref_carry.keep(ref_out)
        cand_carry.keep(cand_out)
        mask = (data.mask_input, batch.feeds[data.mask_input]) if data.mask_input in batch.feeds else None
        for name, ref in ref_out.items():
            stats.setdefault(name, OutputStats()).update(ref, cand_out[name], mask)
        samples += len(batch.files)
        if labels:
            first = next(iter(ref_out))
            if is_classifier_output(ref_out[first]):
                classes = ref_out[first].shape[1]
                check_label_range(labels, batch.files, classes, first)
                known = [i for i, f in enumerate(batch.files) if f in labels]
                truth = np.array([labels[batch.files[i]] for i in known])
                if known:
                    correct["reference"] += int(np.sum(top1(ref_out[first])[known] == truth))
                    correct["candidate"] += int(np.sum(top1(cand_out[first])[known] == truth))
                    labelled += len(known)
        if progress:
            progress(samples, max(total, samples))
    if not samples:  # figures over nothing would read as a perfect match
        raise DataError(f"{data.folder}: no samples to validate with (its files hold arrays of length 0 "
                        "along the batch axis)")
    accuracy = {key: value / labelled for key, value in correct.items()} if labelled else {}
    return Comparison(samples, {name: s.figures() for name, s in stats.items()}, accuracy, labelled, classes)


# Gates that read the model's accuracy (the others read its size and speed).
ACCURACY_GATES = tuple(name for name in GATES if name not in ("max_latency_ratio", "min_size_ratio"))


def not_applicable(figure: str, integer: list[bool]) -> str:
    """Why a gate reading `figure` has nothing to check in outputs of these kinds (`integer`: per
    output, whether it is integer or bool), "" when it has or should have."""
    if figure == "exact_match" and integer and not any(integer):
        return "no integer output"
    if figure in FLOAT_ONLY_FIGURES - {"top1_agreement"} and integer and all(integer):
        return "every output is integer: min_exact_match scores them"
    return ""


def check_gates(comparison: Comparison, gates: dict[str, float],
                extra: dict[str, float | None] | None = None) -> list[GateResult]:
    """Each gate's verdict; `extra` holds figures measured elsewhere (latency_ratio, size_ratio)."""
    extra = extra or {}
    results = []
    for name, threshold in gates.items():
        figure, larger_is_better = GATES[name]
        value = extra.get(figure) if figure in extra else comparison.figure(figure)
        integer = ["exact_match" in f for f in comparison.outputs.values()]
        why = not_applicable(figure, integer) if value is None else ""
        if why:
            results.append(GateResult(name, threshold, None, True, why))
            continue
        if value is None:
            passed = False
        else:
            passed = value >= threshold if larger_is_better else value <= threshold
        results.append(GateResult(name, threshold, value, passed))
    return results
