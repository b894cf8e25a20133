"""Choose on one part, judge on another: the one place evaluation data is split.

Whatever a run selects on data (quant's fallback, lowrank's ranks, prune's
and cluster's strength under ``--max-drop``, a search's pick) is selected on
the *selection* part; the gate and the final report are measured on the
*confirmation* part, which no chooser saw. The split is deterministic by
seed; ``--holdout FILE`` replaces it (all of ``--eval`` selects, the file
confirms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxopt.data import Dataset

__all__ = ["Split", "split_dataset", "subset", "SELECTION_SHARE"]

#: Share of ``--eval`` samples the choosers see; the rest confirms.
SELECTION_SHARE = 0.5


@dataclass
class Split:
    """The selection part, the confirmation part, and which samples (or feeds) of the source each holds."""

    selection: Dataset
    confirmation: Dataset
    selection_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    confirmation_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    how: str = ""
    disjoint: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"how": self.how, "disjoint": self.disjoint, "selection_samples": len(self.selection),
                "confirmation_samples": len(self.confirmation), "selection_source": self.selection.source,
                "confirmation_source": self.confirmation.source}


def subset(dataset: Dataset, indices: np.ndarray, tag: str) -> Dataset:
    """The samples (or, for ONNX test-data folders, the feeds) at ``indices``, in that order."""
    labels = None
    if dataset.labels is not None and (dataset.arrays or len(dataset.labels) == len(dataset.feeds)):
        labels = dataset.labels[indices]
    # (labels per sample cannot follow a split of multi-sample feeds: they are dropped then)
    if dataset.arrays:
        # fancy indexing copies only the chosen rows of each input
        return Dataset(f"{dataset.source} [{tag}]", {k: v[indices] for k, v in dataset.arrays.items()}, [], labels,
                       dataset.fidelity_only, dataset.batch_size)
    return Dataset(f"{dataset.source} [{tag}]", {}, [dataset.feeds[i] for i in indices], labels, dataset.fidelity_only,
                   dataset.batch_size)


def split_dataset(evaluation: Dataset, seed: int = 0, *, holdout: Dataset | None = None,
                  share: float = SELECTION_SHARE) -> Split:
    """Split ``evaluation`` by ``seed`` into selection and confirmation (or select on all of it and confirm on ``holdout``).

    A set of one sample (or one feed) cannot be split: both parts are then
    that sample and ``disjoint`` is False, which the report says.
    """
    n = len(evaluation.feeds) if not evaluation.arrays else len(evaluation)
    if holdout is not None:
        return Split(evaluation, holdout, np.arange(n), np.empty(0, dtype=np.int64),
                     f"selection: all {len(evaluation)} samples of --eval; confirmation: --holdout ({len(holdout)})")
    if n < 2:
        return Split(evaluation, evaluation, np.arange(n), np.arange(n),
                     "one sample: selection and confirmation are the same (give more --eval samples or --holdout)",
                     disjoint=False)
    if not 0.0 < share < 1.0:
        raise ValueError(f"selection share must be in (0, 1), got {share}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7])).permutation(n)
    cut = min(n - 1, max(1, int(round(n * share))))
    # sorted, so each part keeps the source's order (and its batches their usual look)
    sel, conf = np.sort(order[:cut]), np.sort(order[cut:])
    unit = "samples" if evaluation.arrays else "feeds"
    return Split(subset(evaluation, sel, "selection"), subset(evaluation, conf, "confirmation"), sel, conf,
                 f"--eval split by seed {seed}: {len(sel)} {unit} select, {len(conf)} confirm")
