"""Does the int8 model pay? Paired latency of a candidate against a reference, and the regions worth timing.

All timing goes through :func:`latency_ratio`, a thin call of
:mod:`onnxopt.timing` (paired, interleaved, order-alternated runs until the
ratio's 95% interval is within ±3% or a time cap), so the guard reads the
same kind of figure as validate and search.

Regions: every quantized node that is not a Conv/MatMul/Gemm anchor
belongs to a *kind* (the op types of its connected group of quantized
followers: HardSwish expansions, squeeze-excite gates, residual Adds, ...).
The guard in the quant pass returns one kind at a time to float and keeps
the change when the paired ratio says it is faster; the report lists what
was tried. Then it tries single *islands* (:func:`quantized_islands`): the
connected groups of quantized nodes, anchors included, that are still
integer, smallest first. One island can cost more in Q/DQ transitions than
its integer kernels win while another of the same kind pays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.sessions import SessionFactory
from onnxopt.timing import TimingConfig, compare_latency

__all__ = ["Ratio", "latency_ratio", "region_kinds", "quantized_islands"]


@dataclass(frozen=True)
class Ratio:
    """candidate / reference latency: the median paired ratio and its 95% interval."""

    median: float
    low: float
    high: float
    rounds: int

    def to_dict(self) -> dict[str, float | int]:
        # unrounded: the guard decides on ``high < 1.0``, and a bound of 0.99996 must not be recorded as 1.0
        return {"median": self.median, "low": self.low, "high": self.high, "rounds": self.rounds}


#: seconds one comparison of the guard may take at most (it runs once per region kind, plus once at the end)
GUARD_TIME_BUDGET = 3.0


def latency_ratio(candidate: ir.Model, reference: ir.Model, feed: Mapping[str, np.ndarray], sessions: SessionFactory,
                  *, rounds: int = 7) -> Ratio:
    """Paired, interleaved latency ratio of ``candidate`` over ``reference`` on one feed (onnxopt.timing)."""
    cand, ref = sessions.create(candidate), sessions.create(reference)
    measured = compare_latency(ref, cand, feed, TimingConfig(repeat=rounds, time_budget=GUARD_TIME_BUDGET,
                                                             threads=sessions.threads))
    return Ratio(measured.ratio, measured.low, measured.high, measured.pairs)


def _source(value: ir.Value | None) -> ir.Node | None:
    """The node computing ``value``, looking through the Q/DQ pair (and a folded Relu/Clip) inserted after it."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear", "Relu", "Clip") and node.inputs \
            and node.inputs[0] is not None and node.inputs[0].producer() is not None:
        node = node.inputs[0].producer()
    return node


def region_kinds(nodes: Iterable[ir.Node], expansions: Mapping[str, list[str]],
                 anchors: frozenset[str] = frozenset({"Conv", "MatMul", "Gemm"})) -> dict[str, list[str]]:
    """Kinds of quantized regions the speed guard may return to float, each as the node names it covers.

    - ``HardSwish`` (and the other expanded activations): every expansion made by
      :func:`~onnxopt_passes.quant.rewrites.expand_activations` that is quantized;
    - ``Conv+HardSwish``: the same with the anchor that feeds each expansion (float ONNX Runtime fuses
      the activation into that Conv, so the pair may be cheaper in float than both in integer);
    - the other quantized non-anchor nodes, by connected region (linked through the Relu/Clip folded
      into a kernel), named by their sorted op types (``Add``, ``GlobalAveragePool+Mul``, ...).
    """
    quantized = {n.name: n for n in nodes if n.name}
    kinds: dict[str, list[str]] = {}
    in_expansion: set[str] = set()
    for key, members in expansions.items():
        names = [m for m in members if m in quantized]
        if not names:
            continue
        op = {"hswish": "HardSwish", "hsig": "HardSigmoid", "swish": "Swish", "gelu": "Gelu"}.get(key.rpartition("__qexp_")[2], "activation")
        in_expansion.update(names)
        kinds.setdefault(op, []).extend(names)
        feeders = {_source(v) for m in names for v in quantized[m].inputs}
        with_anchor = [f.name for f in feeders if f is not None and f.name in quantized and f.op_type in anchors]
        if with_anchor:
            kinds.setdefault(f"{quantized[with_anchor[0]].op_type}+{op}", []).extend([*with_anchor, *names])
    members = {id(n): n for n in quantized.values() if n.op_type not in anchors and n.name not in in_expansion}

    def producer_of(value: ir.Value | None) -> ir.Node | None:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type in ("Relu", "Clip") and producer.inputs and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer() if id(producer) not in members else producer
        return producer

    for group in _connected(members, producer_of):
        kind = "+".join(sorted({n.op_type for n in group}))
        kinds.setdefault(kind, []).extend(n.name or "" for n in group)
    return {k: list(dict.fromkeys(v)) for k, v in kinds.items()}


def quantized_islands(nodes: Iterable[ir.Node]) -> list[list[str]]:
    """The connected groups of ``nodes`` (quantized, in the QDQ model), linked where one reads another's output
    through the Q/DQ pair (and a folded Relu/Clip) between them; as node names, smallest group first."""
    members = {id(n): n for n in nodes if n.name}
    groups = [[n.name or "" for n in group] for group in _connected(members, _source)]
    return sorted(groups, key=lambda g: (len(g), g[0]))


def _connected(members: dict[int, ir.Node], producer_of: Callable[[ir.Value | None], ir.Node | None]) -> list[list[ir.Node]]:
    """``members`` (id -> node) in connected groups (union-find), a node joined to ``producer_of`` each input
    when that producer is a member too; groups and their nodes in ``members``' order."""
    parent = {k: k for k in members}

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for key, node in members.items():
        for value in node.inputs:
            producer = producer_of(value)
            if producer is not None and id(producer) in members:
                parent[root(id(producer))] = root(key)
    groups: dict[int, list[ir.Node]] = {}
    for key, node in members.items():
        groups.setdefault(root(key), []).append(node)
    return list(groups.values())
