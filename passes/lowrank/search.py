"""Searches that run candidate models: measured layer sensitivity, and the accuracy-budget search.

Singular-value energy says how much of one layer's output a rank loses;
how much of that reaches the model's output differs from layer to layer,
and not linearly. Measured sensitivity factors one layer at a time at a few
probe ranks (halving from the largest rank that pays) and reads the error
at the model's output; between probes the loss follows the layer's energy
curve piecewise linearly, so the model-wide allocation compares layers in
one unit: output error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory
from onnxopt.validate import collect_outputs

from onnxopt_passes.lowrank.factor import Factorization
from onnxopt_passes.lowrank.layers import Layer
from onnxopt_passes.lowrank.rewrite import build_model

__all__ = ["OutputProbe", "measured_losses", "probe_ranks", "MAX_PROBES"]

#: Probe ranks per layer: the largest that pays, then halving.
MAX_PROBES = 6


class OutputProbe:
    """A model's first output on a dataset, and how far a candidate's strays from it."""

    def __init__(self, model: ir.Model, dataset: Dataset, sessions: SessionFactory) -> None:
        self.dataset, self.sessions = dataset, sessions
        session = sessions.create(model)
        self.name = session.get_outputs()[0].name
        self.reference = collect_outputs(session, dataset, [self.name])[self.name].astype(np.float64)

    def error(self, candidate: ir.Model) -> float:
        """Relative squared error ‖y' - y‖² / ‖y‖² of the candidate's first output."""
        out = collect_outputs(self.sessions.create(candidate), self.dataset, [self.name])[self.name]
        energy = float((self.reference**2).sum())
        return float(((out - self.reference) ** 2).sum()) / max(energy, 1e-30)


def probe_ranks(top: int) -> list[int]:
    """``top``, ``top // 2``, ... down to 1, at most :data:`MAX_PROBES` of them."""
    ranks = []
    while top >= 1 and len(ranks) < MAX_PROBES:
        ranks.append(top)
        top //= 2
    return ranks


def measured_losses(
    model: ir.Model,
    layers: Sequence[Layer],
    factorizations: Sequence[Factorization],
    margin: float,
    probe: OutputProbe,
    progress: Progress | None = None,
) -> tuple[list[np.ndarray], list[dict[int, float]]]:
    """Per layer: output error at every rank (interpolated over its energy curve), and the measured probes."""
    plans = [probe_ranks(layer.max_rank(margin)) for layer in layers]
    losses, measured = [], []
    task = progress.task("lowrank: layer sensitivity", total=sum(len(p) for p in plans)) if progress else None
    for layer, factorization, ranks in zip(layers, factorizations, plans):
        tail = factorization.tail()
        errors = {}
        for rank in ranks:
            errors[rank] = probe.error(build_model(model, [(layer, rank, factorization)]))
            if task:
                task.advance()
        # loss as a function of lost energy, through (0, 0) and the probes, never falling as energy is lost
        # (ranks fall, so lost energy grows along the probes)
        xs = np.maximum.accumulate(np.array([0.0, *(tail[r] for r in ranks)]))
        ys = np.maximum.accumulate(np.array([0.0, *(errors[r] for r in ranks)]))
        losses.append(np.interp(tail, xs, ys) if ranks else tail)
        measured.append(errors)
    if task:
        task.close()
    return losses, measured
