"""onnxopt plugin: float16 weight storage (pass `fp16`) and a KL-divergence metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import Metric, Pass, PassContext, PassResult, PassSkipped, hookimpl, option
from onnxopt.graph import Names, add_initializer, cleanup, constant_array, iter_graphs, make_node

__all__ = ["Fp16Config", "Fp16WeightsPass", "kl_divergence"]

#: The ai.onnx opset imported for the Casts when a model imports none (Cast-13: float16 -> float)
CAST_OPSET = 13


@dataclass(frozen=True)
class Fp16Config:
    """Keys of the fp16 pass."""

    min_elements: int = option(256, "weights smaller than this stay float32 (casts cost more than they save)", unit="elements")

    def __post_init__(self) -> None:
        if self.min_elements < 1:
            raise ValueError("fp16.min_elements must be at least 1")


class Fp16WeightsPass(Pass[Fp16Config]):
    """Store float32 weights as float16 with an in-graph Cast back (half the file, same compute)."""

    name = "fp16"
    Config = Fp16Config
    # the corpus's weights are small: with the default threshold the pass would find little to convert there
    corpus_variants = ({"min_elements": 1},)

    def run(self, model: ir.Model, config: Fp16Config, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        names = Names(model)
        before = after = 0
        for graph in iter_graphs(model):
            for value in list(graph.initializers.values()):
                array = constant_array(value)
                if array is None or array.dtype != np.float32 or array.size < config.min_elements or not value.uses():
                    continue
                half = add_initializer(graph, array.astype(np.float16), names.fresh(f"{value.name}_fp16"))
                cast = make_node("Cast", [half], {"to": ir.DataType.FLOAT}, names=names, name_hint=f"{value.name}_cast")
                first_user = min((graph.index(node) for node, _ in value.uses() if node.graph is graph), default=None)
                if first_user is None:
                    continue
                graph.insert_before(graph.node(first_user), [cast])
                value.replace_all_uses_with(cast.outputs[0])
                err = float(np.max(np.abs(array - array.astype(np.float16).astype(np.float32))))
                report.items.append({"tensor": value.name, "elements": int(array.size), "max_abs_error": err})
                before += array.nbytes
                after += array.size * 2
        if not report.items:
            raise PassSkipped(f"no float32 weight has {config.min_elements} or more elements")
        # a graph of other domains' ops only (ai.onnx.preview.training) imports no ai.onnx opset for the Casts
        model.opset_imports.setdefault("", CAST_OPSET)
        cleanup(model)
        report.figures = {"tensors": len(report.items), "bytes_before": before, "bytes_after": after}
        report.summary = f"{len(report.items)} weights to float16: {before:,} -> {after:,} bytes"
        return PassResult(model, True, report)


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Mean KL(softmax(reference) || softmax(candidate)) over samples, for score outputs."""
    if reference.ndim < 2 or reference.shape[-1] < 2 or not np.issubdtype(reference.dtype, np.floating):
        return None
    r = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    c = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    log_p = r - r.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = c - c.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(Fp16WeightsPass)


@hookimpl
def onnxopt_register_metrics(register: Callable[[Metric], None]) -> None:
    register(Metric("kl_divergence", kl_divergence, "compare", False, "KL(softmax(ref) || softmax(candidate)), mean per sample"))
