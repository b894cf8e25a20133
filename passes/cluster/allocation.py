"""Per-layer k and granularity under a weight-error budget: the proposals --max-drop verifies after its k ladder.

The proxy is data-free: each layer's relative squared weight error (1 / its
SNR) at each candidate setting, and the bytes that setting stores. Summed over
layers, the relative errors stand in for the noise the layers add to the
output. :func:`allocate` takes, for an error budget, the per-layer settings
that store the fewest bytes (a multiple-choice knapsack, by dynamic
programming). The budget is a multiple of the error the uniform setting the
ladder chose has, below that of the stronger uniform setting it measured
over (:func:`error_scales`): a layer whose error is small for its bytes goes
lower, one whose bytes are cheap for its error goes higher. Whether a
proposal holds the accuracy budget is measured, not assumed (the manager
verifies it on the selection part and backs off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Proposal", "allocate", "proposals", "error_scales", "ERROR_STEPS", "ERROR_SCALES"]

#: Where the proposals' weight-error budgets lie between the uniform setting's summed error (0) and that of the
#: stronger uniform setting measured over the budget (1), geometrically: never at or past a measured failure.
ERROR_STEPS = (0.0, 0.25, 0.5, 0.75)
#: Without a stronger setting measured over (the uniform one is the ladder's strongest): multiples of its error.
ERROR_SCALES = (1.0,)

#: Steps of the error budget the allocation resolves (each layer's error is rounded up to one).
RESOLUTION = 2000

#: A proposal must store at most this share of the uniform setting's weight bytes to be worth a measurement.
MIN_SAVING = 0.99


@dataclass(frozen=True)
class Proposal:
    """Per layer, the column of the setting chosen; its summed error and bytes; the error budget it was made for."""

    scale: float
    columns: np.ndarray
    error: float
    bytes: int


def allocate(errors: np.ndarray, sizes: np.ndarray, budget: float, resolution: int = RESOLUTION) -> np.ndarray | None:
    """For each layer (row), the column of ``errors``/``sizes`` [layers, settings] to take so that the summed error
    stays within ``budget`` with the fewest bytes; None when no assignment is within.

    Exact up to the error's resolution (a multiple-choice knapsack solved by
    dynamic programming over ``resolution`` steps of the budget): each
    error is rounded up to a step, so the result is always within the budget
    and stores no more than the best assignment within ``budget`` less one
    step per layer. Settings a layer cannot take are ``inf`` in ``sizes``.
    """
    layers, options = errors.shape
    usable = np.isfinite(sizes) & np.isfinite(errors)
    if budget > 0:
        with np.errstate(invalid="ignore", over="ignore"):
            units = np.ceil(np.where(usable, errors, 0.0) / (budget / resolution) * (1 - 1e-12))
    else:
        units = np.where(errors <= 0, 0.0, resolution + 1.0)
    units = np.where(usable & (units <= resolution), units, resolution + 1).astype(np.intp)
    best = np.zeros(resolution + 1)  # best[u]: fewest bytes of the layers so far with u steps of error
    best[1:] = np.inf
    picks = np.full((layers, resolution + 1), -1, dtype=np.intp)
    for layer in range(layers):
        step = np.full(resolution + 1, np.inf)
        for option in range(options):
            u = int(units[layer, option])
            if u > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[u:] = best[: resolution + 1 - u] + sizes[layer, option]
            better = candidate < step
            step[better] = candidate[better]
            picks[layer, better] = option
        best = step
    if not np.isfinite(best).any():
        return None
    used = int(np.argmin(best))
    columns = np.zeros(layers, dtype=np.intp)
    for layer in range(layers - 1, -1, -1):
        columns[layer] = picks[layer, used]
        used -= int(units[layer, columns[layer]])
    return columns


def error_scales(base_error: float, over_error: float | None) -> tuple[float, ...]:
    """Multiples of the uniform setting's summed error to propose at: :data:`ERROR_STEPS` of the way (geometric)
    to ``over_error``, the error of the stronger uniform setting the ladder measured over the budget.

    The k ladder has measured that much weight error as too much for the
    budget (on the same selection part), so proposals stay below it: one
    chosen at it stands on the noise of a single measurement (on the digits
    transformer at --max-drop 0.02, a proposal at 4x k=8's error, about that
    of k=4, which was over, measured 1.11 pt + 0.78 pt margin on selection
    and 3.33 pt on fresh inputs).
    """
    if over_error is None or base_error <= 0 or over_error <= base_error:
        return ERROR_SCALES
    ratio = over_error / base_error
    return tuple(float(ratio ** step) for step in ERROR_STEPS)


def proposals(errors: np.ndarray, sizes: np.ndarray, baseline: np.ndarray,
              scales: tuple[float, ...] = ERROR_SCALES) -> list[Proposal]:
    """Per-layer proposals at ``scales`` × the baseline's (the uniform setting's) summed error, weaker to stronger:
    only those that store under :data:`MIN_SAVING` of the baseline's bytes, each fewer than the one before."""
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
        if out and stored >= out[-1].bytes:  # no stronger than the one before
            continue
        out.append(Proposal(scale, columns, float(errors[rows, columns].sum()), int(stored)))
    return out
