"""fold: lossless graph clean-up (constant folding, BatchNorm into Conv/Gemm, dead nodes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxopt import Pass, PassContext, PassResult, hookimpl, option
from onnxopt.errors import OnnxoptError
from onnxopt.graph import (
    Names,
    add_initializer,
    attribute,
    cleanup,
    constant_array,
    insert_before,
    is_onnx_op,
    iter_graphs,
    only_consumer,
    replace_input_weight,
    reroute,
)
from onnxopt.gs_bridge import bridgeable, from_gs, to_gs
from onnxopt.io import serialize_model, weights_as_inputs

__all__ = ["FoldConfig", "FoldPass", "fold_batchnorms", "fold_shapes"]


@dataclass(frozen=True)
class FoldConfig:
    """Keys of the fold pass."""

    constants: bool = option(True, "fold subgraphs whose inputs are all constants (ONNX Runtime evaluates them)")
    batchnorm: bool = option(True, "fold BatchNormalization into the Conv/ConvTranspose/Gemm before it")
    identities: bool = option(True, "remove Identity nodes")
    max_folded_elements: int = option(4_000_000, "do not fold a constant larger than this (keeps files small)", unit="elements")
    max_growth: float = option(1.5, "do not fold a node whose output (over 4 KiB) is more than this many times the bytes of "
                                    "its inputs: a packed or quantized weight stays packed (unpacking it is exact but undoes "
                                    "the compression); 0 folds regardless")

    def __post_init__(self) -> None:
        if self.max_growth < 0:
            raise OnnxoptError(f"fold.max_growth={self.max_growth} must be 0 (off) or a positive factor",
                               "e.g. --set fold.max_growth=1.5")


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


def _dims(value: ir.Value | None) -> list[int | None] | None:
    """The value's dims, None for a free one; None when its rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [int(d) if isinstance(d, int) and d >= 0 else None for d in value.shape.dims]


def _shape_of(node: ir.Node) -> list[int | None] | None:
    """What ``Shape(x, start, end)`` returns, dim by dim (None where free), by ONNX's own clamping rules."""
    dims = _dims(node.inputs[0] if node.inputs else None)
    if dims is None:
        return None
    rank = len(dims)
    start, end = int(attribute(node, "start", 0)), int(attribute(node, "end", rank))
    start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
    return dims[start:end]


def _slice_positions(n: int, node: ir.Node) -> list[int] | None:
    """Which positions of a 1-D tensor of length ``n`` ``Slice`` keeps (its constant inputs), by ONNX's clamping."""
    args = [constant_array(v) if v is not None else None for v in list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))]
    starts, ends, axes, steps = args[:4]
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if len(node.inputs) > 3 and node.inputs[3] is not None and (axes is None or int(axes.reshape(-1)[0]) not in (0, -1)):
        return None
    if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
        return None
    step = int(steps.reshape(-1)[0]) if steps is not None else 1
    if step == 0:
        return None
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return list(range(start, end, step))


def fold_shapes(model: ir.Model) -> int:
    """Replace shape computations whose result the declared shapes fix by Constant nodes; return how many.

    ``Shape`` (with its ``start``/``end``), ``Size``, and ``Gather``/``Slice``
    of a ``Shape`` (taking only its known dims out of a partly free shape).
    This stands in for onnx-graphsurgeon's shape folding, which ignores
    ``Shape``'s ``start``/``end`` and so folds the whole shape where a part
    was asked for.
    """
    folded = 0
    names = Names(model)
    for graph in iter_graphs(model):
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or not node.outputs or node.outputs[0].name is None:
                continue
            value: np.ndarray | None = None
            if node.op_type == "Shape" and len(node.inputs) == 1:
                dims = _shape_of(node)
                if dims is not None and all(d is not None for d in dims):
                    value = np.array(dims, np.int64)
            elif node.op_type == "Size" and len(node.inputs) == 1:
                dims = _dims(node.inputs[0])
                if dims is not None and all(d is not None for d in dims):
                    value = np.array(int(np.prod(dims, dtype=np.int64)), np.int64)
            elif node.op_type in ("Gather", "Slice") and node.inputs and node.inputs[0] is not None:
                source = node.inputs[0].producer()
                if source is None or not is_onnx_op(source, "Shape") or len(source.inputs) != 1:
                    continue
                dims = _shape_of(source)
                if dims is None:
                    continue
                if node.op_type == "Gather":
                    indices = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
                    if indices is None or int(attribute(node, "axis", 0)) not in (0, -1) or indices.dtype.kind not in "iu":
                        continue
                    if indices.size and (indices.min() < -len(dims) or indices.max() >= len(dims)):
                        continue  # out of range: the model is wrong there, ORT reports it at run time
                    picked = [dims[int(i)] for i in indices.reshape(-1)]
                    shape = indices.shape
                else:
                    positions = _slice_positions(len(dims), node)
                    if positions is None:
                        continue
                    picked = [dims[i] for i in positions]
                    shape = (len(picked),)
                if any(d is None for d in picked):
                    continue
                value = np.array(picked, np.int64).reshape(shape)
            if value is None:
                continue
            old = node.outputs[0]
            constant = ir.node("Constant", inputs=[], attributes={"value": ir.tensor(value)}, name=names.fresh(f"{node.name or node.op_type}_folded"))
            insert_before(node, [constant])
            constant.outputs[0].dtype, constant.outputs[0].shape = ir.DataType.INT64, ir.Shape(value.shape)
            constant.outputs[0].name = names.fresh(f"{old.name}_folded")
            reroute(old, constant.outputs[0])
            folded += 1
    return folded


#: Ops whose output is a random draw: folding one would freeze a single draw into the model.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"})


#: Outputs smaller than this may grow when folded (shape arithmetic, small tables): only weights are worth keeping packed.
GROWTH_FLOOR_BYTES = 4096


def _nbytes(tensor: Any) -> float | None:
    """Bytes of a graphsurgeon tensor from its values or its static shape and dtype, None when unknown."""
    if isinstance(tensor, gs.Constant):
        return float(tensor.values.nbytes)
    shape, dtype = getattr(tensor, "shape", None), getattr(tensor, "dtype", None)
    if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
        return None
    try:
        return float(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    except TypeError:
        return None


def _grows(node: Any, factor: float) -> bool:
    """True when the node's output is over GROWTH_FLOOR_BYTES and ``factor`` times its inputs' bytes (a decode)."""
    outs = [_nbytes(t) for t in node.outputs]
    ins = [_nbytes(t) for t in node.inputs if t is not None and getattr(t, "name", "")]
    if not outs or any(b is None for b in outs) or any(b is None for b in ins):
        return False
    out = sum(outs)  # type: ignore[arg-type]
    return out > GROWTH_FLOOR_BYTES and out > factor * sum(ins)  # type: ignore[arg-type]


def _never_fold(limit: int, growth: float = 0.0) -> Callable[[Any], bool]:
    """graphsurgeon's exclusion hook: random ops, Dropout, nodes whose output would exceed ``limit`` elements,
    and (``growth`` > 0) nodes that unpack their inputs into something ``growth`` times larger.

    graphsurgeon evaluates every foldable node before it applies its size
    threshold, so a 172-byte ConstantOfShape([1000, 1000000]) would make ONNX
    Runtime allocate 4 GB first: such nodes are never handed to it.
    """

    def exclude(node: Any) -> bool:
        if node.op in _RANDOM_OPS or node.op == "Dropout":
            return True
        if node.op == "ConstantOfShape" and node.inputs and isinstance(node.inputs[0], gs.Constant):
            return int(np.prod(node.inputs[0].values, dtype=np.float64)) > limit
        for out in node.outputs:
            shape = out.shape
            if shape is not None and all(isinstance(d, int) for d in shape) and np.prod(shape, dtype=np.float64) > limit:
                return True
        return growth > 0 and _grows(node, growth)

    return exclude


def _graph_only(model: ir.Model) -> bytes:
    return serialize_model(weights_as_inputs(model))


def _ort_load_error(proto: bytes) -> str | None:
    """Why ONNX Runtime refuses to load the graph (type and shape checks included), or None when it loads it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # its constant folding checks shapes too
    options.log_severity_level = 4
    try:
        ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        return " ".join(str(err).split())[:160]
    return None


def _invalid(folded: ir.Model, original: ir.Model) -> str | None:
    """What is wrong with a folded graph that was right with the original, or None.

    The ONNX checker, then ONNX Runtime's load-time checks: a value that
    became constant can let ORT's shape inference see, and reject, a shape
    the model never had to commit to (onnx's affine_grid tests feed Range a
    1-element tensor that way). Only the graphs cross, not the weights.
    """
    import onnx

    proto = _graph_only(folded)
    try:
        onnx.checker.check_model(onnx.load_from_string(proto))
    except Exception as err:
        return " ".join(str(err).split())[:160]
    problem = _ort_load_error(proto)
    if problem and _ort_load_error(_graph_only(original)) is None:
        return f"ONNX Runtime no longer loads it: {problem}"
    return None


def _fold_constants(model: ir.Model, limit: int, growth: float = 0.0) -> tuple[ir.Model, str | None]:
    if not bridgeable(model):
        return model, "constant folding skipped: model over 2 GB"
    try:
        work = model.clone()  # shares the tensors; the model stays as it was when the fold is given up
        fold_shapes(work)
        graph = to_gs(work)
        # shapes are folded exactly by fold_shapes beforehand: graphsurgeon's shape folding ignores Shape's start/end
        # flatten_subgraphs=False: graphsurgeon inlines an If with a constant condition by renaming the branch's
        # values and rebinding producers, which leaves dangling values when a branch output is an outer-scope value
        # or a constant, and nodes out of order with nested Ifs (onnx's affine_grid tests, a streaming audio model)
        graph.fold_constants(fold_shapes=False, recurse_subgraphs=True, error_ok=True, size_threshold=limit * 4,
                             flatten_subgraphs=False, should_exclude_node=_never_fold(limit, growth))
        graph.cleanup(remove_unused_graph_inputs=False)
        folded = from_gs(graph, work)
        cleanup(folded)
    except Exception as err:  # onnx-graphsurgeon/ORT cannot evaluate some graphs; folding is optional
        return model, f"constant folding skipped: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    problem = _invalid(folded, model)
    if problem:  # when in doubt, leave the nodes: a fold that breaks the graph is no fold
        return model, f"constant folding skipped: its result was not a valid graph ({problem})"
    return folded, None


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
            model, note = _fold_constants(model, config.max_folded_elements, config.max_growth)
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
