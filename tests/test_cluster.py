"""cluster pass: packed and dense agree, the in-graph decode equals numpy, ORT folds it, end to end on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import OnnxoptError, PassContext
from onnxopt.config import build_config
from onnxopt.graph import expose_values
from onnxopt.io import serialize_model
from onnxopt_passes.cluster import ClusterConfig, ClusterPass
from onnxopt_passes.cluster.storage import as_rows, unpack_indices

from tests.graphs import conv_bn_relu, gemm_chain, if_model, init, make_model
from tests.helpers import run_model, to_ir


def _weight_model(weight: np.ndarray, trans_b: int = 0, opset: int = 18) -> onnx.ModelProto:
    """y = x @ W (MatMul with W [K,N], or Gemm with W transposed): fed the identity, it returns the (decoded) weight."""
    k = weight.shape[1] if trans_b else weight.shape[0]
    n = weight.shape[0] if trans_b else weight.shape[1]
    node = (helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="gemm") if trans_b
            else helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"))
    return make_model([node],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [init("w", weight)], opset=opset)


def _decoded(model: ir.Model, weight: np.ndarray, trans_b: int = 0) -> np.ndarray:
    """The weight as the clustered model computes it."""
    k = weight.shape[1] if trans_b else weight.shape[0]
    (y,) = run_model(model, {"x": np.eye(k, dtype=np.float32)})
    return y.T if trans_b else y


def _cluster(proto: onnx.ModelProto, **keys: object) -> onnxopt.PassResult:
    config = build_config(ClusterConfig, keys, pass_name="cluster")
    return ClusterPass().apply(to_ir(proto), config, PassContext())


@pytest.mark.parametrize(("model", "feed"), [
    (conv_bn_relu(cin=16, cout=32), {"x": np.random.default_rng(0).standard_normal((2, 16, 6, 6)).astype(np.float32)}),
    (gemm_chain((64, 128, 32), trans_b=0), {"x": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}),
    (if_model(), {"x": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32), "cond": np.array(True)}),
], ids=["conv", "gemm_transposed_channels", "if_subgraphs"])
@pytest.mark.parametrize("keys", [{"k": 16}, {"k": 8, "granularity": "channel", "codebook_dtype": "float16"},
                                  {"k": 64, "init": "optimal"}, {"k": 16, "granularity": "channel", "codebook_dtype": "int8"}],
                         ids=["k16", "k8_channel_fp16", "k64_optimal", "k16_channel_int8"])
def test_packed_and_dense_give_the_same_outputs(model: onnx.ModelProto, feed: dict, keys: dict) -> None:
    feed = {i.name: feed[i.name] for i in model.graph.input}
    packed = _cluster(model, mode="packed", min_size=64, **keys)
    dense = _cluster(model, mode="dense", min_size=64, **keys)
    assert packed.modified and len(packed.report.items) >= 1
    assert any(n.op_type == "BitShift" or n.op_type == "Gather" for n in packed.model.graph.all_nodes())
    assert all(item["bytes"][1] < item["bytes"][0] for item in packed.report.items)
    got, expected = run_model(packed.model, feed), run_model(dense.model, feed)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    (reference,) = run_model(model, feed)[:1]
    assert not np.array_equal(got[0], reference)  # clustering changed something: the check above is not vacuous
    np.testing.assert_allclose(got[0], reference, rtol=0.3, atol=0.3 * float(np.abs(reference).max()))


@pytest.mark.parametrize(("k", "bits"), [(2, 1), (4, 2), (16, 4), (200, 8)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_in_graph_unpack_equals_numpy(k: int, bits: int, granularity: str) -> None:
    rng = np.random.default_rng(k)
    weight = rng.standard_normal((37, 97)).astype(np.float32)  # 3589 weights: the last byte is padded for bits < 8
    proto = _weight_model(weight, trans_b=1)
    result = _cluster(proto, k=k, granularity=granularity, min_size=1)
    item = result.report.items[0]
    granularity = "tensor" if 97 < 4 * k else granularity  # per channel needs 4·k weights per channel
    assert item["bits"] == bits and item["granularity"] == granularity
    graph = result.model.graph
    indices = graph.initializers["w.indices"].const_value.numpy()
    codebook = graph.initializers["w.codebook"].const_value.numpy()
    cast = next(n for n in graph if n.name == "w.i32")  # the decode's Cast to int32 indices
    (index,) = run_model(expose_values(result.model, [cast.outputs[0].name]), {"x": np.eye(97, dtype=np.float32)})
    expected_index = unpack_indices(indices, bits, weight.size)
    np.testing.assert_array_equal(index.reshape(-1), expected_index)
    rows = expected_index.reshape(37, 97) if granularity == "channel" else expected_index.reshape(1, -1)
    expected = np.take_along_axis(codebook.reshape(rows.shape[0], -1), rows.astype(np.intp), axis=1).reshape(37, 97)
    np.testing.assert_array_equal(_decoded(result.model, weight, trans_b=1), expected)
    assert max(len(np.unique(row)) for row in as_rows(expected, 0 if granularity == "channel" else None)) <= k
    assert not np.array_equal(expected, weight)


def test_ort_folds_the_decode_at_session_start(tmp_path: Path) -> None:
    result = _cluster(gemm_chain((64, 128, 32), trans_b=0), k=16, granularity="channel", min_size=64)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(serialize_model(result.model), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ops.isdisjoint({"BitShift", "Cast", "Gather", "GatherElements", "Reshape", "Transpose"}), ops


def test_fewer_distinct_values_than_k_is_exact_through_the_graph() -> None:
    rng = np.random.default_rng(7)
    weight = rng.choice(np.array([-1.5, -0.25, 0.0, 0.125, 3.0], np.float32), (48, 40))
    for init_name in ("kmeans++", "linear", "density", "optimal"):
        for granularity in ("tensor", "channel"):
            result = _cluster(_weight_model(weight), k=16, init=init_name, granularity=granularity, min_size=1)
            np.testing.assert_array_equal(_decoded(result.model, weight), weight)
            assert result.report.items[0]["snr_db"] is None and result.report.items[0]["rel_mse"] == 0


def test_per_channel_beats_per_tensor_on_channels_of_different_scale() -> None:
    rng = np.random.default_rng(8)
    weight = (rng.standard_normal((96, 32)) * np.geomspace(0.01, 10, 32)).astype(np.float32)  # Gemm [K, N]: N = channels
    tensor = _cluster(_weight_model(weight), k=8, granularity="tensor", min_size=1)
    channel = _cluster(_weight_model(weight), k=8, granularity="channel", min_size=1)
    assert channel.report.items[0]["granularity"] == "channel"
    assert channel.model.graph.initializers["w.codebook"].const_value.shape.dims == (32, 8)
    small = float(np.square(_decoded(channel.model, weight)[:, 0] - weight[:, 0]).sum())
    assert small < 0.01 * float(np.square(_decoded(tensor.model, weight)[:, 0] - weight[:, 0]).sum())
    assert channel.report.items[0]["rel_mse"] <= tensor.report.items[0]["rel_mse"]
    narrow = _cluster(_weight_model(weight[:20]), k=8, granularity="channel", min_size=1)  # 20 weights per channel < 4·k
    assert narrow.report.items[0]["granularity"] == "tensor" and "per tensor" in narrow.report.items[0]["note"]


def test_codebook_dtype_auto_takes_float16_only_where_it_costs_nothing() -> None:
    rng = np.random.default_rng(10)
    normal = rng.standard_normal((64, 32)).astype(np.float32)
    exact = rng.choice(np.array([0.1, 0.2, 0.3], np.float32), (64, 32))  # not float16 values: rounding would add error
    huge = normal * np.float32(1e5)  # beyond float16's range
    for weight, expected in ((normal, "float16"), (exact, "float32"), (huge, "float32")):
        result = _cluster(_weight_model(weight), k=8, min_size=1)
        assert result.report.items[0]["codebook"] == expected
        assert np.isfinite(_decoded(result.model, weight)).all()
    forced = _cluster(_weight_model(huge), k=8, min_size=1, codebook_dtype="float16")
    assert forced.report.items[0]["codebook"] == "float32"  # float16 would overflow to inf
    np.testing.assert_array_equal(_decoded(_cluster(_weight_model(exact), k=8, min_size=1).model, exact), exact)


def test_int8_codebook_is_smaller_than_float16_and_adds_little_error() -> None:
    rng = np.random.default_rng(12)
    weight = (rng.standard_normal((128, 96)) * rng.uniform(0.01, 3, (1, 96))).astype(np.float32)
    results = {dtype: _cluster(_weight_model(weight), k=16, granularity="channel", min_size=1, codebook_dtype=dtype)
               for dtype in ("float16", "int8")}
    half, byte = (results[d].report.items[0] for d in ("float16", "int8"))
    assert byte["codebook"] == "int8" and byte["bytes"][1] < half["bytes"][1]
    # a codebook row's 16 values rounded to 1/127 of its largest: far below the 4-bit clustering error itself
    assert half["rel_mse"] <= byte["rel_mse"] <= 1.05 * half["rel_mse"]
    decoded = _decoded(results["int8"].model, weight)
    assert np.isclose(float(np.square(decoded - weight).sum() / np.square(weight).sum()), byte["rel_mse"], rtol=1e-3)
    assert len(np.unique(decoded[:, 0])) <= 16  # still 16 shared values per channel (axis 1 for a MatMul)


def test_a_weight_shared_by_readers_with_different_channel_axes_is_decoded_once_per_tensor() -> None:
    weight = np.random.default_rng(11).standard_normal((48, 48)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["a"], name="matmul"),  # channels on axis 1
                        helper.make_node("Gemm", ["x", "w"], ["b"], transB=1, name="gemm"),  # channels on axis 0
                        helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 48])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])], [init("w", weight)])
    packed = _cluster(proto, k=4, granularity="channel", min_size=1)
    dense = _cluster(proto, k=4, granularity="channel", min_size=1, mode="dense")
    item = packed.report.items[0]
    assert len(packed.report.items) == 1 and item["granularity"] == "tensor" and "no single" in item["note"]
    assert sum(n.op_type == "Gather" for n in packed.model.graph) == 1
    x = np.random.default_rng(12).standard_normal((5, 48)).astype(np.float32)
    np.testing.assert_array_equal(run_model(packed.model, {"x": x})[0], run_model(dense.model, {"x": x})[0])


def test_float16_weights_keep_their_type() -> None:
    weight = np.random.default_rng(13).standard_normal((40, 24)).astype(np.float16)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 40])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 24])], [init("w", weight)])
    packed = _cluster(proto, k=16, min_size=1)
    dense = _cluster(proto, k=16, min_size=1, mode="dense")
    assert packed.report.items[0]["codebook"] == "float16"
    eye = np.eye(40, dtype=np.float16)
    got = run_model(packed.model, {"x": eye})[0]
    assert got.dtype == np.float16 and len(np.unique(got)) <= 16
    np.testing.assert_array_equal(got, run_model(dense.model, {"x": eye})[0])


def test_min_size_and_non_weights_are_left_alone() -> None:
    proto = gemm_chain((64, 8, 4), trans_b=1)  # w0: 512 weights, w1: 32, biases 8 and 4
    result = _cluster(proto, min_size=100)
    assert [i["tensor"] for i in result.report.items] == ["w0"]
    assert {s.target: s.reason for s in result.report.skipped} == {"w1": "32 elements, under min_size 100"}
    initializers = result.model.graph.initializers
    assert "b0" in initializers and "b1" in initializers and "w1" in initializers
    np.testing.assert_array_equal(initializers["w1"].const_value.numpy(), onnx.numpy_helper.to_array(proto.graph.initializer[2]))
    skipped = _cluster(proto, min_size=10_000)
    assert not skipped.modified and "no float weight" in skipped.report.summary


def test_old_opset_is_upgraded_for_the_decode() -> None:
    weight = np.random.default_rng(9).standard_normal((32, 16)).astype(np.float32)
    result = _cluster(_weight_model(weight, opset=9), k=4, min_size=1)
    assert any("opset upgraded 9 -> 11" in note for note in result.report.notes)
    dense = _cluster(_weight_model(weight, opset=9), k=4, min_size=1, mode="dense")
    assert dense.report.notes == []
    np.testing.assert_array_equal(_decoded(result.model, weight), _decoded(dense.model, weight))


@pytest.mark.parametrize(("key", "value"), [("k", "1"), ("k", "300"), ("ops", "Conv,Add"), ("init", "random"),
                                            ("mode", "sparse"), ("granularity", "row")])
def test_bad_config_is_a_one_line_error(key: str, value: str) -> None:
    with pytest.raises(OnnxoptError):
        build_config(ClusterConfig, {key: value}, pass_name="cluster")


def test_digits_cnn_per_channel_end_to_end(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn_k16.onnx"
    run = onnxopt.apply(digits / "cnn.onnx", ["cluster"], out, settings={"cluster": {"granularity": "channel"}},
                        eval_data=digits / "eval.npz")
    assert run.written
    onnx.checker.check_model(str(out))
    v = run.validation
    assert v is not None and v.accuracy is not None
    assert v.accuracy["reference"] - v.accuracy["candidate"] <= 0.01  # the benchmark holds it to 0.5 pt
    assert v.ratio("size_bytes") < 0.3
    figures = run.passes[0].figures
    assert figures["tensors"] == 9 and figures["per_channel_tensors"] >= 4 and figures["bytes_ratio"] < 0.2


def test_cluster_then_quant_runs(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp_cq.onnx"
    run = onnxopt.apply(digits / "mlp.onnx", ["cluster", "quant"], out, settings={"quant": {"mode": "dynamic"}},
                        eval_data=digits / "eval.npz")
    assert run.written and [p.pass_name for p in run.passes] == ["cluster", "quant"]
    assert run.passes[1].modified
    v = run.validation
    assert v is not None and v.accuracy is not None and v.accuracy["reference"] - v.accuracy["candidate"] <= 0.02


def test_clustering_does_not_depend_on_the_runs_earlier_draws() -> None:
    """k-means++ is seeded per run (the run's seed), not drawn from the run's generator: a budget ladder's rung
    clusters the same whichever rungs were tried before it, and the passes after it get the same draws."""
    config = build_config(ClusterConfig, {"k": 8, "min_size": 64}, pass_name="cluster")
    fresh = PassContext(rng=np.random.default_rng(0))
    used = PassContext(rng=np.random.default_rng(0))
    used.rng.random(1000)  # earlier passes or rungs drew from it
    models = [ClusterPass().apply(to_ir(gemm_chain((64, 128, 32))), config, ctx).model for ctx in (fresh, used)]
    assert serialize_model(models[0]) == serialize_model(models[1])
    expected = np.random.default_rng(0)
    expected.random(1000)
    np.testing.assert_array_equal(used.rng.random(4), expected.random(4))  # untouched by the pass
