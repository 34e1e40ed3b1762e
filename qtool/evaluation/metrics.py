"""How far a quantized model's outputs are from the float model's: pure numpy metrics."""

from __future__ import annotations

import numpy as np


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    a = reference.astype(np.float64).ravel()
    b = candidate.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norms)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio: 10·log10(‖ref‖² / ‖ref − cand‖²)."""
    a = reference.astype(np.float64)
    noise = float(np.sum((a - candidate.astype(np.float64)) ** 2))
    signal = float(np.sum(a**2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)), initial=0.0))


def mean_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return float(diff.mean()) if diff.size else 0.0


def is_classifier_output(array: np.ndarray) -> bool:
    """[N, C] scores with a few classes or more: top-1 agreement is meaningful."""
    return array.ndim == 2 and array.shape[1] >= 2


def top1(array: np.ndarray) -> np.ndarray:
    return np.argmax(array.reshape(array.shape[0], -1), axis=1)


def untied(array: np.ndarray) -> np.ndarray:
    """[N] bool: whether sample n's highest score is held by one class only. A tie (a constant
    output, saturated scores, NaN) has argmax 0 by convention, not by the model: no top-1 evidence."""
    flat = array.reshape(array.shape[0], -1)
    return np.sum(flat == flat.max(axis=1, keepdims=True), axis=1) == 1


METRICS = {
    "cosine": cosine,
    "sqnr_db": sqnr_db,
    "max_abs_error": max_abs_error,
    "mean_abs_error": mean_abs_error,
}
