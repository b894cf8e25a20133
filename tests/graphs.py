"""Tiny hand-built graphs (onnx.helper) shared by the unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["make_model", "conv_bn_relu", "gemm_chain", "init"]

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
