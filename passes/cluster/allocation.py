"""Per-layer k and granularity under a weight-error budget: the proposals --max-drop verifies after its k ladder.

The proxy is data-free: each layer's relative squared weight error (1 / its
SNR) at each candidate setting, and the bytes that setting stores. Summed over
layers, the relative errors stand in for the noise the layers add to the
output. :func:`allocate` takes, for an error budget, the per-layer settings
that store the fewest bytes (Lagrangian: each layer minimises bytes + λ·error
for one λ shared by all, swept over a grid, so a layer's setting moves
monotonically as the budget loosens). The budget is a multiple of the error
the uniform setting the ladder chose has: a layer whose error is small for its
bytes goes lower, one whose bytes are cheap for its error goes higher.
Whether a proposal holds the accuracy budget is measured, not assumed (the
manager verifies it on the selection part and backs off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Proposal", "allocate", "proposals", "ERROR_SCALES"]

#: Weight-error budgets of the proposals, as multiples of the uniform setting's summed relative error
#: (weaker to stronger); a rung that stores no fewer bytes than the uniform setting, or repeats one, is dropped.
ERROR_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)

#: A proposal must store at most this share of the uniform setting's weight bytes to be worth a measurement.
MIN_SAVING = 0.99


@dataclass(frozen=True)
class Proposal:
    """Per layer, the column of the setting chosen; its summed error and bytes; the error budget it was made for."""

    scale: float
    columns: np.ndarray
    error: float
    bytes: int


def allocate(errors: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray | None:
    """For each layer (row), the column of ``errors``/``sizes`` [layers, settings] to take so that the summed error
    stays within ``budget`` with the fewest bytes, among the Lagrangian solutions; None when none is within.

    Settings a layer cannot take are ``inf`` in ``sizes``.
    """
    finite = np.isfinite(sizes)
    err = np.where(finite, errors, np.inf)
    # λ spans from "bytes only" to "error only": the ratio of a byte to a unit of relative error on this model
    scale = float(np.nanmax(np.where(finite, sizes, np.nan)))
    lambdas = np.concatenate([[0.0], scale * np.geomspace(1e-3, 1e9, 600)])
    with np.errstate(invalid="ignore"):
        cost = np.where(finite[None], sizes[None] + lambdas[:, None, None] * err[None], np.inf)
        # ties (a setting of equal cost) go to the smaller error: at λ=0 that keeps bytes equal and error least
        cost = cost + 1e-12 * np.where(finite, err, 0)[None]
    columns = np.argmin(cost, axis=2)  # [lambdas, layers]
    rows = np.arange(errors.shape[0])
    total_error = err[rows, columns].sum(axis=1)
    total_bytes = sizes[rows, columns].sum(axis=1)
    within = total_error <= budget * (1 + 1e-9)
    if not within.any():
        return None
    best = np.flatnonzero(within)[np.argmin(total_bytes[within])]
    return columns[best]


def proposals(errors: np.ndarray, sizes: np.ndarray, baseline: np.ndarray,
              scales: tuple[float, ...] = ERROR_SCALES) -> list[Proposal]:
    """Per-layer proposals at ``scales`` × the baseline's (the uniform setting's) summed error, weaker to stronger:
    only those that store under :data:`MIN_SAVING` of the baseline's bytes, each different from the one before."""
    rows = np.arange(errors.shape[0])
    base_error = float(errors[rows, baseline].sum())
    base_bytes = float(sizes[rows, baseline].sum())
    out: list[Proposal] = []
    for scale in scales:
        columns = allocate(errors, sizes, scale * base_error)
        if columns is None:
            continue
        stored = float(sizes[rows, columns].sum())
        if stored > MIN_SAVING * base_bytes:
            continue
        if out and np.array_equal(out[-1].columns, columns):
            continue
        out.append(Proposal(scale, columns, float(errors[rows, columns].sum()), int(stored)))
    return out
