"""Validation metrics: how a candidate's outputs compare with the reference's, and with labels.

The built-in metrics are registered through the same hook a plugin uses
(``onnxopt_register_metrics``, see :mod:`onnxopt.plugins`), so a plugin's
metric shows up next to them. This module imports nothing else of onnxopt
but :mod:`onnxopt.detection`: the hook specs, the plugins and validation
all import it from above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from onnxopt.detection import DETECTION_SCORE, MATCH_IOU, boxes_and_scores, detection_counts, detection_layout

__all__ = ["Metric", "top1_accuracy", "top1_agreement", "cosine", "snr_db", "max_abs_error", "BUILTIN_METRICS",
           "DROP_METRICS", "OutputDrop", "choose_metric", "metric_drop", "output_drops", "snr_drop", "text_map_f1",
           "TEXT_MAP_THRESHOLD", "sample_error", "relative_error"]


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


# -- what "drop" means, per output ---------------------------------------------------------------------------------

#: Metrics ``--metric OUTPUT=NAME`` accepts besides registered (plugin) metrics; each turns into a drop in [0, 1].
DROP_METRICS = ("top1", "cosine", "snr", "match", "textmap", "detection", "none")
#: DBNet's binarization threshold of a text probability map (PP-OCR's det_db_thresh).
TEXT_MAP_THRESHOLD = 0.3
#: How far outside [0, 1] a probability map may stray by float rounding: ORT's float32 Sigmoid returns 1.0000001
#: (one ulp over 1) on confidently-text pixels of PP-OCRv4 det; logits stray by whole units.
PROBABILITY_SLACK = 1e-5
#: A last axis of at most this many entries can be classes (a 2-D [N, C] output); beyond it, it is more likely anchors.
MAX_CLASSES = 1000
#: Probabilities along the last axis sum to 1 within this tolerance (softmax outputs: classes at any rank).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OutputDrop:
    """One output's drop: the metric used, why, and the figure (accuracies when labels applied)."""

    output: str
    metric: str
    reason: str
    drop: float
    accuracy: dict[str, float] | None = None
    #: one standard error of the drop from its per-sample spread (:func:`sample_error`), on the gated output only
    error: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"output": self.output, "metric": self.metric, "reason": self.reason, "drop": self.drop,
                "accuracy": self.accuracy, "error": self.error}


def _sums_to_one(a: np.ndarray) -> bool:
    if not _is_scores(a) or a.size == 0 or a.shape[-1] > 100_000:
        return False
    sample = a.reshape(-1, a.shape[-1])[:256].astype(np.float64)
    with np.errstate(all="ignore"):
        return bool(np.all(sample >= -1e-6) and np.allclose(sample.sum(axis=1), 1.0, atol=SUM_TOLERANCE))


def choose_metric(reference: np.ndarray) -> tuple[str, str]:
    """The safe automatic metric for one output and why: top-1 only where the last axis really is classes."""
    if reference.dtype == np.bool_ or np.issubdtype(reference.dtype, np.integer):
        return "match", f"{reference.dtype} output: share of samples whose values all match"
    if not np.issubdtype(reference.dtype, np.floating):
        return "match", f"{reference.dtype} output: exact equality"
    shape = "×".join(map(str, reference.shape))
    if reference.ndim == 2 and 2 <= reference.shape[1] <= MAX_CLASSES:
        return "top1", f"[{shape}]: 2-D [N, C] with C = {reference.shape[1]} <= {MAX_CLASSES}, read as class scores"
    if _sums_to_one(reference):
        return "top1", f"[{shape}]: the last axis sums to 1 (probabilities over classes)"
    layout = detection_layout(reference, MAX_CLASSES)
    if layout is not None:
        where = "last" if layout == "anchors_last" else "first"
        return "detection", (f"[{shape}]: a detector's raw output (boxes in pixels and class scores in [0, 1], anchors "
                             f"{where}): compared by its detections")
    return "cosine", f"[{shape}]: not class scores (the last axis of {reference.shape[-1] if reference.ndim else 1} " \
                     "is not a modest class axis and does not sum to 1): compared as a signal"


def _top1_drop(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> tuple[float, str, dict[str, float] | None]:
    if labels is not None:
        ref_acc, cand_acc = top1_accuracy(reference, labels), top1_accuracy(candidate, labels)
        if ref_acc is not None and cand_acc is not None:
            return ref_acc - cand_acc, "top-1 accuracy (labels)", {"reference": ref_acc, "candidate": cand_acc}
    agreement = top1_agreement(reference, candidate)
    if agreement is None:
        return 1.0 if not np.array_equal(reference, candidate) else 0.0, "exact equality (not a score output)", None
    return 1.0 - agreement, "1 - top-1 agreement with the reference", None


def snr_drop(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Error power over signal power (1 / linear SNR), capped at 1: 20 dB is a drop of 0.01, 30 dB 0.001."""
    db = snr_db(reference, candidate)
    if db is None:
        return None
    if np.isnan(db):
        return 1.0
    return float(min(1.0, 10.0 ** (-db / 10.0))) if np.isfinite(db) else (0.0 if db > 0 else 1.0)


def _match_drop(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return 1.0
    if reference.ndim == 0 or reference.shape[0] == 0:
        return 0.0 if np.array_equal(reference, candidate) else 1.0
    same = (reference.reshape(reference.shape[0], -1) == candidate.reshape(candidate.shape[0], -1)).all(axis=1)
    return 1.0 - float(np.mean(same))


def text_map_f1(reference: np.ndarray, candidate: np.ndarray, threshold: float = TEXT_MAP_THRESHOLD) -> float | None:
    """F-score of the candidate's text pixels against the reference's, both maps binarized at ``threshold`` as a DB
    text detector's post-processing does, pooled over the samples (1.0 when neither marks a pixel); None unless
    both are probability maps ([N, 1, H, W] or [N, H, W], float, within [0, 1]) of one shape."""
    if (reference.shape != candidate.shape or reference.ndim not in (3, 4) or (reference.ndim == 4 and reference.shape[1] != 1)
            or not np.issubdtype(reference.dtype, np.floating) or not np.issubdtype(candidate.dtype, np.floating)):
        return None
    with np.errstate(invalid="ignore"):
        if not (np.nanmin(reference) >= -PROBABILITY_SLACK and np.nanmax(reference) <= 1.0 + PROBABILITY_SLACK):
            return None
        r, c = reference > threshold, candidate > threshold  # NaN is no text
    both, total = int(np.count_nonzero(r & c)), int(np.count_nonzero(r)) + int(np.count_nonzero(c))
    return 1.0 if total == 0 else 2.0 * both / total


def metric_drop(metric: str, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
                registered: Mapping[str, Metric] | None = None) -> tuple[float, str, dict[str, float] | None]:
    """The drop of one output under ``metric`` (a built-in of :data:`DROP_METRICS` or a registered metric), its basis."""
    if metric == "top1":
        return _top1_drop(reference, candidate, labels)
    if metric == "cosine":
        cos = cosine(reference, candidate)
        if cos is None:
            return _match_drop(reference, candidate), "exact equality (no cosine for this output)", None
        return (1.0 if np.isnan(cos) else max(0.0, 1.0 - cos)), "1 - cosine similarity with the reference", None
    if metric == "snr":
        value = snr_drop(reference, candidate)
        if value is None:
            return _match_drop(reference, candidate), "exact equality (no SNR for this output)", None
        return value, "error power / signal power (1 / linear SNR)", None
    if metric == "match":
        return _match_drop(reference, candidate), "1 - share of samples matching exactly", None
    if metric == "textmap":
        f1 = text_map_f1(reference, candidate)
        if f1 is None:
            raise ValueError("textmap needs a text probability map ([N, 1, H, W] or [N, H, W], values in [0, 1])")
        return 1.0 - f1, f"1 - F-score of the text pixels (map > {TEXT_MAP_THRESHOLD}) against the reference's", None
    if metric == "detection":
        counts = detection_counts(reference, candidate)
        if counts is None:
            raise ValueError("detection needs a detector's raw output: [N, 4 + C, A] (anchors last, YOLOv8) or "
                             "[N, A, 5 + C] (anchors first, YOLOv5), boxes cx, cy, w, h then scores in [0, 1]")
        matched, in_reference, in_candidate = counts
        total = in_reference + in_candidate
        # the counts say how coarse the figure is: with 17 reference detections one lost object is ~3 pt
        return (0.0 if total == 0 else 1.0 - 2.0 * matched / total), (
            f"1 - F-score of the detections (score > {DETECTION_SCORE} after NMS, matched at IoU >= {MATCH_IOU} and "
            f"same class) against the reference's: {in_reference} reference, {in_candidate} candidate, {matched} "
            "matched"), None
    plugin = (registered or {}).get(metric)
    if plugin is None:
        raise KeyError(metric)
    # a registered metric as a drop: compare metrics are read as a share (1 - value when higher is better);
    # label metrics as the reference's figure minus the candidate's
    if plugin.kind == "labels":
        if labels is None:
            raise ValueError(f"metric {metric} needs labels in the evaluation data")
        ref_v, cand_v = plugin.fn(reference, labels), plugin.fn(candidate, labels)
        if ref_v is None or cand_v is None:
            raise ValueError(f"metric {metric} does not apply to this output")
        return (ref_v - cand_v) if plugin.higher_is_better else (cand_v - ref_v), f"{metric} (labels)", \
            {"reference": ref_v, "candidate": cand_v}
    value = plugin.fn(reference, candidate)
    if value is None:
        raise ValueError(f"metric {metric} does not apply to this output")
    return ((1.0 - value) if plugin.higher_is_better else value), f"{metric} against the reference", None


#: Drop metrics that are a share of samples: their standard error is binomial (onnxopt.budget.margin), not this one.
_SHARE_METRICS = frozenset({"top1", "match", "none"})


def _positions_per_sample(metric: str, reference: np.ndarray) -> bool:
    """True for a top-1 output with several positions per sample ([N, T, C]: a sequence's frames, a map's pixels).

    Their agreement is a share of N x T positions, but positions of one sample move together: a binomial margin
    over N samples overstates its spread many times (a 2.6% share of flipped frames spread over every sample got
    a 1.8 pt margin on PP-OCRv4 rec), one over N x T understates it. The standard error of the per-sample shares
    is the one that holds (and equals the binomial one when each sample has one position)."""
    return metric == "top1" and reference.ndim > 2 and int(np.prod(reference.shape[1:-1])) > 1


def sample_error(metric: str, reference: np.ndarray, candidate: np.ndarray,
                 registered: Mapping[str, Metric] | None = None) -> float | None:
    """One standard error of a drop that is not a share of samples (cosine, SNR, textmap, a registered compare
    metric), from its spread over the samples: the drop measured on each sample (the first axis) alone, then the
    standard deviation of those over the square root of their number (the standard error of their mean).

    The gated drop itself is pooled over the samples (one cosine of the flattened outputs, one F-score of all
    pixels); the per-sample spread is what says how much another draw of samples would move it. None where it
    does not apply: share metrics (they have a binomial margin), label metrics, fewer than 2 samples, outputs whose
    first axis differs between reference and candidate, or a metric that does not apply to one sample alone.
    """
    if (metric in _SHARE_METRICS and not _positions_per_sample(metric, reference)) or reference.ndim == 0 \
            or reference.shape[0] < 2 or candidate.shape[:1] != reference.shape[:1]:
        return None
    plugin = (registered or {}).get(metric)
    if plugin is not None and plugin.kind == "labels":
        return None
    try:
        # one sample at a time: views, the metric's own work in total (a loop over samples, not elements)
        drops = np.array([metric_drop(metric, reference[i:i + 1], candidate[i:i + 1], None, registered)[0]
                          for i in range(reference.shape[0])], dtype=np.float64)
    except (KeyError, ValueError):
        return None
    if not np.all(np.isfinite(drops)):
        return None
    return float(np.std(drops, ddof=1) / np.sqrt(drops.size))


def output_drops(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], labels: np.ndarray | None,
                 declared: Mapping[str, str] | None = None,
                 registered: Mapping[str, Metric] | None = None) -> tuple[OutputDrop | None, list[OutputDrop]]:
    """Each output's drop under its declared (else automatic) metric, and the one gated: the worst.

    When some outputs are declared, only those are gated; ``none`` leaves an
    output out. Labels go to the first output read as top-1 whose rows match
    them in number (the data's labels describe one output).
    """
    declared = dict(declared or {})
    rows: list[OutputDrop] = []
    labels_used = False
    for name, ref in reference.items():
        if name not in candidate:
            continue
        if name in declared:
            metric, reason = declared[name], "declared (--metric)"
        else:
            metric, reason = choose_metric(ref)
        if metric == "none":
            rows.append(OutputDrop(name, "none", reason + ": not gated", 0.0))
            continue
        use_labels = None
        if labels is not None and not labels_used and ref.ndim >= 2 and ref.reshape(-1, ref.shape[-1]).shape[0] == labels.reshape(-1).shape[0]:
            use_labels = labels
        drop, basis, accuracy = metric_drop(metric, ref, candidate[name], use_labels, registered)
        labels_used = labels_used or accuracy is not None
        rows.append(OutputDrop(name, metric, f"{reason}; {basis}", float(drop), accuracy))
    gated = [r for r in rows if r.metric != "none" and (not declared or r.output in declared)]
    worst = max(gated, key=lambda r: r.drop) if gated else None
    if worst is not None and (worst.metric not in _SHARE_METRICS
                              or (worst.accuracy is None and _positions_per_sample(worst.metric, reference[worst.output]))):
        # the budget's margin for a drop that is not a share of samples (the gated output only: it is what is judged)
        error = sample_error(worst.metric, reference[worst.output], candidate[worst.output], registered)
        if error is not None:
            index = next(i for i, r in enumerate(rows) if r is worst)
            worst = rows[index] = replace(worst, error=error)
    return worst, rows


def relative_error(reference: np.ndarray | Sequence[np.ndarray], candidate: np.ndarray | Sequence[np.ndarray], *,
                   squared: bool = False) -> float:
    """||candidate - reference|| / ||reference|| over one output (an array, or its batches), or its square: the
    continuous figure passes rank their choices by (quant's fallback, prune's sensitivity scan).

    A detector's raw output (:func:`~onnxopt.detection.detection_layout`) gets the sum of that figure for its boxes
    and for its scores: over the whole tensor, pixel coordinates drown the scores that decide what is detected (on
    NudeNet's detector, quant's fallback ranked its nodes by the boxes alone).
    """
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    cands = [candidate] if isinstance(candidate, np.ndarray) else list(candidate)
    layout = detection_layout(refs[0]) if refs else None
    parts = [(refs, cands)] if layout is None else [
        ([boxes_and_scores(r, layout)[i] for r in refs], [boxes_and_scores(c, layout)[i] for c in cands]) for i in (0, 1)]
    total = 0.0
    for rs, cs in parts:
        if not squared and len(rs) == 1:
            total += float(np.linalg.norm(cs[0] - rs[0]) / max(np.linalg.norm(rs[0]), 1e-12))
            continue
        num = sum(float(np.sum((np.asarray(c, np.float64) - r) ** 2)) for c, r in zip(cs, rs))
        den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in rs)
        share = num / den if den > 0 else num
        total += share if squared else float(np.sqrt(share))
    return total
