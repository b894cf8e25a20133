"""Channel dependency groups: which channels of which tensors must be removed together.

Every layer that creates channels (a Conv's filters, a Gemm's or MatMul's
output units) hands out fresh *channel ids*. Ops propagate ids from their
inputs to their outputs through a per-op table (:mod:`.ops`): a Relu keeps
them, a Concat concatenates them, a residual Add ties the ids of both arms
together (union-find), a Flatten repeats each id once per spatial position.
Each tracked tensor ends up with a :class:`Layout`: one channel axis and
the id of every position along it.

Two channels are in the same *group* when they appear in exactly the same
set of tensors: the arms of a residual block form one group, the branches
of a Concat form one group each. Whatever the table cannot follow safely
fixes the ids involved, with a reason; a fixed channel is never removed, so
the pass never writes a graph it does not understand.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = [
    "Layout",
    "SliceInput",
    "SetCountAttr",
    "SetShapeEntry",
    "SetSplitSizes",
    "SetSliceBounds",
    "Edit",
    "Producer",
    "Consumer",
    "Group",
    "ChannelGraph",
    "dims_of",
]


@dataclass(frozen=True)
class Layout:
    """Where a tensor's tracked channels are: the axis, the tensor's rank, and the channel id of each position."""

    axis: int
    rank: int
    ids: np.ndarray


# --- edits: what surgery does to the graph, recorded as data during discovery -------------------


@dataclass(frozen=True)
class SliceInput:
    """Keep, along ``axis`` of the constant at ``node.inputs[index]``, the positions ``value`` keeps.

    ``blocks > 1`` (a grouped Conv's input channels): ``value``'s positions are
    ``blocks`` equal blocks pruned alike, and the axis holds one block.
    """

    node: ir.Node
    index: int
    axis: int
    value: ir.Value
    blocks: int = 1


@dataclass(frozen=True)
class SetCountAttr:
    """Set an int attribute (a depthwise Conv's ``group``) to the number of positions ``value`` keeps."""

    node: ir.Node
    name: str
    value: ir.Value


@dataclass(frozen=True)
class SetShapeEntry:
    """Set entry ``entry`` of the constant int vector at ``node.inputs[index]`` to the positions ``value`` keeps."""

    node: ir.Node
    index: int
    entry: int
    value: ir.Value


@dataclass(frozen=True)
class SetSplitSizes:
    """Write a Split's sizes as the positions each output keeps."""

    node: ir.Node
    outputs: tuple[ir.Value, ...]


@dataclass(frozen=True)
class SetSliceBounds:
    """Move a Slice's start/end on the channel axis (entry ``entry`` of starts/ends) to the pruned input."""

    node: ir.Node
    entry: int
    source: ir.Value
    start: int
    end: int


Edit = SliceInput | SetCountAttr | SetShapeEntry | SetSplitSizes | SetSliceBounds


@dataclass(frozen=True)
class Producer:
    """A layer whose output channels are created here: filters along ``weight_axis`` of its weight."""

    node: ir.Node
    weight_index: int
    weight_axis: int
    value: ir.Value
    ids: np.ndarray


@dataclass(frozen=True)
class Consumer:
    """A layer that sums over the channels of ``node.inputs[data_index]`` (Conv, Gemm, MatMul with a constant weight)."""

    node: ir.Node
    data_index: int
    weight_index: int
    weight_axis: int
    value: ir.Value
    kind: str


@dataclass
class Group:
    """Channels removed together: the layers that make them, the layers that read them, and what is prunable.

    ``roots`` are the prunable channels (union-find roots), ``fixed`` those that
    must stay; ``width`` is how many producer channels one root stands for
    (1, or a head's size when attention heads are pruned).
    """

    key: str
    name: str
    roots: np.ndarray
    fixed: np.ndarray
    producers: list[Producer]
    consumers: list[Consumer]
    reason: str | None = None
    width: int = 1

    @property
    def size(self) -> int:
        return int(len(self.roots) + len(self.fixed))

    @property
    def prunable(self) -> bool:
        return len(self.roots) > 0


def dims_of(value: ir.Value | None) -> list[int | None] | None:
    """The value's dims (None for a symbolic or unknown dim), or None when its rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [int(d) if isinstance(d, int) and d >= 0 else None for d in value.shape.dims]


@dataclass
class ChannelGraph:
    """Channel ids, their unions and fixes, tensor layouts, and the edits surgery will apply."""

    model: ir.Model
    opset: int = 18
    attention_heads: bool = False
    layouts: dict[ir.Value, Layout] = field(default_factory=dict)
    edits: list[Edit] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    _parent: list[int] = field(default_factory=list)
    _reason: dict[int, str] = field(default_factory=dict)
    _root: np.ndarray | None = None

    # --- ids -----------------------------------------------------------------------------------

    def fresh(self, n: int, *, reason: str | None = None) -> np.ndarray:
        """``n`` new channel ids, optionally fixed from the start (``reason``)."""
        start = len(self._parent)
        ids = np.arange(start, start + n, dtype=np.int64)
        self._parent.extend(range(start, start + n))
        if reason is not None:
            for i in ids.tolist():
                self._reason[i] = reason
        return ids

    def find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie channel ``a[k]`` to ``b[k]`` for every k (same length)."""
        if a is b or np.array_equal(a, b):
            return
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if rx > ry:
                rx, ry = ry, rx
            self._parent[ry] = rx
            if rx not in self._reason and ry in self._reason:
                self._reason[rx] = self._reason[ry]

    def fix(self, ids: Iterable[int] | np.ndarray, reason: str) -> None:
        """Never remove these channels; keep the first reason given."""
        for i in np.unique(np.asarray(ids, dtype=np.int64)).tolist():
            self._reason.setdefault(self.find(i), reason)

    # --- layouts -------------------------------------------------------------------------------

    def layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.layouts.get(value)

    def set_layout(self, value: ir.Value, layout: Layout) -> None:
        self.layouts[value] = layout

    def fix_value(self, value: ir.Value | None, reason: str) -> None:
        layout = self.layout(value)
        if layout is not None:
            self.fix(layout.ids, reason)

    def fix_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            self.fix_value(value, reason)

    def tracked_inputs(self, node: ir.Node) -> list[ir.Value]:
        return [v for v in node.inputs if v is not None and v in self.layouts]

    def add_producer(self, node: ir.Node, weight_index: int, weight_axis: int, value: ir.Value, n: int,
                     axis: int, rank: int) -> np.ndarray:
        """Fresh ids for a layer's ``n`` output channels (on ``axis`` of ``value``); records the weight slice edit."""
        ids = self.fresh(n)
        self.producers.append(Producer(node, weight_index, weight_axis, value, ids))
        self.edits.append(SliceInput(node, weight_index, weight_axis, value))
        self.set_layout(value, Layout(axis, rank, ids))
        return ids

    def add_producer_ids(self, node: ir.Node, weight_index: int, weight_axis: int, value: ir.Value, ids: np.ndarray) -> None:
        """Record a layer whose output channels carry ``ids`` (fresh ones, possibly repeated: a grouped Conv)."""
        self.producers.append(Producer(node, weight_index, weight_axis, value, ids))
        self.edits.append(SliceInput(node, weight_index, weight_axis, value))

    def add_consumer(self, node: ir.Node, data_index: int, weight_index: int, weight_axis: int, kind: str) -> None:
        value = node.inputs[data_index]
        assert value is not None
        self.consumers.append(Consumer(node, data_index, weight_index, weight_axis, value, kind))
        self.edits.append(SliceInput(node, weight_index, weight_axis, value))

    # --- after discovery -----------------------------------------------------------------------

    def finish(self) -> None:
        """Fix what leaves the graph or enters subgraphs, then freeze the union-find into a root table."""
        graph = self.model.graph
        for value in graph.outputs:
            self.fix_value(value, "reaches a graph output (its shape is part of the model's interface)")
        for value in list(self.layouts):
            for user, _ in value.uses():
                if user.graph is not graph:
                    self.fix_value(value, f"read inside a subgraph of {user.op_type} {user.name}")
        self._root = np.array([self.find(i) for i in range(len(self._parent))], dtype=np.int64)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        assert self._root is not None, "call finish() first"
        return self._root[ids]

    @property
    def num_ids(self) -> int:
        return len(self._parent)

    def groups(self, *, exclude: Sequence[str] = (), protect: Sequence[str] = ()) -> list[Group]:
        """Channels that appear in exactly the same tensors, as groups (after :meth:`finish`).

        ``exclude`` holds node-name globs and ``protect`` node names: a group
        that touches such a node keeps all its channels.
        """
        assert self._root is not None, "call finish() first"
        n = self.num_ids
        # A random 64-bit key per tensor; a channel's signature is the sum of the keys of the
        # tensors it appears in, so equal signatures mean (with overwhelming probability) equal sets.
        rng = np.random.default_rng(12345)
        signature = np.zeros(n, dtype=np.uint64)
        seen = np.zeros(n, dtype=bool)
        for layout in self.layouts.values():
            uniq = np.unique(self._root[layout.ids])
            key = rng.integers(1, 2**63 - 1, dtype=np.int64).astype(np.uint64)
            signature[uniq] += key
            seen[uniq] = True
        roots = np.nonzero(seen)[0]
        order = np.argsort(signature[roots], kind="stable")
        roots = roots[order]
        sigs = signature[roots]
        bounds = np.nonzero(np.diff(sigs))[0] + 1
        members_of_producer = [self._root[p.ids] for p in self.producers]
        consumer_roots = [np.unique(self._root[self.layouts[c.value].ids]) for c in self.consumers]
        groups: list[Group] = []
        order_key: list[int] = []
        for part in np.split(roots, bounds):
            part_set = set(part.tolist())
            producers = [p for p, r in zip(self.producers, members_of_producer) if part_set.intersection(r.tolist())]
            if not producers:
                continue  # channels of untracked tensors (a Concat's fixed segments): nothing to prune
            consumers = [c for c, r in zip(self.consumers, consumer_roots) if part_set.intersection(r.tolist())]
            reasons = [self._reason.get(r) for r in part.tolist()]
            free = np.array([r for r, why in zip(part.tolist(), reasons) if why is None], dtype=np.int64)
            fixed = np.array([r for r, why in zip(part.tolist(), reasons) if why is not None], dtype=np.int64)
            reason = next((why for why in reasons if why is not None), None)
            touched = [p.node for p in producers] + [c.node for c in consumers]
            names = [nd.name or "" for nd in touched]
            pattern = next((pat for pat in exclude for nm in names if fnmatch.fnmatchcase(nm, pat)), None)
            if pattern is not None or any(nm in protect for nm in names):
                reason = f"excluded by prune.exclude={pattern}" if pattern is not None else "first/last layer kept (prune.keep_first_last)"
                fixed = np.concatenate([fixed, free])
                free = np.zeros(0, dtype=np.int64)
            width = max(1, int(np.isin(self._root[producers[0].ids], part).sum()) // len(part))
            key = "+".join(sorted(p.node.name or "" for p in producers))
            first = producers[0].node.name or producers[0].node.op_type
            name = first if len(producers) == 1 else f"{first} (+{len(producers) - 1} tied)"
            first_position = int(np.nonzero(np.isin(self._root[producers[0].ids], part))[0].min())
            groups.append(Group(key, name, free, fixed, producers, consumers, reason, width))
            order_key.append(first_position)
        # several groups with the same layers (the halves of a Split) are told apart by position, stably across rounds
        by_key: dict[str, list[tuple[int, Group]]] = {}
        for g, pos in zip(groups, order_key):
            by_key.setdefault(g.key, []).append((pos, g))
        for key, members in by_key.items():
            if len(members) > 1:
                for i, (_, g) in enumerate(sorted(members, key=lambda m: m[0])):
                    g.key = f"{key}#{i}"
                    g.name = f"{g.name} [part {i + 1}/{len(members)}]"
        position = {id(node): i for i, node in enumerate(self.model.graph)}
        groups.sort(key=lambda g: (position.get(id(g.producers[0].node), 0), g.key))
        return groups
