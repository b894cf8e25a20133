"""Read intermediate tensors of a model on ONNX Runtime, batch by batch.

Calibration (quant), activation saliency and reconstruction (prune) and
activation-aware SVD (lowrank) all need the same thing: the values of some
inner tensors on calibration data. They get them from here, one batch at a
time, so no pass holds the activations of a whole data set in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.graph import expose_values
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory, run_batches

__all__ = ["iter_activations", "activation_bytes_per_sample", "bounded_batches", "ACTIVATION_BUDGET"]

#: Bytes of intermediate tensors one batch may produce on a large model: calibration can expose all of them at once,
#: so on a transformer of billions of weights the default 64 samples would hold gigabytes of activations per batch.
ACTIVATION_BUDGET = 2**27


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


def activation_bytes_per_sample(model: ir.Model) -> int:
    """Bytes of all main-graph intermediate tensors for one sample, from the shapes inferred at load.

    A free first (batch) dim counts as 1; tensors with other unknown dims are
    left out, so the figure is a lower bound.
    """
    total = 0
    for node in model.graph:
        for value in node.outputs:
            if value.shape is None or value.dtype is None:
                continue
            dims = list(value.shape.dims)
            if dims and not isinstance(dims[0], int):
                dims[0] = 1
            if all(isinstance(d, int) and d >= 0 for d in dims):
                total += math.ceil(math.prod(dims) * value.dtype.itemsize)
    return total


def bounded_batches(model: ir.Model, dataset: Dataset, budget: int = ACTIVATION_BUDGET) -> Dataset:
    """``dataset`` with batches small enough that one batch's activations of ``model`` stay within ``budget``.

    Batches only ever get smaller; ready-made feeds (test-data folders) and
    models whose batch is fixed are left as they are.
    """
    per_sample = activation_bytes_per_sample(model)
    if not dataset.arrays or per_sample == 0 or any(
            v.shape is not None and len(v.shape) and isinstance(v.shape[0], int) and v.shape[0] > 1 for v in model.graph.inputs):
        return dataset
    size = max(1, min(dataset.batch_size, budget // per_sample))
    return dataset if size == dataset.batch_size else dataclasses.replace(dataset, batch_size=size)
