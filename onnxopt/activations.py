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
from onnxopt.graph import cleanup, expose_values
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory, run_batches

__all__ = ["iter_activations", "iter_activation_parts", "activation_bytes_per_sample", "bounded_batches",
           "ACTIVATION_BUDGET", "SEGMENT_MIN_BYTES", "SEGMENT_SHARE"]

#: Bytes of intermediate tensors one batch may produce on a large model: calibration can expose all of them at once,
#: so on a transformer of billions of weights the default 64 samples would hold gigabytes of activations per batch.
ACTIVATION_BUDGET = 2**27
#: Models with at least this many bytes of weights give their activations a segment at a time (iter_activation_parts).
SEGMENT_MIN_BYTES = 2**30
#: Share of the model's weight bytes one segment's session may hold.
SEGMENT_SHARE = 0.2


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


def iter_activation_parts(
    model: ir.Model,
    names: Iterable[str],
    dataset: Dataset,
    sessions: SessionFactory,
    *,
    progress: Progress | None = None,
    description: str = "collecting activations",
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{value name: array}`` dicts that together hold every named value on every batch, grouped any way.

    For consumers that fold each value's batches into running statistics
    (calibration ranges), where the grouping does not matter. A model with
    :data:`SEGMENT_MIN_BYTES` of weights or more whose main graph holds no
    subgraph runs as consecutive segments of at most :data:`SEGMENT_SHARE`
    of its weights, each in a session of its own that is created, run on every
    batch and dropped before the next: ORT touches every weight of a session
    on each run (prepacked copies, or pages of the mapped data file), so one
    session over the whole model holds the whole model. What crosses a
    segment boundary is kept for every batch in between: activations, not
    weights. Anything else runs as :func:`iter_activations`.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    exposed = expose_values(model, wanted)
    segments = _segments(exposed)
    if segments is None:
        yield from iter_activations(model, wanted, dataset, sessions, progress=progress, description=description)
        return
    nodes = list(exposed.graph)
    initializers = set(exposed.graph.initializers)
    reads: list[list[str]] = []  # per segment: the values it reads from the data or from earlier segments
    for indices in segments:
        made = {out.name for i in indices for out in nodes[i].outputs}
        read = dict.fromkeys(v.name for i in indices for v in nodes[i].inputs
                             if v is not None and v.name and v.name not in made and v.name not in initializers)
        reads.append(list(read))
    inputs = {v.name for v in exposed.graph.inputs}
    task = progress.task(f"{description} ({len(segments)} segments)", total=len(segments) * dataset.num_batches) \
        if progress else None
    carried: list[dict[str, np.ndarray]] = []  # per batch: the data's inputs, then every boundary value still needed
    for s, indices in enumerate(segments):
        later = {name for r in reads[s + 1:] for name in r}
        outs = [v.name for i in indices for v in nodes[i].outputs if v.name in later or v.name in wanted]
        session = sessions.create(_segment_model(exposed, indices, reads[s], outs))
        feeds = dataset.batches() if s == 0 else iter(carried)
        kept: list[dict[str, np.ndarray]] = []
        for b, feed in enumerate(feeds):
            results = session.run(outs, {name: feed[name] for name in reads[s]})
            part = dict(zip(outs, results))
            if s == 0:
                yield {name: feed[name] for name in wanted if name in inputs and name in feed}
            yield {name: part[name] for name in outs if name in wanted}
            carry = {**(feed if s else {k: v for k, v in feed.items() if k in later}), **part}
            kept.append({k: v for k, v in carry.items() if k in later})
            if s:
                carried[b] = {}  # give this batch's old boundary back before the next is built up
            if task is not None:
                task.advance()
        del session
        carried = kept
    if task is not None:
        task.close()


def _segments(model: ir.Model) -> list[list[int]] | None:
    """Consecutive runs of main-graph node indices of at most SEGMENT_SHARE of the weights each; None when one
    session is right (a small model, subgraphs, or a single segment)."""
    graph = model.graph
    if next(iter(graph.subgraphs()), None) is not None:
        return None
    sizes = {name: value.const_value.nbytes for name, value in graph.initializers.items()
             if value.const_value is not None}
    total = sum(sizes.values())
    if total < SEGMENT_MIN_BYTES:
        return None
    budget = SEGMENT_SHARE * total
    segments: list[list[int]] = [[]]
    held, seen = 0, set()
    for i, node in enumerate(graph):
        new = {v.name for v in node.inputs if v is not None and v.name in sizes and v.name not in seen}
        weight = sum(sizes[n] for n in new)
        if segments[-1] and held + weight > budget:
            segments.append([])
            held = 0
        segments[-1].append(i)
        held += weight
        seen |= new
    return segments if len(segments) > 1 else None


def _segment_model(model: ir.Model, indices: list[int], inputs: list[str], outputs: list[str]) -> ir.Model:
    """A clone of ``model`` holding only the nodes at ``indices``, read from ``inputs``, giving ``outputs``.

    The clone shares the weights (no copy); values made by nodes outside
    become graph inputs of the same name, type and shape.
    """
    clone = model.clone()
    graph = clone.graph
    nodes = list(graph)
    keep = {id(nodes[i]) for i in indices}
    by_name = {v.name: v for node in nodes for v in (*node.inputs, *node.outputs) if v is not None and v.name}
    by_name.update({v.name: v for v in graph.inputs})
    new_inputs = []
    for name in inputs:
        old = by_name[name]
        fresh = ir.Value(name=name, type=old.type, shape=old.shape)
        for user, index in list(old.uses()):
            if id(user) in keep:
                user.replace_input_with(index, fresh)
        new_inputs.append(fresh)
    graph.outputs.clear()
    graph.remove([node for node in nodes if id(node) not in keep], safe=False)
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
    graph.outputs.extend(by_name[name] for name in outputs)
    cleanup(clone)
    return clone


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
