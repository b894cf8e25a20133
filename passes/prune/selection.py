"""Which channels to remove when the readers will be refit: greedy least-squares selection on Gram matrices.

For a reader ``Y = X W^T`` with input Gram matrix ``H = X^T X``, removing the
input columns ``S`` and refitting the rest optimally costs
``tr(W_S (H^-1)_SS^-1 W_S^T)`` in squared output error (the Optimal Brain
Surgeon formula, and the closed form behind ThiNet's greedy selection). The
channels of a group are removed one at a time, each time the one whose
removal costs least summed over every reader (each normalized by its output
energy), with ``H^-1`` and ``W`` updated after each removal so correlated
channels are judged on what the others can no longer compensate.

A constant column is part of every design matrix (the refit's bias), so a
channel that is nearly constant is cheap to remove.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.graph import constant_array
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

from .design import design_rows, handles, linear_map, rows_per_batch, width
from .groups import ChannelGraph, Consumer, Group

__all__ = ["MAX_GRAM", "input_grams", "greedy_orders"]

#: Design matrices wider than this (inputs x kernel taps) are left to the diagonal criterion: H would not fit.
MAX_GRAM = 2304


@dataclass
class _Reader:
    """One consumer during selection: weight as a matrix (with a zero bias column), H^-1, and output energy."""

    consumer: Consumer
    w: np.ndarray
    h_inv: np.ndarray
    energy: float
    taps: int


def _taps(consumer: Consumer) -> int:
    w = constant_array(consumer.node.inputs[consumer.weight_index])
    assert w is not None
    return int(np.prod(w.shape[2:])) if consumer.kind == "conv" else 1


def input_grams(model: ir.Model, consumers: Sequence[Consumer], dataset: Dataset, sessions: SessionFactory,
                rng: np.random.Generator, progress: Progress | None = None) -> dict[Consumer, np.ndarray]:
    """Mean ``[X 1]^T [X 1]`` of each consumer's design matrix on calibration data (the last row/column: bias)."""
    chosen = list({c: None for c in consumers if handles(c) and c.value.name and width(c) <= MAX_GRAM})
    limits = {c: rows_per_batch(c, dataset.num_batches) for c in chosen}
    sums: dict[Consumer, np.ndarray] = {}
    rows: dict[Consumer, int] = {}
    names = sorted({c.value.name for c in chosen if c.value.name})
    for batch in iter_activations(model, names, dataset, sessions, progress=progress,
                                  description="prune: input Gram matrices"):
        for c in chosen:
            x, _ = design_rows(batch[c.value.name or ""], c, None, rng, limits[c])
            xa = np.hstack([x, np.ones((len(x), 1))]).astype(np.float32)
            g = (xa.T @ xa).astype(np.float64)
            sums[c] = sums[c] + g if c in sums else g
            rows[c] = rows.get(c, 0) + len(x)
    return {c: g / max(rows[c], 1) for c, g in sums.items()}


def _reader(consumer: Consumer, gram: np.ndarray, ridge: float) -> _Reader | None:
    w = constant_array(consumer.node.inputs[consumer.weight_index])
    assert w is not None
    matrix = linear_map(consumer.node, consumer.kind, w)  # [outputs, inputs x taps]
    d = matrix.shape[1]
    if gram.shape[0] != d + 1:
        return None
    h = gram.copy()
    scale = float(np.mean(np.diag(h)[:d]))
    h[np.arange(d), np.arange(d)] += ridge * scale if scale > 0 else 1e-12
    try:
        h_inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        return None
    w_aug = np.hstack([matrix, np.zeros((matrix.shape[0], 1))])
    energy = float(np.sum(w_aug * (w_aug @ gram)))
    return _Reader(consumer, w_aug, h_inv, energy if energy > 0 else 1.0, _taps(consumer))


def _columns(cg: ChannelGraph, reader: _Reader, roots: np.ndarray) -> list[np.ndarray]:
    """Design-matrix columns of each root in this reader (a channel is ``taps`` columns per position)."""
    positions = cg.roots(cg.layouts[reader.consumer.value].ids)
    out = []
    for r in roots.tolist():
        pos = np.nonzero(positions == r)[0]
        out.append((pos[:, None] * reader.taps + np.arange(reader.taps)[None, :]).reshape(-1))
    return out


def _costs(reader: _Reader, cols: list[np.ndarray], alive: np.ndarray) -> np.ndarray:
    """Squared-error cost of removing each alive root alone from this reader, given what is already removed."""
    costs = np.zeros(len(cols))
    sizes = {len(cols[i]) for i in np.nonzero(alive)[0]}
    for size in sizes:
        idx = np.array([i for i in np.nonzero(alive)[0] if len(cols[i]) == size])
        if size == 0:
            continue
        c = np.stack([cols[i] for i in idx])  # [n, size]
        blocks = reader.h_inv[c[:, :, None], c[:, None, :]]  # [n, size, size]
        ws = np.moveaxis(reader.w[:, c], 1, 0)  # [n, outputs, size]
        solved = np.linalg.solve(blocks, np.swapaxes(ws, 1, 2))  # [n, size, outputs]
        costs[idx] = np.einsum("nos,nso->n", ws, solved)
    return costs / reader.energy


def _remove(reader: _Reader, cols: np.ndarray) -> None:
    """OBS update: drop columns ``cols`` and let the remaining ones compensate (W and H^-1 downdated)."""
    if len(cols) == 0:
        return
    h_ss = reader.h_inv[np.ix_(cols, cols)]
    try:
        inv = np.linalg.inv(h_ss)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(h_ss)
    rows = inv @ reader.h_inv[cols, :]
    reader.w -= reader.w[:, cols] @ rows
    reader.h_inv -= reader.h_inv[:, cols] @ rows
    reader.w[:, cols] = 0.0
    reader.h_inv[cols, :] = 0.0
    reader.h_inv[:, cols] = 0.0


def greedy_orders(cg: ChannelGraph, groups: Sequence[Group], grams: dict[Consumer, np.ndarray], ridge: float,
                  limit: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per group key: its prunable roots in greedy removal order (groups no reader can judge are left out).

    ``limit`` caps how many roots each group will lose (the order past it is
    by the last costs computed, which keeps the search short).
    """
    orders: dict[str, np.ndarray] = {}
    for g in groups:
        if len(g.roots) < 2:
            continue
        readers = [r for c in g.consumers if c in grams for r in [_reader(c, grams[c], ridge)] if r is not None]
        if not readers or len(readers) < len([c for c in g.consumers if handles(c)]):
            continue  # a reader without a Gram matrix would be judged by nothing: use the scores instead
        cols = [_columns(cg, r, g.roots) for r in readers]
        alive = np.ones(len(g.roots), dtype=bool)
        removed: list[int] = []
        steps = min(len(g.roots) - 1, (limit or {}).get(g.key, len(g.roots) - 1))
        last = np.zeros(len(g.roots))
        for _ in range(steps):
            last = sum(_costs(r, c, alive) for r, c in zip(readers, cols))  # type: ignore[assignment]
            last[~alive] = np.inf
            best = int(np.argmin(last))
            alive[best] = False
            removed.append(best)
            for r, c in zip(readers, cols):
                _remove(r, c[best])
        rest = [i for i in np.argsort(np.where(alive, last, np.inf), kind="stable").tolist() if alive[i]]
        orders[g.key] = g.roots[np.array(removed + rest, dtype=np.int64)]
    return orders
