"""Parameters and MACs a pruning plan would leave, computed from the edits without touching the graph.

A Conv, Gemm or MatMul with a constant weight costs (positions it is applied
at) x (weight elements), so its MACs shrink exactly as its weight does; an
attention MatMul shrinks with the heads it keeps. Parameters shrink with
every sliced tensor. This lets distribution try many plans cheaply.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, is_onnx_op
from onnxopt.measure import count_macs, count_parameters

from .groups import ChannelGraph, SliceInput

__all__ = ["CostModel"]

_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


class CostModel:
    """Params and MACs of the model as functions of which channel roots are kept."""

    def __init__(self, model: ir.Model, cg: ChannelGraph, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.cg = cg
        self.params = count_parameters(model)
        macs = count_macs(model, shapes)
        self.macs = macs.total
        by_node = macs.by_node
        sliced: dict[tuple[ir.Node, int], dict[int, tuple[ir.Value, int]]] = defaultdict(dict)
        for edit in cg.edits:
            if isinstance(edit, SliceInput):
                sliced[(edit.node, edit.index)].setdefault(edit.axis, (edit.value, edit.blocks))
        # (shape, {axis: (value, blocks)}, counts toward params, MACs per weight element or 0)
        self._tensors: list[tuple[tuple[int, ...], dict[int, tuple[ir.Value, int]], bool, float]] = []
        for (node, index), axes in sliced.items():
            value = node.inputs[index]
            array = constant_array(value)
            if array is None or value is None or value.const_value is None:
                continue
            is_param = value.const_value.dtype not in _INT_TYPES
            per_element = 0.0
            if index == 1 and is_onnx_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul"):
                per_element = by_node.get(node.name or "", 0) / max(array.size, 1)
            self._tensors.append((array.shape, axes, is_param, per_element))
        # attention MatMuls: both operands computed; MACs scale with the kept share of their tracked axes
        self._dynamic: list[tuple[float, list[ir.Value]]] = []
        for node in model.graph:
            if not is_onnx_op(node, "MatMul") or any(constant_array(v) is not None for v in node.inputs):
                continue
            tracked = [v for v in (node.outputs[0], node.inputs[0]) if v in cg.layouts]
            if tracked and node.name in by_node:
                # the contracted axis of A counts only when it is A's tracked axis and the output is untracked
                self._dynamic.append((float(by_node[node.name]), tracked[:1] if node.outputs[0] in cg.layouts else tracked))

    def evaluate(self, keep: np.ndarray) -> tuple[int, int]:
        """(parameters, MACs) once the channels whose root is False in ``keep`` are removed."""
        counts: dict[ir.Value, tuple[int, int]] = {}

        def kept(value: ir.Value) -> tuple[int, int]:
            if value not in counts:
                ids = self.cg.layouts[value].ids
                counts[value] = (int(keep[self.cg.roots(ids)].sum()), len(ids))
            return counts[value]

        params, macs = float(self.params), float(self.macs)
        for shape, axes, is_param, per_element in self._tensors:
            new_shape = list(shape)
            for axis, (value, blocks) in axes.items():
                new_shape[axis] = kept(value)[0] // blocks
            delta = float(np.prod(new_shape, dtype=np.float64) - np.prod(shape, dtype=np.float64))
            if is_param:
                params += delta
            macs += delta * per_element
        for base, values in self._dynamic:
            share = 1.0
            for value in values:
                k, n = kept(value)
                share *= k / max(n, 1)
            macs -= base * (1.0 - share)
        return int(round(params)), int(round(macs))
