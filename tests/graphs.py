"""Tiny hand-built graphs (onnx.helper) shared by the unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["make_model", "conv_bn_relu", "conv_stack", "gemm_chain", "init", "if_model", "loop_model", "scan_model",
           "SUBGRAPH_MODELS", "streaming_if_model"]

OPSET = 18


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               initializers: list[onnx.TensorProto] = (), opset: int = OPSET, name: str = "g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset <= 20 else 10
    return model


def conv_bn_relu(cin: int = 3, cout: int = 8, seed: int = 0, with_bias: bool = True) -> onnx.ModelProto:
    """x[N,cin,6,6] -> Conv 3x3 pad 1 -> BatchNorm -> Relu -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        init("w", rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)),
        init("scale", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
        init("bias", rng.standard_normal(cout).astype(np.float32)),
        init("mean", rng.standard_normal(cout).astype(np.float32)),
        init("var", rng.uniform(0.5, 2.0, cout).astype(np.float32)),
    ]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(init("b", rng.standard_normal(cout).astype(np.float32)))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], epsilon=1e-5, name="bn"),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, 6, 6])], inits)


def gemm_chain(sizes: tuple[int, ...] = (16, 32, 8), seed: int = 0, trans_b: int = 1) -> onnx.ModelProto:
    """x[N,sizes[0]] -> (Gemm -> Relu)* -> Gemm -> y[N,sizes[-1]]."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)).astype(np.float32)
        inits += [init(f"w{i}", w), init(f"b{i}", rng.standard_normal(n).astype(np.float32) * 0.1)]
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}" if out != "y" else "y"], transB=trans_b, name=f"gemm{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out], name=f"relu{i}"))
        prev = out
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])], inits)


def _vi(name: str, shape: list | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def if_model(width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x[N,width] -> Gemm -> h; If(cond): then MatMul(h, W_then)+b -> Relu, else Gemm(h, W_else) -> y[N,width].

    The branch weights live inside the branches; ``h`` and the then-bias come from the outer scope.
    """
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_then"], ["t0"], name="then_matmul"),
         helper.make_node("Add", ["t0", "b_then"], ["t1"], name="then_add"),
         helper.make_node("Relu", ["t1"], ["t_out"], name="then_relu")],
        "then", [], [_vi("t_out", ["N", width])], [init("w_then", w(width, width))])
    else_branch = helper.make_graph(
        [helper.make_node("Gemm", ["h", "w_else", "b_else"], ["e_out"], transB=1, name="else_gemm")],
        "else", [], [_vi("e_out", ["N", width])],
        [init("w_else", w(width, width)), init("b_else", rng.standard_normal(width).astype(np.float32) * 0.1)])
    nodes = [
        helper.make_node("Gemm", ["x", "w_in", "b_in"], ["h"], transB=1, name="gemm_in"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch"),
    ]
    return make_model(nodes, [_vi("x", ["N", width]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", ["N", width])],
                      [init("w_in", w(width, width)), init("b_in", np.zeros(width, np.float32)),
                       init("b_then", rng.standard_normal(width).astype(np.float32) * 0.1)])


def loop_model(width: int = 64, trips: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x[N,width] -> Loop `trips` times s = Relu(Gemm(s, W_body)) -> Gemm(W_out) -> y[N,width]; W_body inside the body."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Gemm", ["s_in", "w_body", "b_body"], ["g"], transB=1, name="body_gemm"),
         helper.make_node("Relu", ["g"], ["s_out"], name="body_relu")],
        "body", [_vi("iter", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("s_in", ["N", width])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("s_out", ["N", width])],
        [init("w_body", w(width, width)), init("b_body", rng.standard_normal(width).astype(np.float32) * 0.1)])
    nodes = [
        helper.make_node("Loop", ["trips", "keep_going", "x"], ["s"], body=body, name="loop"),
        helper.make_node("Gemm", ["s", "w_out", "b_out"], ["y"], transB=1, name="gemm_out"),
    ]
    return make_model(nodes, [_vi("x", ["N", width])], [_vi("y", ["N", width])],
                      [init("trips", np.array(trips, np.int64)), init("keep_going", np.array(True)),
                       init("w_out", w(width, width)), init("b_out", np.zeros(width, np.float32))])


def scan_model(width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A recurrent cell by Scan over x[T,width]: h = Tanh(x_t @ W_x + h @ W_h) -> ys[T,width] -> MatMul(W_out) -> y."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w_x"], ["a"], name="cell_x"),
         helper.make_node("MatMul", ["h_in", "w_h"], ["b"], name="cell_h"),
         helper.make_node("Add", ["a", "b"], ["c"], name="cell_add"),
         helper.make_node("Tanh", ["c"], ["h_out"], name="cell_tanh"),
         helper.make_node("Identity", ["h_out"], ["y_t"], name="cell_out")],
        "cell", [_vi("h_in", [width]), _vi("x_t", [width])], [_vi("h_out", [width]), _vi("y_t", [width])],
        [init("w_x", w(width, width))])
    nodes = [
        helper.make_node("Scan", ["h0", "x"], ["h_last", "ys"], body=body, num_scan_inputs=1, name="scan"),
        helper.make_node("MatMul", ["ys", "w_out"], ["y"], name="matmul_out"),
    ]
    return make_model(nodes, [_vi("x", ["T", width])], [_vi("y", ["T", width])],
                      [init("h0", np.zeros(width, np.float32)), init("w_h", w(width, width) * 0.5),
                       init("w_out", w(width, width))])


def streaming_if_model(width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """The pattern of a streaming audio model: a two-output If whose branches hold nested Ifs reading outer weights.

    first = ReduceSum(x) > 0 chooses the outer branch, inner = ReduceMax(x) > 1 the nested one; every
    MatMul weight (w_a, w_b, w_s) and the bias live in the main graph and are read inside the branches.
    Outputs: y[N,width] and the carried state[N,width]; the outer branches share a shape-computed
    Reshape target (Shape -> Gather) so fold has shape arithmetic to do inside them.
    """
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731

    def nested(tag: str, first: str, second: str) -> onnx.GraphProto:
        inner_then = helper.make_graph(
            [helper.make_node("MatMul", ["x", first], [f"{tag}_it0"]),
             helper.make_node("Add", [f"{tag}_it0", "bias"], [f"{tag}_it"])],
            f"{tag}_inner_then", [], [_vi(f"{tag}_it", ["N", width])])
        inner_else = helper.make_graph(
            [helper.make_node("MatMul", ["x", second], [f"{tag}_ie"])],
            f"{tag}_inner_else", [], [_vi(f"{tag}_ie", ["N", width])])
        return helper.make_graph(
            [helper.make_node("If", ["inner"], [f"{tag}_h"], then_branch=inner_then, else_branch=inner_else),
             helper.make_node("Shape", ["x"], [f"{tag}_shape"]),
             helper.make_node("Gather", [f"{tag}_shape", "one"], [f"{tag}_width"], axis=0),
             helper.make_node("Concat", ["minus_one", f"{tag}_width"], [f"{tag}_target"], axis=0),
             helper.make_node("Reshape", [f"{tag}_h", f"{tag}_target"], [f"{tag}_r"]),
             helper.make_node("Relu", [f"{tag}_r"], [f"{tag}_y"]),
             helper.make_node("MatMul", [f"{tag}_r", "w_s"], [f"{tag}_state"])],
            f"{tag}_branch", [], [_vi(f"{tag}_y", ["N", width]), _vi(f"{tag}_state", ["N", width])])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["first"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "one_f"], ["inner"]),
        helper.make_node("If", ["first"], ["y", "state"], then_branch=nested("t", "w_a", "w_b"),
                         else_branch=nested("e", "w_b", "w_a"), name="stream_if"),
    ]
    inits = [init("w_a", w(width, width)), init("w_b", w(width, width)), init("w_s", w(width, width)),
             init("bias", rng.standard_normal(width).astype(np.float32) * 0.1), init("zero", np.array(0.0, np.float32)),
             init("one_f", np.array(1.0, np.float32)), init("one", np.array([1], np.int64)),
             init("minus_one", np.array([-1], np.int64))]
    return make_model(nodes, [_vi("x", ["N", width])], [_vi("y", ["N", width]), _vi("state", ["N", width])], inits)


#: Builders of the models with subgraphs, by name.
SUBGRAPH_MODELS = {"if": if_model, "loop": loop_model, "scan": scan_model}


def conv_stack(width: int = 16, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x[1,3,size,size] -> 3 x (Conv 3x3 pad 1 -> Relu) of ``width`` channels -> Conv 1x1 -> GlobalAveragePool -> y[1,8].

    Twice the width is the same network with about four times the MACs: a model measurably slower by construction.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, prev, cin = [], [], "x", 3
    for i in range(3):
        inits += [init(f"w{i}", (rng.standard_normal((width, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)),
                  init(f"b{i}", np.zeros(width, np.float32))]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", width
    # a 1x1 Conv to 8 channels: both widths have the same output, so they can be validated against each other
    inits.append(init("head", (rng.standard_normal((8, width, 1, 1)) / np.sqrt(width)).astype(np.float32)))
    nodes += [helper.make_node("Conv", [prev, "head"], ["h"]),
              helper.make_node("GlobalAveragePool", ["h"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
