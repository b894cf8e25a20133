"""A one-stage detector's raw output, compared as its user reads it: the boxes left after score threshold and NMS.

A YOLO-style head ends in one tensor per image that holds, for each of A
anchors, a box (cx, cy, w, h, in pixels) and class scores in [0, 1]:
``[N, 4 + C, A]`` (YOLOv8 and later, anchors last) or ``[N, A, 5 + C]``
(YOLOv5, anchors first, with an objectness score before the classes).
Cosine over that tensor is dominated by the box coordinates (hundreds of
pixels against scores below 1): an int8 model that lost a fifth of its
detections measured a cosine of 0.9994 on the NudeNet detector. What a user
sees is the list of detections, so this module builds it for both models and
scores the candidate's against the reference's with an F-score.

This module imports nothing of onnxopt (metrics imports it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["DETECTION_SCORE", "NMS_IOU", "MATCH_IOU", "Layout", "detection_layout", "detections", "detection_counts",
           "detection_f1",
           "boxes_and_scores"]

#: A detection is an anchor whose best class score exceeds this (ultralytics' default ``conf``).
DETECTION_SCORE = 0.25
#: Non-maximum suppression drops a box that overlaps a better one of its class by more than this IoU.
NMS_IOU = 0.45
#: A candidate detection matches a reference one of the same class at this IoU or more (the mAP@0.5 criterion).
MATCH_IOU = 0.5
#: At most this many anchors per image enter NMS (the best-scored), at most MAX_DETECTIONS leave it: a broken
#: candidate that scores every anchor high still costs bounded time.
MAX_NMS = 3000
MAX_DETECTIONS = 300
#: How far outside [0, 1] a sigmoid score may stray by float rounding.
_SLACK = 1e-5

Layout = Literal["anchors_last", "anchors_first"]


def _scores_in_unit_range(scores: np.ndarray) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(scores.size and np.nanmin(scores) >= -_SLACK and np.nanmax(scores) <= 1.0 + _SLACK)


def detection_layout(output: np.ndarray, max_classes: int = 1000, *, pixels: bool = True) -> Layout | None:
    """The layout of a detector's raw output, or None when ``output`` does not look like one.

    It looks like one when it is a float ``[N, K, A]`` with more anchors than box-and-score entries, every score
    entry in [0, 1], every width and height non-negative and, with ``pixels``, some coordinate above 1 (a
    probability map of the same shape has none, and stays with the signal metrics; a user who declares the
    metric for boxes in [0, 1] passes ``pixels=False``).
    """
    if output.ndim != 3 or not np.issubdtype(output.dtype, np.floating) or output.shape[0] == 0:
        return None
    k1, k2 = output.shape[1], output.shape[2]
    if 5 <= k1 <= 4 + max_classes and k2 > k1:
        boxes, scores, layout = output[:, :4, :], output[:, 4:, :], "anchors_last"
    elif 6 <= k2 <= 5 + max_classes and k1 > k2:
        boxes, scores, layout = output[:, :, :4], output[:, :, 4:], "anchors_first"
    else:
        return None
    sizes = boxes[:, 2:4, :] if layout == "anchors_last" else boxes[:, :, 2:4]
    with np.errstate(invalid="ignore"):
        if not (_scores_in_unit_range(scores) and np.nanmin(sizes) >= 0.0
                and (not pixels or np.nanmax(boxes) > 1.0 + _SLACK)):
            return None
    return layout  # type: ignore[return-value]


def boxes_and_scores(output: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Views of a batch's box entries and score entries (objectness included), in the output's own layout."""
    if layout == "anchors_last":
        return output[:, :4, :], output[:, 4:, :]
    return output[:, :, :4], output[:, :, 4:]


def _split(image: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [A, 4] (cx, cy, w, h) and class scores [A, C] of one image."""
    rows = image.T if layout == "anchors_last" else image
    boxes, scores = rows[:, :4], rows[:, 4:]
    if layout == "anchors_first":  # YOLOv5: objectness times each class's conditional score
        scores = scores[:, :1] * scores[:, 1:]
    return boxes.astype(np.float64), scores.astype(np.float64)


def _corners(boxes: np.ndarray) -> np.ndarray:
    half = boxes[:, 2:4] / 2.0
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4], corners (x0, y0, x1, y1)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = inter / (area_a[:, None] + area_b[None, :] - inter)
    return np.nan_to_num(out, nan=0.0)


def detections(image: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """One image's detections after threshold and class-wise NMS: corner boxes [D, 4] and classes [D]."""
    boxes, scores = _split(image, layout)
    best = np.nan_to_num(scores.max(axis=1, initial=0.0), nan=0.0)
    keep = np.flatnonzero(best > DETECTION_SCORE)
    keep = keep[np.argsort(-best[keep], kind="stable")][:MAX_NMS]
    corners, classes = _corners(boxes[keep]), scores[keep].argmax(axis=1)
    overlap = _iou(corners, corners)
    alive = np.ones(keep.size, dtype=bool)
    chosen: list[int] = []
    # greedy NMS, best first: a loop over the surviving detections (at most MAX_DETECTIONS), not over elements
    for i in range(keep.size):
        if not alive[i]:
            continue
        chosen.append(i)
        if len(chosen) == MAX_DETECTIONS:
            break
        alive &= ~((overlap[i] > NMS_IOU) & (classes == classes[i]))
    index = np.asarray(chosen, dtype=np.int64)
    return corners[index].reshape(-1, 4), classes[index]


def _matches(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]) -> int:
    """Greedy one-to-one matching, best IoU first: pairs of one class with IoU >= MATCH_IOU."""
    (ref_boxes, ref_classes), (cand_boxes, cand_classes) = reference, candidate
    if not ref_boxes.size or not cand_boxes.size:
        return 0
    iou = _iou(ref_boxes, cand_boxes) * (ref_classes[:, None] == cand_classes[None, :])
    iou[iou < MATCH_IOU] = 0.0
    matched = 0
    while iou.any():
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        matched += 1
        iou[i, :] = 0.0
        iou[:, j] = 0.0
    return matched


def detection_counts(reference: np.ndarray, candidate: np.ndarray,
                     layout: Layout | None = None) -> tuple[int, int, int] | None:
    """(matched pairs, reference detections, candidate detections) over the images, or None unless both are a
    detector's raw output of one shape (:func:`detection_layout` of the reference, unless ``layout`` is given)."""
    if reference.shape != candidate.shape or not np.issubdtype(candidate.dtype, np.floating):
        return None
    layout = layout or detection_layout(reference, pixels=False)
    if layout is None:
        return None
    matched = in_reference = in_candidate = 0
    for ref_image, cand_image in zip(reference, candidate):
        ref, cand = detections(ref_image, layout), detections(cand_image, layout)
        matched += _matches(ref, cand)
        in_reference, in_candidate = in_reference + len(ref[1]), in_candidate + len(cand[1])
    return matched, in_reference, in_candidate


def detection_f1(reference: np.ndarray, candidate: np.ndarray, layout: Layout | None = None) -> float | None:
    """F-score of the candidate's detections against the reference's, pooled over the images: 2 x matched pairs
    over the two models' detections together (1.0 when neither detects anything); None where
    :func:`detection_counts` is None."""
    counts = detection_counts(reference, candidate, layout)
    if counts is None:
        return None
    matched, in_reference, in_candidate = counts
    total = in_reference + in_candidate
    return 1.0 if total == 0 else 2.0 * matched / total
