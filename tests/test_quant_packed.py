"""quant after cluster: the weights quant leaves float keep the packed form they came in, bit-exact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt import PassContext
from onnxopt.config import build_config
from onnxopt.data import Dataset
from onnxopt.graph import iter_nodes, name_nodes
from onnxopt.io import serialize_model
from onnxopt.sessions import SessionFactory
from onnxopt_passes.cluster import ClusterConfig, ClusterPass
from onnxopt_passes.fold import FoldConfig, FoldPass
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.packed import packed_decodes, restore_packed

from tests.graphs import gemm_chain, init, make_model
from tests.helpers import run_model, to_ir

RNG = np.random.default_rng(0)


def _conv_bn_conv(cin: int = 16, width: int = 32) -> onnx.ModelProto:
    """x[N,cin,6,6] -> Conv 3x3 -> BatchNorm -> Relu -> Conv 3x3 -> y: quant folds the BatchNorm into the first weight."""
    rng = np.random.default_rng(1)
    inits = [init("w", rng.standard_normal((width, cin, 3, 3)).astype(np.float32)),
             init("scale", rng.uniform(0.5, 1.5, width).astype(np.float32)),
             init("bias", rng.standard_normal(width).astype(np.float32)),
             init("mean", rng.standard_normal(width).astype(np.float32)),
             init("var", rng.uniform(0.5, 2.0, width).astype(np.float32)),
             init("w2", (rng.standard_normal((width, width, 3, 3)) / 17).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width, 6, 6])], inits)


def _clustered(proto: onnx.ModelProto, **keys: object) -> ir.Model:
    config = build_config(ClusterConfig, {"min_size": 64, **keys}, pass_name="cluster")
    result = ClusterPass().apply(to_ir(proto), config, PassContext())
    assert result.modified
    return result.model


def _quant(model: ir.Model, data: dict[str, np.ndarray], **keys: object) -> onnxopt.PassResult:
    config = build_config(QuantConfig, {"speed_guard": "off", **keys}, pass_name="quant")
    return QuantPass().apply(model, config, PassContext(calibration=Dataset("calib", data, batch_size=8)))


def _unpacked(model: ir.Model) -> ir.Model:
    """The same model with every decode folded into fp32 weights (what quant quantized from before the fix)."""
    return FoldPass().apply(model, FoldConfig(max_growth=0), PassContext()).model


def _reads(model: ir.Model, node_name: str) -> set[str]:
    """Op types producing the inputs of ``node_name`` (an initializer counts as 'initializer')."""
    node = next(n for n in iter_nodes(model) if n.name == node_name)
    return {v.producer().op_type if v.producer() is not None else "initializer" for v in node.inputs[1:2]}


@pytest.mark.parametrize(("proto", "keys", "float_node", "quantized_node"), [
    (gemm_chain((32, 64, 64, 8)), {"k": 16}, "gemm1", "gemm0"),
    # the BatchNorm quant folds into the float conv's weight scales its channels: the decode times a scale holds it
    (_conv_bn_conv(), {"k": 16}, "conv", "conv2"),
], ids=["gemm_same_weight", "conv_batchnorm_folded"])
def test_weights_left_float_keep_their_packed_form(proto: onnx.ModelProto, keys: dict, float_node: str,
                                                   quantized_node: str, tmp_path: Path) -> None:
    feed_name = proto.graph.input[0].name
    shape = [d.dim_value or 4 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    calib = {feed_name: RNG.standard_normal([16, *shape[1:]]).astype(np.float32)}
    feed = {feed_name: RNG.standard_normal([5, *shape[1:]]).astype(np.float32)}
    clustered = _clustered(proto, **keys)
    # conv2 writes the graph output: quantized all the same here, so that only the first layer stays float
    extra = {"exclude_nodes": (float_node,), "keep_outputs_float": False}
    packed = _quant(clustered.clone(), calib, **extra)
    unpacked = _quant(_unpacked(clustered.clone()), calib, **extra)
    assert any("keep the packed form" in n for n in packed.report.notes)
    assert packed.report.figures["packed_weights_kept"] >= 1
    assert not any("keep the packed form" in n for n in unpacked.report.notes)  # nothing packed to keep there

    # the float node reads a decode, not an fp32 initializer; the other one was quantized all the same
    assert _reads(packed.model, float_node) == {"Gather" if "gemm" in float_node else "Cast"}  # (Cast: rescaled)
    assert _reads(unpacked.model, float_node) == {"initializer"}
    assert _reads(packed.model, quantized_node) == {"DequantizeLinear"}
    # exact: the same outputs, bit for bit, as quantizing the unpacked model
    paths = {}
    for name, model in (("packed", packed.model), ("unpacked", unpacked.model)):
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(serialize_model(model))
    np.testing.assert_array_equal(run_model(paths["packed"], feed)[0], run_model(paths["unpacked"], feed)[0])
    # and smaller: the float weight is not written in fp32
    assert paths["packed"].stat().st_size < 0.7 * paths["unpacked"].stat().st_size


def test_a_weight_the_decode_no_longer_computes_stays_float() -> None:
    """restore_packed puts back only what the decode (times a scale per slice) computes bit for bit."""
    clustered = _clustered(gemm_chain((32, 64, 64, 8)), k=16)
    name_nodes(clustered)
    decodes = packed_decodes(clustered)
    assert {d.value for d in decodes} >= {"w0", "w1"}
    for changed in (False, True):
        model = _unpacked(clustered.clone())
        assert not [n for n in model.graph if n.op_type == "Gather"]  # all unpacked
        if changed:  # one element off by one ulp in each weight: no decode times a scale per slice gives that
            for name in ("w0", "w1"):
                value = model.graph.initializers[name]
                array = value.const_value.numpy().copy()
                array[0, 0] = np.nextafter(array[0, 0], np.float32(np.inf))
                value.const_value = ir.tensor(array, name=name)
        before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items() if k in ("w0", "w1")}
        restored, saved = restore_packed(model, decodes, SessionFactory())
        if changed:
            assert (restored, saved) == (0, 0)
            for k, array in before.items():
                np.testing.assert_array_equal(model.graph.initializers[k].const_value.numpy(), array)
        else:
            assert restored == 2 and saved > 0
            assert not {"w0", "w1"} & set(model.graph.initializers)
            assert Counter(n.op_type for n in model.graph)["Gather"] == 2


@pytest.mark.parametrize(("model", "quant", "quantized"), [
    ("mlp", {"keep_first_last": True}, {"Gemm": 1}),
    # the cnn's BatchNorms are folded into its float convs by quant: those come back as decode x scale
    ("cnn", {"exclude_ops": ("Conv",)}, {"Gemm": 1}),
])
def test_cluster_then_quant_on_digits_keeps_the_float_layers_packed(digits: Path, tmp_path: Path, model: str,
                                                                     quant: dict, quantized: dict) -> None:
    """End to end (apply, as a user runs it): cluster, then quant with some layers kept float."""
    clustered = tmp_path / "clustered.onnx"
    onnxopt.apply(digits / f"{model}.onnx", "cluster", clustered, settings={"cluster": {"k": 32}}, validate_result=False)
    unpacked = tmp_path / "unpacked.onnx"
    onnxopt.apply(clustered, "fold", unpacked, settings={"fold": {"max_growth": 0}}, validate_result=False)
    outs, kept = {}, {}
    for name, source in (("packed", clustered), ("unpacked", unpacked)):
        outs[name] = tmp_path / f"{name}_quant.onnx"
        run = onnxopt.apply(source, "quant", outs[name], data=digits / "calib.npz", validate_result=False,
                            settings={"quant": {**quant, "speed_guard": "off"}})
        assert run.passes[0].figures["quantized_nodes"] == quantized
        kept[name] = run.passes[0].figures.get("packed_weights_kept", 0)
    assert kept["packed"] >= 2 and kept["unpacked"] == 0
    x = np.load(digits / "eval.npz")["x"][:64]
    np.testing.assert_array_equal(run_model(outs["packed"], {"x": x})[0], run_model(outs["unpacked"], {"x": x})[0])
    size = {k: p.stat().st_size for k, p in outs.items()}
    assert size["packed"] < 0.7 * size["unpacked"]
    assert size["packed"] < 1.3 * clustered.stat().st_size  # about the clustered file: nothing re-inflated
