"""Read intermediate tensors of a model on ONNX Runtime, batch by batch.

Calibration (quant), activation saliency and reconstruction (prune) and
activation-aware SVD (lowrank) all need the same thing: the values of some
inner tensors on calibration data. They get them from here, one batch at a
time, so no pass holds the activations of a whole data set in memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.graph import cleanup, expose_values, iter_nodes
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory, give_back_memory, run_batches

__all__ = ["iter_activations", "iter_activation_parts", "activation_bytes_per_sample", "bounded_batches",
           "ACTIVATION_BUDGET", "SEGMENT_MIN_BYTES", "SEGMENT_SHARE", "segment_min_bytes", "held_bytes",
           "model_segments", "run_segments", "segment_models"]

#: Bytes of intermediate tensors one batch may produce on a large model: calibration can expose all of them at once,
#: so on a transformer of billions of weights the default 64 samples would hold gigabytes of activations per batch.
ACTIVATION_BUDGET = 2**27
#: Models with at least this many bytes of weights give their activations a segment at a time (iter_activation_parts),
#: and are validated a segment at a time (onnxopt.validate); ``ONNXOPT_SEGMENT_MIN_BYTES`` overrides it.
#: Why 1 GiB: one session over a model holds about its weights, and the process's fixed cost (Python, onnx, ORT,
#: the IR) is 0.3-0.6 GB; from 1 GiB on, the session is the larger part of a run's peak, and a model of 2 GB or
#: more, where a second copy no longer fits beside the first on a typical 8-16 GB machine, is always segmented.
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
    :func:`segment_min_bytes` of weights or more whose main graph holds no
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
    task = progress.task(f"{description} ({len(segments)} segments)", total=len(segments) * dataset.num_batches) \
        if progress else None
    for _, part in run_segments(exposed, segments, wanted, dataset.batches, sessions, task=task):
        yield part
    if task is not None:
        task.close()


def run_segments(
    model: ir.Model,
    segments: list[list[int]],
    wanted: Sequence[str],
    feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
    sessions: SessionFactory,
    *,
    task: Any = None,
    time: Callable[[ort.InferenceSession, dict[str, np.ndarray]], None] | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run ``model`` as ``segments`` (from :func:`model_segments`), one session alive at a time, on every feed.

    Yields ``(feed index, {name: array})`` for the ``wanted`` values; each value comes from one segment only,
    in feed order. ``time(session, feed)``, when given, is called once per segment, on its session, with the
    last feed's values at the segment's inputs.
    """
    nodes = list(model.graph)
    reads = _reads(model, segments)
    inputs = {v.name for v in model.graph.inputs}
    given = {name for name in wanted if name in inputs}  # the data's own values come with the first segment
    carried: list[dict[str, np.ndarray]] = []  # per feed: the data's inputs, then every boundary value still needed
    for s, indices in enumerate(segments):
        later = {name for r in reads[s + 1:] for name in r}
        outs = list(dict.fromkeys(v.name for i in indices for v in nodes[i].outputs
                                  if v.name in later or (v.name in wanted and v.name not in given)))
        mine = [name for name in outs if name in wanted and name not in given]
        segment = _segment_model(model, indices, reads[s], outs, carried[0] if carried else None)
        session = sessions.create(segment)
        source = feeds() if s == 0 else iter(carried)
        kept: list[dict[str, np.ndarray]] = []
        last: dict[str, np.ndarray] = {}
        for b, feed in enumerate(source):
            last = {name: feed[name] for name in reads[s]}
            results = session.run(outs, last)
            part = dict(zip(outs, results))
            if s == 0:
                yield b, {name: feed[name] for name in wanted if name in inputs and name in feed}
            yield b, {name: part[name] for name in mine}
            carry = {**(feed if s else {k: v for k, v in feed.items() if k in later}), **part}
            kept.append({k: v for k, v in carry.items() if k in later})
            if s:
                carried[b] = {}  # give this feed's old boundary back before the next is built up
            if task is not None:
                task.advance()
        given.update(mine)
        if time is not None and last:
            time(session, last)
        del session, segment
        give_back_memory()
        carried = kept


def _reads(model: ir.Model, segments: list[list[int]]) -> list[list[str]]:
    """Per segment: the values it reads from the data or from earlier segments."""
    nodes = list(model.graph)
    initializers = set(model.graph.initializers)
    reads: list[list[str]] = []
    for indices in segments:
        made = {out.name for i in indices for out in nodes[i].outputs}
        read = dict.fromkeys(v.name for i in indices for v in nodes[i].inputs
                             if v is not None and v.name and v.name not in made and v.name not in initializers)
        reads.append(list(read))
    return reads


#: Ops whose values ORT's constant folding leaves as they are (its QDQ fusions read them) and ops without fixed
#: values (never constant, whatever their inputs).
_NOT_FOLDED = frozenset({"DequantizeLinear", "QuantizeLinear"})
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"})


def segment_min_bytes() -> int:
    """:data:`SEGMENT_MIN_BYTES`, or the ``ONNXOPT_SEGMENT_MIN_BYTES`` environment variable when set (a knob for
    forcing the large-model paths on small models, and for machines with little memory)."""
    raw = os.environ.get("ONNXOPT_SEGMENT_MIN_BYTES", "").strip()
    if not raw:
        return SEGMENT_MIN_BYTES
    try:
        return max(0, int(float(raw)))
    except ValueError:
        raise OnnxoptError(f"ONNXOPT_SEGMENT_MIN_BYTES={raw!r} is not a number of bytes",
                           "give bytes, e.g. ONNXOPT_SEGMENT_MIN_BYTES=1073741824, or unset it") from None


def _value_bytes(value: ir.Value) -> int:
    if value.shape is None or value.dtype is None or not all(isinstance(d, int) for d in value.shape.dims):
        return 0
    return (math.prod(value.shape.dims) * value.dtype.bitwidth + 7) // 8


def _constant_nodes(graph: ir.Graph, nodes: list[ir.Node]) -> list[bool]:
    """Per node: computed from weights alone (so ORT folds it at session creation, DequantizeLinear aside)."""
    constant = {name for name, value in graph.initializers.items() if not value.is_graph_input()}
    flags = []
    for node in nodes:
        real = [v for v in node.inputs if v is not None and v.name]
        flag = node.op_type not in _RANDOM and (node.op_type == "Constant" or (bool(real) and all(v.name in constant
                                                                                                   for v in real)))
        if flag:
            constant.update(v.name for v in node.outputs)
        flags.append(flag)
    return flags


def held_bytes(model: ir.Model) -> tuple[int, int]:
    """(stored, folded): bytes of the main graph's weights, and bytes of the values ORT computes from weights alone
    when it creates a session (constant folding: a decode of packed weights, a transpose of a weight)."""
    nodes = list(model.graph)
    weights, folded = _node_weights(model.graph, nodes, _constant_nodes(model.graph, nodes))
    return sum(weights) - folded, folded


#: A weight a pass made in memory costs a session about this many times its bytes beyond the array itself (ORT's
#: copy of the handed-over buffer and its prepacked form; a weight mapped from a file costs its prepacked form only):
#: measured 2.9x against 1.5x on the segments of a lowrank MatMul chain.
IN_MEMORY_COST = 2


def _node_weights(graph: ir.Graph, nodes: list[ir.Node], constant: list[bool],
                  in_memory: int = 1) -> tuple[list[int], int]:
    """Per node, the bytes a session holds for the weights it is the first to read (0 for constant nodes), with
    the weights a constant input is folded from and the folded value itself; and the folded share of the total.
    ``in_memory`` weighs weights held in memory (not mapped from a file) that many times."""
    sizes = {name: value.const_value.nbytes * (1 if isinstance(value.const_value, ir.ExternalTensor) else in_memory)
             for name, value in graph.initializers.items()
             if value.const_value is not None and not value.is_graph_input()}
    producer = {out.name: i for i, node in enumerate(nodes) for out in node.outputs if constant[i]}
    seen: set[str] = set()
    folded = [0]

    def held(value: ir.Value) -> int:
        stack, total = [value], 0
        while stack:
            v = stack.pop()
            if v is None or not v.name or v.name in seen:
                continue
            seen.add(v.name)
            if v.name in sizes:
                total += sizes[v.name]
            elif v.name in producer:
                node = nodes[producer[v.name]]
                own = 0 if node.op_type in _NOT_FOLDED else _value_bytes(v)
                folded[0] += own
                total += own
                stack.extend(node.inputs)
        return total

    weights = [0 if constant[i] else sum(held(v) for v in node.inputs if v is not None)
               for i, node in enumerate(nodes)]
    return weights, folded[0]


def _segments(model: ir.Model, *, budget: float | None = None,
              crosses: Callable[[ir.Value], bool] | None = None) -> list[list[int]] | None:
    """Runs of main-graph node indices of at most ``budget`` bytes held by a session each (weights and the values
    ORT folds from them); None when one session is right (subgraphs, a single segment, a model within ``budget``,
    or without ``budget`` a model under :func:`segment_min_bytes`, which then gets SEGMENT_SHARE of its own).

    Nodes computed from weights alone go with every segment that reads them (so a decode is folded or run beside
    its consumer, never carried across a boundary). With ``crosses``, a boundary is drawn only where every value
    that would cross it passes ``crosses`` (a segment then grows past ``budget`` until it can end).
    """
    graph = model.graph
    if next(iter(graph.subgraphs()), None) is not None:
        return None
    nodes = list(graph)
    constant = _constant_nodes(graph, nodes)
    weights, _ = _node_weights(graph, nodes, constant, IN_MEMORY_COST)
    total = sum(weights)
    if not total or (total <= budget if budget is not None else total < segment_min_bytes()):
        return None
    budget = SEGMENT_SHARE * total if budget is None else budget
    order = [i for i in range(len(nodes)) if not constant[i]]
    blocked = [0] * (len(order) + 2)  # +1 where a value that may not cross starts to span a cut, -1 past its last use
    if crosses is not None:
        position = {id(nodes[i]): k for k, i in enumerate(order)}
        for k, i in enumerate(order):
            for value in nodes[i].outputs:
                last = max((position[id(user)] for user, _ in value.uses() if id(user) in position), default=k)
                if last > k and not crosses(value):
                    blocked[k + 1] += 1
                    blocked[last + 1] -= 1
    segments: list[list[int]] = [[]]
    held = spanning = 0
    for k, i in enumerate(order):
        spanning += blocked[k]
        if segments[-1] and held + weights[i] > budget and not spanning:
            segments.append([])
            held = 0
        segments[-1].append(i)
        held += weights[i]
    if len(segments) < 2:
        return None
    producer = {out.name: i for i, node in enumerate(nodes) for out in node.outputs if constant[i]}

    def closure(indices: Iterable[int]) -> set[int]:
        members = set(indices)
        stack = [v for i in members for v in nodes[i].inputs]
        while stack:
            v = stack.pop()
            j = producer.get(v.name) if v is not None else None
            if j is not None and j not in members:
                members.add(j)
                stack.extend(nodes[j].inputs)
        return members

    full = [closure(indices) for indices in segments]
    attached = set().union(*full)
    # constant nodes no computed node reads (a graph output made from weights alone) go with the first segment
    full[0] |= closure([*full[0], *(j for j in range(len(nodes)) if constant[j] and j not in attached)])
    return [sorted(members) for members in full]


def model_segments(model: ir.Model, *, budget: float | None = None,
                   crosses: Callable[[ir.Value], bool] | None = None) -> list[list[int]] | None:
    """The segments :func:`run_segments` runs ``model`` in, or None when one session is right (see _segments)."""
    return _segments(model, budget=budget, crosses=crosses)


def segment_models(model: ir.Model, segments: list[list[int]]) -> Iterator[ir.Model]:
    """Each segment as a model of its own, made one at a time (sharing ``model``'s weights): its inputs are what it
    reads from the data or from earlier segments, its outputs what later segments read and the graph outputs it
    makes. For reading what ORT makes of each part (no values are carried)."""
    nodes = list(model.graph)
    reads = _reads(model, segments)
    finals = {v.name for v in model.graph.outputs}
    for s, indices in enumerate(segments):
        later = {name for r in reads[s + 1:] for name in r}
        outs = list(dict.fromkeys(v.name for i in indices for v in nodes[i].outputs if v.name in later or v.name in finals))
        yield _segment_model(model, indices, reads[s], outs)


def _segment_model(model: ir.Model, indices: list[int], inputs: list[str], outputs: list[str],
                   examples: dict[str, np.ndarray] | None = None) -> ir.Model:
    """A clone of ``model`` holding only the nodes at ``indices``, read from ``inputs``, giving ``outputs``.

    The clone shares the weights (no copy); values made by nodes outside
    become graph inputs of the same name, type and shape (a value a pass
    left without a type gets the element type of its array in ``examples``:
    ORT refuses graph inputs without one).
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
        kind = old.type
        if kind is None and examples is not None and name in examples:
            kind = ir.TensorType(ir.DataType.from_numpy(np.asarray(examples[name]).dtype))
        fresh = ir.Value(name=name, type=kind, shape=old.shape)
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
    # nodes removed unsafely still count as uses, so cleanup keeps every weight they read: a session would get the
    # whole model's in-memory weights handed over (ORT copied them: a lowrank chain's segments held 3x their share)
    read = {v.name for node in iter_nodes(clone) for v in node.inputs if v is not None}
    for value in list(graph.initializers.values()):
        if value.name not in read and not value.is_graph_output() and value.name:
            del graph.initializers[value.name]
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
