"""fold: lossless on hand-built graphs and the examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxopt import PassContext
from onnxopt.io import load_model
from onnxopt_passes.fold import FoldConfig, FoldPass

from tests.graphs import conv_bn_relu, gemm_chain
from tests.helpers import run_model, to_ir


@pytest.mark.parametrize("with_bias", [True, False])
def test_batchnorm_folds_into_conv_exactly(with_bias: bool) -> None:
    proto = conv_bn_relu(with_bias=with_bias)
    model = to_ir(proto)
    result = FoldPass().apply(model, FoldConfig(), PassContext())
    ops = [n.op_type for n in result.model.graph]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    assert result.report.figures["batchnorms_folded"] == 1
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    (expected,) = run_model(proto, {"x": x})
    (got,) = run_model(result.model, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fold_does_not_mutate_input() -> None:
    model = to_ir(conv_bn_relu())
    before = [n.op_type for n in model.graph]
    FoldPass().apply(model, FoldConfig(), PassContext())
    assert [n.op_type for n in model.graph] == before


def test_gemm_batchnorm_fold() -> None:
    from onnx import helper

    from tests.graphs import init, make_model

    rng = np.random.default_rng(0)
    for trans_b in (0, 1):
        proto = gemm_chain((6, 5), trans_b=trans_b)
        graph = proto.graph
        graph.node[-1].output[0] = "g"
        graph.node.append(helper.make_node("BatchNormalization", ["g", "s", "t", "m", "v"], ["y"], name="bn"))
        graph.initializer.extend([init("s", rng.uniform(0.5, 2, 5).astype(np.float32)), init("t", rng.standard_normal(5).astype(np.float32)),
                                  init("m", rng.standard_normal(5).astype(np.float32)), init("v", rng.uniform(0.5, 2, 5).astype(np.float32))])
        result = FoldPass().apply(to_ir(proto), FoldConfig(), PassContext())
        assert "BatchNormalization" not in [n.op_type for n in result.model.graph]
        x = rng.standard_normal((4, 6)).astype(np.float32)
        np.testing.assert_allclose(run_model(result.model, {"x": x})[0], run_model(proto, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_fold_examples_equivalent(digits, name: str) -> None:
    model = load_model(digits / f"{name}.onnx")
    result = FoldPass().apply(model, FoldConfig(), PassContext())
    x = np.load(digits / "eval.npz")["x"][:32]
    np.testing.assert_allclose(run_model(result.model, {"x": x})[0], run_model(digits / f"{name}.onnx", {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_fold_keeps_a_clustered_model_packed(digits: Path, tmp_path: Path) -> None:
    """Unpacking cluster's decode is exact but undoes the compression: fold leaves it (max_growth), unless told."""
    from onnxopt.io import serialize_model
    from onnxopt_passes.cluster import ClusterConfig, ClusterPass

    dense = load_model(digits / "mlp.onnx")
    clustered = ClusterPass().apply(dense, ClusterConfig(k=16), PassContext()).model
    path = tmp_path / "clustered.onnx"
    path.write_bytes(serialize_model(clustered))
    packed_bytes = path.stat().st_size
    feed = {"x": np.load(digits / "eval.npz")["x"][:16]}
    expected = run_model(path, feed)[0]

    kept = FoldPass().apply(load_model(path), FoldConfig(), PassContext()).model
    unpacked = FoldPass().apply(load_model(path), FoldConfig(max_growth=0), PassContext()).model
    for name, folded in (("kept", kept), ("unpacked", unpacked)):
        (tmp_path / f"{name}.onnx").write_bytes(serialize_model(folded))
        np.testing.assert_array_equal(run_model(tmp_path / f"{name}.onnx", feed)[0], expected)
    assert (tmp_path / "kept.onnx").stat().st_size <= packed_bytes * 1.05
    assert (tmp_path / "unpacked.onnx").stat().st_size > packed_bytes * 4  # the decoded float weights
