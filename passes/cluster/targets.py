"""Which weights are clustered: the weight inputs of each supported op, and the axis of its output channels.

Every graph is searched, If/Loop/Scan bodies included, and each initializer
once, in the graph that owns it: a weight several nodes read (an outer-scope
initializer two If branches share, a tied embedding) is one target, and its
decode is written once in its own graph, so every reader reads the shared copy.
A weight counts when it reaches a weight input through ops that only move values
(an exporter's Slice/Concat/Unsqueeze reordering an LSTM's gates, a Reshape, a
Cast): clustering replaces values one for one, which such ops carry unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.graph import attribute, is_onnx_op, is_weight, iter_graphs, weight_reads

__all__ = ["WeightSlot", "WEIGHT_SLOTS", "Target", "find_targets", "FLOAT_TYPES"]

#: Weight dtypes the pass clusters (numpy computes in float64 and writes the weight's own dtype back).
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


@dataclass(frozen=True)
class WeightSlot:
    """The input(s) holding an op's weights, and which of a weight's axes indexes output channels (None: none)."""

    input: int | tuple[int, ...]
    channel_axis: Callable[[ir.Node, int], int | None]

    def reads(self, index: int) -> bool:
        """True when input ``index`` is a weight slot of this op."""
        return index == self.input if isinstance(self.input, int) else index in self.input


def _conv_transpose_axis(node: ir.Node, ndim: int) -> int | None:
    # W is [Cin, Cout/group, k...]: axis 1 is the output channel when there is one group; with several
    # groups no single axis is, and the input channels (axis 0) still make a sound grouping of codebooks
    return 1 if int(attribute(node, "group", 1)) == 1 else 0


WEIGHT_SLOTS: dict[str, WeightSlot] = {
    "Conv": WeightSlot(1, lambda node, ndim: 0),
    "ConvTranspose": WeightSlot(1, _conv_transpose_axis),
    "Gemm": WeightSlot(1, lambda node, ndim: (0 if int(attribute(node, "transB", 0)) else 1) if ndim == 2 else None),
    "MatMul": WeightSlot(1, lambda node, ndim: ndim - 1 if ndim >= 2 else None),
    # an embedding table: one codebook per gathered slice (per token row)
    "Gather": WeightSlot(0, lambda node, ndim: int(attribute(node, "axis", 0)) % ndim if ndim else None),
    # recurrent weights W [dirs, gates·hidden, input], R [dirs, gates·hidden, hidden] and B [dirs, 2·gates·hidden]:
    # axis 1 holds one row per gate unit (the gates' blocks stacked), the rows each unit's output reads
    "LSTM": WeightSlot((1, 2, 3), lambda node, ndim: 1 if ndim >= 2 else None),
    "GRU": WeightSlot((1, 2, 3), lambda node, ndim: 1 if ndim >= 2 else None),
    "RNN": WeightSlot((1, 2, 3), lambda node, ndim: 1 if ndim >= 2 else None),
}


@dataclass
class Target:
    """A weight to cluster, the graph that owns it, and the channel axis its readers agree on (None: none)."""

    graph: ir.Graph
    value: ir.Value
    axis: int | None
    readers: list[str]
    #: op types of the value-moving nodes between the weight and its readers (empty: read directly)
    via: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.value.name or "?"


def _matches(globs: Sequence[str], *names: str | None) -> bool:
    return any(name and fnmatch.fnmatchcase(name, g) for g in globs for name in names)


def find_targets(model: ir.Model, ops: Sequence[str], min_size: int,
                 exclude: Sequence[str]) -> tuple[list[Target], list[tuple[str, str]]]:
    """The weights read as the weight input of ``ops``, and (name, reason) for those left alone."""
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    for graph in iter_graphs(model):
        for value in list(graph.initializers.values()):
            if not is_weight(value):
                continue
            slots = [(read, WEIGHT_SLOTS[read.node.op_type]) for read in weight_reads(value)
                     if is_onnx_op(read.node, *ops) and read.node.op_type in WEIGHT_SLOTS
                     and WEIGHT_SLOTS[read.node.op_type].reads(read.index)]
            if not slots:
                continue
            name = value.name or "?"
            tensor = value.const_value
            assert tensor is not None
            size = int(np.prod(tensor.shape.numpy())) if tensor.shape.dims else 1
            readers = [read.node.name or read.node.op_type for read, _ in slots]
            reason = None
            if tensor.dtype not in FLOAT_TYPES:
                if size < min_size:  # index and shape tables read by Gather: not weights, not worth a line
                    continue
                reason = f"{tensor.dtype.name.lower()} weight: only float weights are clustered"
            elif size < max(min_size, 2):
                reason = f"{size} elements, under min_size {min_size}"
            elif _matches(exclude, name, *readers):
                reason = "excluded by name"
            elif value.is_graph_output():
                reason = "also a graph output"
            if reason is not None:
                skipped.append((name, reason))
                continue
            axes = {None if read.rank is None else read.source_axis(slot.channel_axis(read.node, read.rank))
                    for read, slot in slots}
            via = list(dict.fromkeys(node.op_type for read, _ in slots for node in read.path))
            targets.append(Target(graph, value, axes.pop() if len(axes) == 1 else None, readers, via))
    return targets, skipped
