"""fold: lossless graph clean-up (constant folding, BatchNorm into Conv/Gemm, dead nodes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxopt import Pass, PassContext, PassResult, hookimpl, option
from onnxopt.graph import (
    Names,
    add_initializer,
    attribute,
    cleanup,
    constant_array,
    is_onnx_op,
    iter_graphs,
    only_consumer,
    replace_input_weight,
    reroute,
)
from onnxopt.gs_bridge import bridgeable, from_gs, to_gs

__all__ = ["FoldConfig", "FoldPass", "fold_batchnorms"]


@dataclass(frozen=True)
class FoldConfig:
    """Keys of the fold pass."""

    constants: bool = option(True, "fold subgraphs whose inputs are all constants (ONNX Runtime evaluates them)")
    batchnorm: bool = option(True, "fold BatchNormalization into the Conv/ConvTranspose/Gemm before it")
    identities: bool = option(True, "remove Identity nodes")
    max_folded_elements: int = option(4_000_000, "do not fold a constant larger than this (keeps files small)", unit="elements")


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """BatchNorm in inference mode as y = s*x + t per channel, or None when it is not foldable."""
    if len(bn.inputs) < 5 or attribute(bn, "training_mode", 0):
        return None
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return None
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    scale, bias, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    s = scale / np.sqrt(var + float(attribute(bn, "epsilon", 1e-5)))
    return s, bias - mean * s


def _fold_into_conv(node: ir.Node, s: np.ndarray, t: np.ndarray, names: Names) -> bool:
    w = constant_array(node.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return False
    group = int(attribute(node, "group", 1))
    if node.op_type == "Conv":
        if w.shape[0] != s.shape[0]:
            return False
        new_w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    else:  # ConvTranspose: W is [Cin, Cout/group, k...]
        if group != 1 or w.shape[1] != s.shape[0]:
            return False
        new_w = w * s.reshape(1, -1, *([1] * (w.ndim - 2)))
    b = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(s.shape[0])
    if b is None:
        return False
    replace_input_weight(node, 1, new_w.astype(w.dtype), names)
    new_b = (b.astype(np.float64) * s + t).astype(w.dtype)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        replace_input_weight(node, 2, new_b, names)
    else:
        graph = node.graph
        assert graph is not None
        bias = add_initializer(graph, new_b, names.fresh(f"{node.name or node.op_type}_bias"))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
    return True


def _fold_into_gemm(node: ir.Node, s: np.ndarray, t: np.ndarray, names: Names) -> bool:
    w = constant_array(node.inputs[1])
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return False
    trans_b = int(attribute(node, "transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != s.shape[0]:
        return False
    new_w = w * (s[:, None] if trans_b else s[None, :])
    beta = float(attribute(node, "beta", 1.0))
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    c = constant_array(node.inputs[2]) if has_c else None
    if has_c and c is None:
        return False
    if has_c and beta != 0.0:
        # Y = alpha*A*B + beta*C, so BN(Y) keeps beta: C' = C*s + t/beta
        new_c = c.astype(np.float64) * s + t / beta  # type: ignore[union-attr]
    else:
        new_c = t
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    replace_input_weight(node, 1, new_w.astype(w.dtype), names)
    if has_c:
        replace_input_weight(node, 2, new_c.astype(w.dtype), names)
    else:
        graph = node.graph
        assert graph is not None
        bias = add_initializer(graph, new_c.astype(w.dtype), names.fresh(f"{node.name or 'Gemm'}_bias"))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
    return True


_BN_TARGETS: dict[str, Callable[[ir.Node, np.ndarray, np.ndarray, Names], bool]] = {
    "Conv": _fold_into_conv,
    "ConvTranspose": _fold_into_conv,
    "Gemm": _fold_into_gemm,
}


def fold_batchnorms(model: ir.Model) -> int:
    """Fold every foldable BatchNormalization into its producer; return how many were folded."""
    names = Names(model)
    folded = 0
    for graph in iter_graphs(model):
        for bn in [n for n in graph if is_onnx_op(n, "BatchNormalization")]:
            x = bn.inputs[0]
            producer = x.producer() if x is not None else None
            if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in _BN_TARGETS:
                continue
            if only_consumer(x) is not bn or producer.graph is not graph:
                continue
            affine = _bn_affine(bn)
            if affine is None or not _BN_TARGETS[producer.op_type](producer, *affine, names):
                continue
            reroute(bn.outputs[0], x)
            graph.remove(bn, safe=True)
            folded += 1
    return folded


def _fold_constants(model: ir.Model, limit: int) -> tuple[ir.Model, str | None]:
    if not bridgeable(model):
        return model, "constant folding skipped: model over 2 GB"
    try:
        graph = to_gs(model)
        graph.fold_constants(fold_shapes=True, recurse_subgraphs=True, error_ok=True, size_threshold=limit * 4)
        graph.cleanup(remove_unused_graph_inputs=False)
        return from_gs(graph, model), None
    except Exception as err:  # onnx-graphsurgeon/ORT cannot evaluate some graphs; folding is optional
        return model, f"constant folding skipped: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


class _IdentityElimination(ir_passes.IdentityEliminationPass):
    """onnx-ir's Identity elimination, minus the cases where it renames a value it does not own.

    Eliminating ``y = Identity(x)`` with ``y`` a graph output renames ``x`` to ``y``: when ``x`` is a
    graph output too, an output disappears (the model's interface changes; in a Scan body the same
    value listed twice makes ONNX Runtime compute wrong results), and when ``x`` comes from an outer
    graph, the outer graph's value is renamed. Those Identity nodes stay.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and len(node.outputs) == 1:
            x, y = node.inputs[0], node.outputs[0]
            if x is not None and y.is_graph_output() and (x.is_graph_output() or x.graph is not node.graph):
                return False
        return super()._try_eliminate_identity_node(node)


class FoldPass(Pass[FoldConfig]):
    """Lossless clean-up: constant folding, BatchNorm folded into Conv/Gemm, dead nodes removed."""

    name = "fold"
    Config = FoldConfig
    lossless = True
    search_base = True  # BatchNorm folding helps every later pass: every search candidate starts with it

    def run(self, model: ir.Model, config: FoldConfig, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        before = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        if config.constants:
            model, note = _fold_constants(model, config.max_folded_elements)
            if note:
                report.notes.append(note)
        folded = fold_batchnorms(model) if config.batchnorm else 0
        if config.identities:
            _IdentityElimination()(model)
        cleanup(model)
        after = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        report.figures = {"nodes_before": before, "nodes_after": after, "batchnorms_folded": folded}
        report.summary = f"{before} -> {after} nodes, {folded} BatchNorm folded"
        return PassResult(model, after != before or folded > 0, report)


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(FoldPass)
