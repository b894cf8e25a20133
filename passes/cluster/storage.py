"""How clustered weights are stored: their rows layout, bit-packed indices, and the in-graph decode.

``packed`` mode keeps a codebook ([k] per tensor, [C, k] per channel) and
one index per weight, packed ``8 // bits`` to a byte (element i of a byte in
bits ``[i·bits, (i+1)·bits)``, as ONNX packs int4). The graph unpacks them
with standard ops only, so stock ONNX Runtime runs the model and, all inputs
being constants, folds the decode into a plain weight at session start:

    packed[m, 1] -BitShift(left, per-field amounts)-> [m, 8/bits] -BitShift(right, 8 - bits)->
    (Reshape, Slice the padding) -> Reshape -> Cast(int32) -> Gather(codebook)          per tensor
                                                          -> GatherElements(codebook, axis 1)
                                                             -> Reshape (-> Transpose)  per channel

A left shift of a uint8 drops the bits above the field, the right shift
brings the field down: no masks, only BitShift (opset 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.graph import Names, add_initializer, make_node

__all__ = [
    "INDEX_BITS",
    "DECODE_OPSET",
    "index_bits",
    "pack_indices",
    "unpack_indices",
    "as_rows",
    "from_rows",
    "Decoder",
]

#: Index widths: a byte holds 8 // bits indices.
INDEX_BITS = (1, 2, 4, 8)
#: BitShift and GatherElements need opset 11.
DECODE_OPSET = 11


def index_bits(k: int) -> int:
    """The narrowest index width that numbers ``k`` centroids."""
    return next(b for b in INDEX_BITS if (1 << b) >= k)


def pack_indices(labels: np.ndarray, bits: int) -> np.ndarray:
    """Indices (uint8, flat, each < 2**bits) packed ``8 // bits`` per byte, as [bytes, 1] (zero-padded at the end)."""
    per = 8 // bits
    flat = labels.reshape(-1).astype(np.uint8)
    if per == 1:
        return flat.copy()
    padded = np.zeros(-(-flat.size // per) * per, np.uint8)
    padded[: flat.size] = flat
    fields = padded.reshape(-1, per) << (np.arange(per, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(fields, axis=1).astype(np.uint8).reshape(-1, 1)


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_indices` in numpy: ``count`` indices as flat uint8."""
    per = 8 // bits
    if per == 1:
        return packed.reshape(-1)[:count].copy()
    shifts = np.arange(per, dtype=np.uint8) * bits
    return ((packed.reshape(-1, 1) >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:count]


def as_rows(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """The weight as [1, n] (per tensor) or [C, n/C] with one row per index of ``axis`` (a view when possible)."""
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)


def from_rows(rows: np.ndarray, shape: Sequence[int], axis: int | None) -> np.ndarray:
    """The inverse of :func:`as_rows`."""
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved), 0, axis))


@dataclass
class Decoder:
    """Writes packed weights into one graph: codebook and index initializers plus the nodes decoding them.

    Small constants (shift amounts, shapes) are shared by every weight of the
    graph. The decode nodes are unnamed and their outputs get short names
    (``<weight>.lift``, ...): ORT folds them away at session start, and on a
    small model every byte of graph counts against the packed file.
    """

    graph: ir.Graph
    names: Names
    _constants: dict[tuple[object, ...], ir.Value] = field(default_factory=dict)

    def _constant(self, array: np.ndarray, hint: str) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = add_initializer(self.graph, array, self.names.fresh(hint))
        return self._constants[key]

    def _node(self, op: str, inputs: list[ir.Value], hint: str, **attributes: object) -> ir.Node:
        return make_node(op, inputs, attributes, names=self.names, name_hint=hint)

    def decode(self, name: str, codebook: np.ndarray, indices: np.ndarray, bits: int, shape: Sequence[int],
               axis: int | None, dtype: np.dtype,
               scale: np.ndarray | None = None) -> tuple[list[ir.Node], ir.Value]:
        """Initializers for ``codebook`` ([1, k] or [C, k]) and ``indices`` (the labels as rows, uint8), and the
        nodes rebuilding the weight of ``shape`` and ``dtype``; returns the nodes (in order) and their output.
        With ``scale`` ([rows, 1] float16) the codebook holds int8 codes of ``code * scale`` (in float32)."""
        rows, count = indices.shape
        per_channel = axis is not None
        target = (rows, count) if per_channel else tuple(shape)
        nodes: list[ir.Node] = []

        def add(node: ir.Node) -> ir.Value:
            nodes.append(node)
            return node.outputs[0]

        packed = pack_indices(indices, bits)
        if bits == 8:
            index = add_initializer(self.graph, packed.reshape(target), self.names.fresh(f"{name}.indices"))
        else:
            per = 8 // bits
            stored = add_initializer(self.graph, packed, self.names.fresh(f"{name}.indices"))
            lift = self._constant((8 - (np.arange(per) + 1) * bits).astype(np.uint8), f"cluster.shift{bits}")
            drop = self._constant(np.array([8 - bits], np.uint8), f"cluster.down{bits}")
            index = add(self._node("BitShift", [stored, lift], f"{name}.lift", direction="LEFT"))
            index = add(self._node("BitShift", [index, drop], f"{name}.bits", direction="RIGHT"))
            if packed.size * per != rows * count:  # the last byte is padded: drop the extra fields
                index = add(self._node("Reshape", [index, self._constant(np.array([-1], np.int64), "cluster.flat")],
                                       f"{name}.flat"))
                index = add(self._node("Slice", [index, self._constant(np.array([0], np.int64), "cluster.zero"),
                                                 self._constant(np.array([rows * count], np.int64), f"{name}.size")],
                                       f"{name}.trim"))
            index = add(self._node("Reshape", [index, self._constant(np.array(target, np.int64), f"{name}.shape")],
                                   f"{name}.idx"))
        index = add(self._node("Cast", [index], f"{name}.i32", to=int(ir.DataType.INT32)))
        table = add_initializer(self.graph, codebook if per_channel else codebook.reshape(-1),
                                self.names.fresh(f"{name}.codebook"))
        if scale is not None:
            stored = add_initializer(self.graph, scale if per_channel else scale.reshape(-1),
                                     self.names.fresh(f"{name}.scale"))
            table = add(self._node("Cast", [table], f"{name}.codes", to=int(ir.DataType.FLOAT)))
            factor = add(self._node("Cast", [stored], f"{name}.step", to=int(ir.DataType.FLOAT)))
            table = add(self._node("Mul", [table, factor], f"{name}.levels"))
            if dtype != np.float32:
                table = add(self._node("Cast", [table], f"{name}.values", to=int(ir.DataType.from_numpy(dtype))))
        elif codebook.dtype != dtype:
            table = add(self._node("Cast", [table], f"{name}.values", to=int(ir.DataType.from_numpy(dtype))))
        if not per_channel:
            out = add(self._node("Gather", [table, index], f"{name}.decoded"))
        else:
            out = add(self._node("GatherElements", [table, index], f"{name}.decoded", axis=1))
            moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
            out = add(self._node("Reshape", [out, self._constant(np.array(moved, np.int64), f"{name}.wshape")],
                                 f"{name}.w"))
            if axis != 0:
                perm = [*range(1, axis + 1), 0, *range(axis + 1, len(shape))]
                out = add(self._node("Transpose", [out], f"{name}.t", perm=perm))
        out.type = ir.TensorType(ir.DataType.from_numpy(dtype))
        out.shape = ir.Shape(list(shape))
        return nodes, out
