"""Read intermediate tensors of a model on ONNX Runtime, batch by batch.

Calibration (quant), activation saliency and reconstruction (prune) and
activation-aware SVD (lowrank) all need the same thing: the values of some
inner tensors on calibration data. They get them from here, one batch at a
time, so no pass holds the activations of a whole data set in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.graph import expose_values
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory, run_batches

__all__ = ["iter_activations"]


def iter_activations(
    model: ir.Model,
    names: Iterable[str],
    dataset: Dataset,
    sessions: SessionFactory,
    *,
    progress: Progress | None = None,
    description: str = "collecting activations",
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{value name: array}`` for each batch of ``dataset``.

    ORT's graph optimizations are kept on: exposing a value as an output
    stops ORT from fusing it away, so the numbers are the unfused ones.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    exposed = expose_values(model, wanted)
    session = sessions.create(exposed)
    task = progress.task(description, total=dataset.num_batches) if progress else None
    for outputs in run_batches(session, dataset.batches(), wanted):
        yield outputs
        if task is not None:
            task.advance()
    if task is not None:
        task.close()
