"""`onnxopt inspect`: what a model is made of, without changing it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.data import input_specs
from onnxopt.io import load_model
from onnxopt.measure import MacsResult, WeightStorage, count_macs, count_parameters, file_size, op_histogram, weight_storage

__all__ = ["ModelInfo", "inspect_model"]


@dataclass
class ModelInfo:
    """Opsets, inputs/outputs, op histogram, parameters, MACs and where the weights live."""

    path: str
    size_bytes: int
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: list[str]
    outputs: list[str]
    ops: dict[str, int]
    nodes: int
    parameters: int
    weights: WeightStorage
    macs: MacsResult
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["weights"] = self.weights.to_dict()
        d["macs"] = self.macs.to_dict()
        return d


def _describe_value(value: Any) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    dims = "?" if value.shape is None else "x".join(str(d) for d in value.shape.dims)
    return f"{value.name}: {dtype} [{dims}]"


def inspect_model(path: str | os.PathLike[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> ModelInfo:
    """Describe the model at ``path``; MACs at ``shapes`` (free dims: batch 1, others a default)."""
    raw = load_model(path, normalize=False)
    storage = weight_storage(raw)
    model = load_model(path)
    macs = count_macs(model, shapes)
    specs = {s.name for s in input_specs(model)}
    return ModelInfo(
        path=str(path),
        size_bytes=file_size(path),
        ir_version=model.ir_version,
        opsets={k or "ai.onnx": int(v) for k, v in model.opset_imports.items()},
        producer=f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        inputs=[_describe_value(v) for v in model.graph.inputs if v.name in specs],
        outputs=[_describe_value(v) for v in model.graph.outputs],
        ops=op_histogram(raw),
        nodes=sum(op_histogram(raw).values()),
        parameters=count_parameters(model),
        weights=storage,
        macs=macs,
        notes=list(model.meta.get("onnxopt.load_notes", [])),
    )
