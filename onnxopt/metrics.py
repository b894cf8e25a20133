"""Validation metrics: how a candidate's outputs compare with the reference's, and with labels.

The built-in metrics are registered through the same hook a plugin uses
(``onnxopt_register_metrics``, see :mod:`onnxopt.plugins`), so a plugin's
metric shows up next to them. This module imports nothing else of onnxopt:
the hook specs, the plugins and validation all import it from above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Metric", "top1_accuracy", "top1_agreement", "cosine", "snr_db", "max_abs_error", "BUILTIN_METRICS"]


@dataclass(frozen=True)
class Metric:
    """A named metric.

    ``kind="compare"``: ``fn(reference, candidate)`` on one output's arrays;
    ``kind="labels"``: ``fn(output, labels)``, computed for the reference and
    the candidate alike. ``fn`` returns a float, or None where it does not
    apply (for example top-1 on an output that is not a score vector).
    """

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float | None]
    kind: Literal["compare", "labels"] = "compare"
    higher_is_better: bool = True
    doc: str = ""


def _is_scores(a: np.ndarray) -> bool:
    return a.ndim >= 2 and a.shape[-1] > 1 and np.issubdtype(a.dtype, np.floating)


def top1_accuracy(output: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of samples whose arg-max over the last axis equals the label."""
    if not _is_scores(output):
        return None
    scores = output.reshape(-1, output.shape[-1])
    if scores.shape[0] != labels.reshape(-1).shape[0]:
        return None
    return float(np.mean(scores.argmax(axis=1) == labels.reshape(-1)))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Share of samples where reference and candidate pick the same arg-max."""
    if not _is_scores(reference):
        return None
    r = reference.reshape(-1, reference.shape[-1]).argmax(axis=1)
    c = candidate.reshape(-1, candidate.shape[-1]).argmax(axis=1)
    return float(np.mean(r == c))


def _as_float(a: np.ndarray) -> np.ndarray | None:
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        return None
    return a.astype(np.float64).reshape(-1)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Cosine similarity of the flattened outputs (1.0 = same direction)."""
    r, c = _as_float(reference), _as_float(candidate)
    if r is None or c is None or r.shape != c.shape:
        return None
    with np.errstate(all="ignore"):  # NaN/Inf outputs give a NaN figure, not a warning
        denom = float(np.linalg.norm(r) * np.linalg.norm(c))
        if denom == 0.0:
            return 1.0 if np.array_equal(r, c) else 0.0
        return float(np.dot(r, c) / denom)


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Signal-to-noise ratio in dB: signal power of the reference over the error's power."""
    r, c = _as_float(reference), _as_float(candidate)
    if r is None or c is None or r.shape != c.shape:
        return None
    with np.errstate(all="ignore"):  # NaN/Inf outputs give a NaN figure, not a warning
        noise = float(np.sum((r - c) ** 2))
        signal = float(np.sum(r**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Largest absolute difference between reference and candidate."""
    r, c = _as_float(reference), _as_float(candidate)
    if r is None or c is None or r.shape != c.shape:
        return None
    with np.errstate(all="ignore"):
        return float(np.max(np.abs(r - c))) if r.size else 0.0


BUILTIN_METRICS = (
    Metric("top1_accuracy", top1_accuracy, "labels", True, "top-1 accuracy against the data's labels"),
    Metric("top1_agreement", top1_agreement, "compare", True, "share of samples with the reference's top-1 class"),
    Metric("cosine", cosine, "compare", True, "cosine similarity with the reference output"),
    Metric("snr_db", snr_db, "compare", True, "signal-to-noise ratio against the reference, dB"),
    Metric("max_abs_error", max_abs_error, "compare", False, "largest absolute difference from the reference"),
)
