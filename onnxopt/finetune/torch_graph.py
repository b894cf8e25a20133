"""An ONNX graph as a torch module whose weights train, and the trained weights written back into the graph.

The module runs the graph's nodes in order with the functions of
:mod:`onnxopt.finetune.torch_ops`; chosen float32 initializers become
torch parameters, every other initializer is a constant. Because the
module keeps the initializers' names, writing back is exact: the same graph
with new tensors under the same names (:func:`with_weights`).

Which weights train is data (:data:`TRAINABLE_SLOTS`): an initializer trains
when every node reading it reads it in a weight slot (a Conv's filters and
bias, a Gemm's matrices, a BatchNorm's scale and shift...). BatchNorm running
statistics are not trained but re-estimated while the module runs on batch
statistics (:data:`STATISTIC_SLOTS`); Clip bounds, shapes and scalars stay
fixed, so the graph computes the same function family, only with new values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from onnxopt.errors import OnnxoptError
from onnxopt.finetune.torch_ops import OPS, OpCall, OpFn, RunMode
from onnxopt.graph import DEFAULT_DOMAINS, graph_input_values, opset_version

__all__ = ["TRAINABLE_SLOTS", "STATISTIC_SLOTS", "OnnxModule", "trainable_initializers", "statistic_initializers",
           "with_weights"]

#: Op type -> input positions that hold trainable weights.
TRAINABLE_SLOTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}),
    "ConvTranspose": frozenset({1, 2}),
    "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}),
    "Einsum": frozenset(range(8)),
    "Add": frozenset({0, 1}),
    "Sub": frozenset({0, 1}),
    "Mul": frozenset({0, 1}),
    "BatchNormalization": frozenset({1, 2}),  # scale and shift; running mean and variance stay
    "InstanceNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}),
    "PRelu": frozenset({1}),
    "Gather": frozenset({0}),  # embedding tables
}


#: Op type -> input positions that hold running statistics (re-estimated when training with batch statistics).
STATISTIC_SLOTS: dict[str, frozenset[int]] = {
    "BatchNormalization": frozenset({3, 4}),
}


def _read_only_in(model: ir.Model, slots: Mapping[str, frozenset[int]]) -> list[str]:
    """Float32 initializers of the main graph, with more than one element, that every reader reads in ``slots``."""
    names = []
    for name, value in model.graph.initializers.items():
        if value.dtype != ir.DataType.FLOAT or value.const_value is None or value.const_value.size <= 1:
            continue
        uses = list(value.uses())
        if uses and not value.is_graph_output() and all(
            node.domain in DEFAULT_DOMAINS and index in slots.get(node.op_type, ()) for node, index in uses
        ):
            names.append(name)
    return names


def trainable_initializers(model: ir.Model) -> list[str]:
    """Initializers that train: float32, more than one element, read only in weight slots."""
    return _read_only_in(model, TRAINABLE_SLOTS)


def statistic_initializers(model: ir.Model) -> list[str]:
    """Initializers holding running statistics (BatchNorm mean and variance)."""
    return _read_only_in(model, STATISTIC_SLOTS)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind == "V" or array.dtype.name == "bfloat16":  # ml_dtypes types torch cannot read
        array = array.astype(np.float32)
    return torch.from_numpy(np.array(array))  # a copy: the model's buffers may be read-only or memory-mapped


def _attributes(node: ir.Node) -> dict[str, object]:
    attrs: dict[str, object] = {}
    for name, attr in node.attributes.items():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise OnnxoptError(f"finetune cannot convert {node.op_type} node {node.name!r}: it holds a subgraph "
                               "(control flow)", "finetune trains graphs without If/Loop/Scan")
        if attr.type == ir.AttributeType.TENSOR:
            attrs[name] = _to_torch(attr.as_tensor().numpy())
        else:
            value = attr.value
            attrs[name] = list(value) if isinstance(value, (tuple, list)) else value
    return attrs


def _op(node: ir.Node) -> OpFn:
    fn = OPS.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
    if fn is None:
        op = f"{node.domain}.{node.op_type}" if node.domain not in DEFAULT_DOMAINS else node.op_type
        raise OnnxoptError(f"finetune has no torch conversion for op {op} (node {node.name!r})",
                           "fold or re-export the model without it; onnxopt.finetune.torch_ops.OPS lists the supported ops")
    return fn


@dataclass(frozen=True)
class _Step:
    fn: OpFn
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]
    call: OpCall


def _live_outputs(node: ir.Node) -> int:
    live = [i for i, v in enumerate(node.outputs) if v.uses() or v.is_graph_output()]
    return live[-1] + 1 if live else 1


class OnnxModule(torch.nn.Module):
    """An ONNX model's main graph run node by node in torch.

    ``trainable`` initializers are parameters; ``statistics`` initializers are
    running statistics, updated while ``mode.batch_statistics`` is on. Both are
    returned by :meth:`current_weights`; every other initializer is constant.
    """

    def __init__(self, model: ir.Model, trainable: Iterable[str], statistics: Iterable[str] = ()) -> None:
        super().__init__()
        graph = model.graph
        opset = opset_version(model)
        self.mode = RunMode()
        steps = []
        for node in graph:
            fn = _op(node)
            call = OpCall(_attributes(node), opset, node.name or "", node.op_type, _live_outputs(node), len(node.outputs),
                          self.mode)
            steps.append(_Step(fn, tuple(v.name if v is not None else None for v in node.inputs),
                               tuple(v.name or "" for v in node.outputs), call))
        self._steps = steps
        wanted = set(trainable)
        self.weights = torch.nn.ParameterList()
        self.weight_names: list[str] = []
        self._constants: dict[str, torch.Tensor] = {}
        self.statistic_names = [n for n in statistics if n in graph.initializers]
        for name, value in graph.initializers.items():
            array = value.const_value.numpy()  # type: ignore[union-attr]
            if name in wanted:
                self.weights.append(torch.nn.Parameter(_to_torch(array).float()))
                self.weight_names.append(name)
            else:
                self._constants[name] = _to_torch(array)
        self.input_names = [v.name for v in graph_input_values(graph)]
        self.output_names = [v.name for v in graph.outputs]

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """All graph outputs for ``feeds`` (graph input name -> tensor)."""
        env: dict[str, torch.Tensor] = dict(self._constants)
        env.update(zip(self.weight_names, self.weights))
        env.update(feeds)
        for step in self._steps:
            result = step.fn([env[n] if n else None for n in step.inputs], step.call)
            for name, value in zip(step.outputs, result if isinstance(result, tuple) else (result,)):
                if name:
                    env[name] = value
        return {n: env[n] for n in self.output_names}

    def current_weights(self) -> dict[str, np.ndarray]:
        """The current values of the trainable and statistics initializers, by initializer name."""
        weights = {name: p.detach().cpu().numpy().copy() for name, p in zip(self.weight_names, self.weights)}
        weights.update({name: self._constants[name].numpy().astype(np.float32) for name in self.statistic_names})
        return weights


def with_weights(model: ir.Model, weights: Mapping[str, np.ndarray]) -> ir.Model:
    """A clone of ``model`` whose initializers named in ``weights`` hold the new values (same dtype and shape)."""
    clone = model.clone()
    for name, array in weights.items():
        value = clone.graph.initializers[name]
        old = value.const_value
        assert old is not None and tuple(old.shape) == array.shape, f"shape of {name} changed"
        value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=old.dtype.numpy()), name=name)
    return clone
