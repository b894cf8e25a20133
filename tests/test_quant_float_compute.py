"""quant: float compute on int8-stored weights (quant.speed_fallback=int8_weights), the speed guard's last resort.

Placement and storage are checked on tiny graphs through real ONNX Runtime sessions: what the file holds, what
ORT's optimized graph runs, and the outputs. No latency is asserted: the guard's choices are checked against
the figures it recorded, as in test_quant_speed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt.graph import Names
from onnxopt.io import serialize_model
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.handlers import PlaceContext
from onnxopt_passes.quant.weight_only import WeightOnlyStats, store_int8_decoded

from tests.graphs_quant import mbv3_net, transition_bound
from tests.helpers import run_model, to_ir
from tests.test_quant import _optimized_ops

RNG = np.random.default_rng(3)


def _quant(proto, data, **kw):
    return QuantPass().apply(to_ir(proto), QuantConfig(**kw), PassContext(calibration=Dataset("calib", data, batch_size=8)))


def test_int8_stored_weights_decode_to_the_rounded_weights_and_fold_away_in_ort() -> None:
    proto = mbv3_net(width=8, blocks=2, size=16)
    model = to_ir(proto)
    names = frozenset(n.name for n in model.graph if n.op_type in ("Conv", "Gemm"))
    stats = WeightOnlyStats()
    changed = store_int8_decoded(model, names, PlaceContext(), Names(model), stats)
    readers = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
    assert len(changed) == stats.nodes == len(readers) == len(names)
    # the file holds int8 weights and one float scale per output channel: a quarter of the float bytes, plus the
    # scales, which weigh on these tiny layers (a 1x1 conv over 8 channels: 8 bytes of weights per 4-byte scale)
    assert stats.int_weight_bytes < 0.4 * stats.float_weight_bytes
    stored = onnx.ModelProto()
    stored.ParseFromString(serialize_model(model))
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in stored.graph.initializer) == stats.nodes
    # ORT folds Cast and Mul of initializers when the session loads: it runs the float model's own graph
    assert sorted(_optimized_ops(model)) == sorted(_optimized_ops(to_ir(proto)))
    # and computes with exactly the symmetric int8 rounding of each weight per output channel (axis 0 for the
    # convs and for the Gemm, whose weight is transposed: transB=1)
    rounded = onnx.ModelProto()
    rounded.CopyFrom(proto)
    for t in rounded.graph.initializer:
        if t.name in readers:
            w = onnx.numpy_helper.to_array(t)
            s = np.abs(w).reshape(len(w), -1).max(1) / 127
            s = np.where(s > 0, s, 1.0).astype(np.float32).reshape(-1, *[1] * (w.ndim - 1))
            t.CopyFrom(onnx.numpy_helper.from_array((np.clip(np.rint(w / s), -127, 127) * s).astype(np.float32), t.name))
    x = RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)
    got, want, plain = run_model(model, {"x": x})[0], run_model(rounded, {"x": x})[0], run_model(proto, {"x": x})[0]
    # float32 rounding only: the decode multiplies in the same order as the reference (q * s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(got, plain)  # the weights really were rounded


def test_shared_and_tiny_weights_are_left_alone() -> None:
    from onnx import TensorProto, helper

    w = RNG.standard_normal((4, 4, 1, 1)).astype(np.float32)
    tiny = RNG.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c1"), helper.make_node("Conv", ["a", "w"], ["b"], name="c2"),
             helper.make_node("Conv", ["b", "t"], ["y"], name="c3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(tiny, "t")])
    model = to_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    stats = WeightOnlyStats()
    assert store_int8_decoded(model, frozenset({"c1", "c2", "c3"}), PlaceContext(), Names(model), stats) == []
    assert stats.nodes == 0 and {n.op_type for n in model.graph} == {"Conv"}


def test_guard_computes_in_float_on_int8_weights_when_int8_does_not_pay() -> None:
    """The transition-bound graph is about 1.8x fp32 in int8 (far beyond timing noise), and no region kind can
    help: the default guard ends on float compute with every conv's weight stored int8."""
    proto = transition_bound()
    data = {"x": RNG.standard_normal((16, 4, 32, 32)).astype(np.float32)}
    result = _quant(proto, data, speed_rounds=3)
    speed = result.report.figures["speed"]
    assert speed["int8_over_fp32_before_fallback"]["median"] > 1.0
    whole = [t for t in speed["tried"] if t.get("scope") == "model"]
    assert len(whole) == 1 and whole[0]["returned_to_float"] == (whole[0]["float_over_int8"]["low"] <= 1.0
                                                                 or whole[0]["int8_slower_beyond_noise"])
    assert whole[0]["returned_to_float"], whole
    ops = _optimized_ops(result.model)
    assert "QLinearConv" not in ops and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops, ops
    assert result.report.figures["float_compute_int8_weights"] == ops.count("Conv") == 12
    assert "compute in float on int8-stored weights" in result.report.summary
    stored = onnx.ModelProto()
    stored.ParseFromString(serialize_model(result.model))
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in stored.graph.initializer) == 12
    # warned only if timing calls even this float graph slower
    final = speed["int8_over_fp32"]
    from onnxopt.timing import ratio_verdict

    assert bool(result.report.warnings) == (ratio_verdict(final["low"], final["high"], final["median"]) == "slower")
    x = RNG.standard_normal((4, 4, 32, 32)).astype(np.float32)
    ref, got = run_model(proto, {"x": x})[0].ravel(), run_model(result.model, {"x": x})[0].ravel()
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999


def test_speed_fallback_off_keeps_int8_compute_and_float_weights_of_what_it_reverts() -> None:
    proto = transition_bound(blocks=4)
    data = {"x": RNG.standard_normal((16, 4, 32, 32)).astype(np.float32)}
    result = _quant(proto, data, speed_rounds=3, speed_fallback="off")
    speed = result.report.figures["speed"]
    assert not [t for t in speed["tried"] if t.get("scope") == "model"]
    assert result.report.figures["float_compute_int8_weights"] == 0
    assert "QLinearConv" in _optimized_ops(result.model)


def test_int8_weights_only_where_the_model_went_to_float_compute() -> None:
    """On the MobileNetV3-style graph the guard may return region kinds to float and then the whole model. A model
    that stays int8 keeps float32 weights in the kinds it reverted (no extra rounding where the size is already
    won); one switched to float compute stores every conv int8 but those kept float for a reason (the output)."""
    proto = mbv3_net(width=8, blocks=2, size=16)
    data = {"x": RNG.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    result = _quant(proto, data, speed_rounds=3)
    stored = onnx.ModelProto()
    stored.ParseFromString(serialize_model(result.model))
    inits = {t.name: t for t in stored.graph.initializer}
    float_weights = [n.name for n in stored.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
                     and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    switched = any(t.get("scope") == "model" and t["returned_to_float"] for t in result.report.figures["speed"]["tried"])
    decoded = result.report.figures["float_compute_int8_weights"]
    if switched:
        skipped = " ".join(s.target for s in result.report.skipped)
        assert decoded > 0 and all(name in skipped for name in float_weights), (float_weights, skipped)
        assert "QLinearConv" not in _optimized_ops(result.model)
    else:
        assert decoded == 0


def test_weights_on_an_int4_grid_keep_4_bit_storage_in_float_compute() -> None:
    """A clustered (cluster.init=grid) model at opset 21: float compute stores each grid weight as its int4
    levels and steps, exactly, and ORT folds the Cast from int4 at load."""
    from onnxopt.opset import ensure_opset
    from onnxopt_passes.cluster import ClusterConfig, ClusterPass
    from onnxopt_passes.fold import FoldConfig, FoldPass

    proto = mbv3_net(width=8, blocks=1, size=16)
    clustered = ClusterPass().apply(to_ir(proto), ClusterConfig(init="grid", k=16, granularity="channel", min_size=64),
                                    PassContext()).model
    # unpacked to constant weights first, as quant does (fold with max_growth=0)
    unpacked = FoldPass().apply(clustered.clone(), FoldConfig(max_growth=0), PassContext()).model
    model, _ = ensure_opset(unpacked, 21, why="int4 initializers")
    names = frozenset(n.name for n in model.graph if n.op_type in ("Conv", "Gemm"))
    stats = WeightOnlyStats()
    store_int8_decoded(model, names, PlaceContext(), Names(model), stats, int4_grid=True)
    stored = onnx.ModelProto()
    stored.ParseFromString(serialize_model(model))
    int4 = sum(t.data_type == onnx.TensorProto.INT4 for t in stored.graph.initializer)
    assert int4 >= 3 and stats.nodes >= int4
    assert "Cast" not in _optimized_ops(model)  # folded at load
    x = RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)
    # the grid weights are step * level in float32, and the decode computes the same product: exact
    np.testing.assert_allclose(run_model(model, {"x": x})[0], run_model(clustered, {"x": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("int8_low, build, switched", [(1.006, (1.027, 1.014, 1.051), True),
                                                       (0.99, (1.027, 1.014, 1.051), False),
                                                       (0.99, (1.004, 0.98, 1.03), True)],
                         ids=["int8-slower-beyond-noise", "build-slower-than-int8", "both-within-noise"])
def test_int8_slower_with_its_whole_interval_above_1_takes_float_compute_despite_noise(monkeypatch, int8_low: float,
                                                                                      build: tuple[float, float, float],
                                                                                      switched: bool) -> None:
    """The noise seen on the MobileNetV3-style net of benchmarks/quant_vs_peers.py: int8 1.03x fp32 (1.006-1.058),
    under timing's 3% resolution, and the float-compute build timed 1.027x int8. The guard used to keep int8 and
    warn it SLOWER than fp32; with the interval wholly above 1 it now takes the float-compute build (fp32's own
    graph). With an interval that holds 1 it takes that build too unless the build was timed slower than int8
    beyond noise (its interval wholly above 1), and then keeps int8 and warns. The timing is scripted (onnxopt's own
    latency_ratio, not ONNX Runtime) so that the noise band is hit every time; the builds run on real ORT."""
    import onnxopt_passes.quant as quant
    from onnxopt.graph import iter_nodes
    from onnxopt_passes.quant.speed import Ratio

    def has_q(model) -> bool:
        return any(n.op_type == "QuantizeLinear" for n in iter_nodes(model))

    def scripted(candidate, reference, feed, sessions, *, rounds=7) -> Ratio:
        if not has_q(reference):  # against fp32
            return Ratio(1.03, int8_low, 1.058, 70) if has_q(candidate) else Ratio(1.0, 0.99, 1.01, 70)
        if not has_q(candidate):  # the float-compute build against int8: above 1 by noise
            return Ratio(*build, 70)
        return Ratio(1.0, 0.98, 1.02, 70)  # a region kind back to float: no gain, int8 kept

    monkeypatch.setattr(quant, "latency_ratio", scripted)
    proto = mbv3_net(width=8, blocks=2, size=16)
    data = {"x": RNG.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    result = _quant(proto, data, speed_rounds=3)
    whole = [t for t in result.report.figures["speed"]["tried"] if t.get("scope") == "model"]
    assert len(whole) == 1 and whole[0]["int8_slower_beyond_noise"] is (int8_low > 1.0)
    assert whole[0]["returned_to_float"] is switched
    ops = _optimized_ops(result.model)
    if switched:
        assert "QLinearConv" not in ops and "QuantizeLinear" not in ops, ops
        assert result.report.figures["float_compute_int8_weights"] > 0 and not result.report.warnings
    else:
        assert "QLinearConv" in ops and result.report.figures["float_compute_int8_weights"] == 0
        assert any("SLOWER than fp32 by its median" in w for w in result.report.warnings), result.report.warnings
