"""The ONNX -> torch converter of `onnxopt finetune` computes what ONNX Runtime computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from onnxopt import OnnxoptError  # noqa: E402
from onnxopt.finetune.torch_graph import OnnxModule, statistic_initializers, trainable_initializers, with_weights  # noqa: E402
from onnxopt.io import load_model  # noqa: E402

from tests.graphs import conv_bn_relu, init, make_model  # noqa: E402
from tests.helpers import run_model, to_ir  # noqa: E402

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _vi(name: str, shape: list[int | str], elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _one(op: str, x_shape: list[int], attrs: dict | None = None, consts: dict[str, np.ndarray] | None = None,
         opset: int = 18, outputs: int = 1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> op(x, *consts) -> y (, y1...), the consts as initializers (a name starting "_" leaves the input empty)."""
    consts = consts or {}
    names = [("" if k.startswith("_") else k) for k in consts]
    node = helper.make_node(op, ["x", *names], ["y", *(f"y{i}" for i in range(1, outputs))], name="n", **(attrs or {}))
    inits = [init(k, v) for k, v in consts.items() if not k.startswith("_")]
    # the output's type comes from shape inference in the test
    model = make_model([node], [_vi("x", x_shape)], [], inits, opset=opset)
    return model, {"x": RNG.standard_normal(x_shape).astype(np.float32)}


i64 = lambda *v: np.array(v, np.int64)  # noqa: E731

CASES = {
    "conv_asymmetric_pads": _one("Conv", [2, 3, 7, 7], {"pads": [0, 1, 2, 1], "strides": [2, 1]},
                                 {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)}),
    "conv_same_upper": _one("Conv", [1, 2, 9, 8], {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                    {"w": RNG.standard_normal((4, 2, 3, 2)).astype(np.float32)}),
    "conv_transpose": _one("ConvTranspose", [1, 4, 5, 5], {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
                           {"w": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)}),
    "maxpool_ceil_pads": _one("MaxPool", [1, 2, 7, 7], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 0], "ceil_mode": 1}),
    "avgpool_count_pad": _one("AveragePool", [1, 2, 6, 6], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "avgpool_exclude_pad": _one("AveragePool", [1, 2, 6, 6], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "softmax_opset11_coerced": _one("Softmax", [2, 3, 4], {"axis": 1}, opset=11),
    "logsoftmax_axis1": _one("LogSoftmax", [2, 3, 4], {"axis": 1}),
    "gemm_trans_alpha_beta": _one("Gemm", [5, 3], {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
                                  {"b": RNG.standard_normal((4, 5)).astype(np.float32), "c": RNG.standard_normal(4).astype(np.float32)}),
    "layernorm_axis": _one("LayerNormalization", [2, 3, 4], {"axis": 1, "epsilon": 1e-3},
                           {"s": RNG.standard_normal((3, 4)).astype(np.float32), "b": RNG.standard_normal((3, 4)).astype(np.float32)}),
    "reduce_mean_axes_input": _one("ReduceMean", [2, 3, 4], {"keepdims": 0}, {"a": i64(-1, 0)}),
    "reduce_mean_axes_attr": _one("ReduceMean", [2, 3, 4], {"axes": [1]}, opset=13),
    "reduce_sum_all": _one("ReduceSum", [2, 3, 4], {"keepdims": 0}),
    "slice_steps": _one("Slice", [4, 10], consts={"s": i64(1, -8), "e": i64(100, -1), "a": i64(0, 1), "st": i64(1, 3)}),
    "split_sizes": _one("Split", [2, 7], {"axis": 1}, {"sp": i64(3, 4)}, outputs=2),
    "split_equal_opset11": _one("Split", [2, 9], {"axis": 1}, opset=11, outputs=3),
    "pad_reflect_axes": _one("Pad", [1, 2, 5], {"mode": "reflect"}, {"p": i64(1, 2), "_v": np.zeros(0), "ax": i64(2)}),
    "gather_negative": _one("Gather", [5, 3], {"axis": 0}, {"i": i64(-1, 0, 2)}),
    "resize_nearest": _one("Resize", [1, 2, 3, 4], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                           {"_roi": np.zeros(0), "sc": np.array([1, 1, 2, 3], np.float32)}),
    "resize_linear": _one("Resize", [1, 2, 3, 4], {"mode": "linear"}, {"_roi": np.zeros(0), "_sc": np.zeros(0), "sz": i64(1, 2, 5, 7)}),
    "clip_inputs": _one("Clip", [3, 4], consts={"lo": np.array(-0.5, np.float32), "hi": np.array(0.3, np.float32)}),
    "hard_sigmoid": _one("HardSigmoid", [3, 4], {"alpha": 0.3, "beta": 0.4}),
    "flatten_axis2": _one("Flatten", [2, 3, 4, 5], {"axis": 2}),
    "transpose": _one("Transpose", [2, 3, 4], {"perm": [2, 0, 1]}),
    "reshape_zero_copy": _one("Reshape", [2, 3, 4], consts={"sh": i64(0, -1)}),
    "unsqueeze_negative": _one("Unsqueeze", [2, 3], consts={"a": i64(-1, 0)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case: str) -> None:
    proto, feed = CASES[case]
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    del proto.graph.output[:]
    proto.graph.output.extend([v for v in proto.graph.value_info if v.name == "y"])
    module = OnnxModule(to_ir(proto), [])
    with torch.no_grad():
        got = module({k: torch.from_numpy(v) for k, v in feed.items()})["y"].numpy()
    want = run_model(proto, feed)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_example_models_match_onnxruntime(digits: Path, name: str) -> None:
    model = load_model(digits / f"{name}.onnx")
    x = np.load(digits / "eval.npz")["x"][:32]
    module = OnnxModule(model, trainable_initializers(model), statistic_initializers(model))
    with torch.no_grad():
        got = module({"x": torch.from_numpy(x)})["logits"].numpy()
    np.testing.assert_allclose(got, run_model(digits / f"{name}.onnx", {"x": x})[0], atol=1e-4)


def test_trainable_and_statistics_selection() -> None:
    model = to_ir(conv_bn_relu())
    assert sorted(trainable_initializers(model)) == ["b", "bias", "scale", "w"]
    assert sorted(statistic_initializers(model)) == ["mean", "var"]


def test_batch_statistics_update_running_stats_and_write_back() -> None:
    proto = conv_bn_relu(cin=2, cout=3)
    model = to_ir(proto)
    module = OnnxModule(model, trainable_initializers(model), statistic_initializers(model))
    x = RNG.standard_normal((8, 2, 6, 6)).astype(np.float32)
    module.mode.batch_statistics = True
    w, b = (torch.tensor(onnx.numpy_helper.to_array(proto.graph.initializer[i])) for i in (0, 5))
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(torch.from_numpy(x), w, b, padding=1)
        module({"x": torch.from_numpy(x)})
    module.mode.batch_statistics = False
    weights = module.current_weights()
    old_mean = onnx.numpy_helper.to_array(proto.graph.initializer[3])
    expected = 0.9 * old_mean + 0.1 * conv.mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(weights["mean"], expected, rtol=1e-5, atol=1e-6)
    updated = with_weights(model, weights)
    np.testing.assert_array_equal(updated.graph.initializers["mean"].const_value.numpy(), weights["mean"])
    np.testing.assert_array_equal(model.graph.initializers["mean"].const_value.numpy(), old_mean)  # the source is untouched
    with torch.no_grad():
        got = module({"x": torch.from_numpy(x)})["y"].numpy()
    np.testing.assert_allclose(got, run_model(updated, {"x": x})[0], atol=1e-5)


def test_unsupported_op_names_the_op() -> None:
    node = helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk")
    proto = make_model([node], [_vi("x", [2, 5])], [_vi("y", [2, 2]), _vi("i", [2, 2], TensorProto.INT64)], [init("k", i64(2))])
    with pytest.raises(OnnxoptError, match=r"no torch conversion for op TopK \(node 'topk'\)"):
        OnnxModule(to_ir(proto), [])
    custom = helper.make_node("FusedConv", ["x"], ["y"], name="fc", domain="com.microsoft")
    proto = make_model([custom], [_vi("x", [2, 5])], [_vi("y", [2, 5])])
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(OnnxoptError, match="com.microsoft.FusedConv"):
        OnnxModule(to_ir(proto), [])
