"""quant: activation rewrites (float-exact, then integer kernels in ORT's optimized graph) and the speed guard."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt.report import RunReport, print_report
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.rewrites import expand_activations

from tests.graphs_quant import activation_chain, mbv3_net, transition_bound
from tests.helpers import run_model, to_ir
from tests.test_quant import _optimized_ops

RNG = np.random.default_rng(0)


def _quant(proto, data, **kw):
    ctx = PassContext(calibration=Dataset("calib", data, batch_size=8))
    return QuantPass().apply(to_ir(proto), QuantConfig(**kw), ctx)


@pytest.mark.parametrize("act", ["HardSwish", "HardSigmoid", "Swish"])
def test_activation_rewrite_is_float_exact(act: str) -> None:
    proto = activation_chain(act)
    model = to_ir(proto)
    assert expand_activations(model) == {act: 1}
    assert act not in [n.op_type for n in model.graph]
    # wide inputs so every branch of the clip (below -3, inside, above +3) is hit
    x = (RNG.standard_normal((4, 3, 8, 8)) * 3).astype(np.float32)
    ref, got = run_model(proto, {"x": x})[0], run_model(model, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("act,kernels", [("HardSwish", {"QLinearAdd", "QLinearMul"}),
                                         ("HardSigmoid", {"QLinearAdd", "QLinearMul"}),
                                         ("Swish", {"QLinearSigmoid", "QLinearMul"})])
def test_rewritten_activation_runs_as_integer_kernels(act: str, kernels: set[str]) -> None:
    proto = activation_chain(act)
    data = {"x": (RNG.standard_normal((32, 3, 8, 8)) * 2).astype(np.float32)}
    result = _quant(proto, data, speed_guard="off", keep_outputs_float=False)  # the last conv quantized too
    ops = _optimized_ops(result.model)
    assert kernels <= set(ops), ops
    # the activation between the two convs costs no conversion: one Quantize at the input, one Dequantize at the output
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    assert not {act, "Clip", "Add", "Mul", "Sigmoid"} & set(ops), ops
    x = (RNG.standard_normal((16, 3, 8, 8)) * 2).astype(np.float32)
    ref, got = run_model(proto, {"x": x})[0].ravel(), run_model(result.model, {"x": x})[0].ravel()
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_expansion_left_wholly_float_is_put_back() -> None:
    proto = activation_chain("HardSwish")
    data = {"x": RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = _quant(proto, data, speed_guard="off", exclude_nodes=("*__qexp_*",))
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("HardSwish") == 1 and "Clip" not in ops and "Add" not in ops, ops
    x = RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)
    ref, got = run_model(proto, {"x": x})[0].ravel(), run_model(result.model, {"x": x})[0].ravel()
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_mbv3_net_quantizes_whole_blocks_into_integer_kernels() -> None:
    proto = mbv3_net(width=8, blocks=2, size=16)
    data = {"x": RNG.standard_normal((32, 3, 16, 16)).astype(np.float32)}
    result = _quant(proto, data, speed_guard="off")
    kernels = result.report.figures["ort_kernel_types"]
    assert kernels.get("QLinearAdd", 0) >= 2 * 2 + 2 and kernels.get("QLinearMul", 0) >= 2 * 2 + 2, kernels
    assert result.report.figures["ort_conversions"] == {"QuantizeLinear": 1}
    assert "HardSwish" not in _optimized_ops(result.model)


def test_int8_slower_than_fp32_is_the_first_line_of_the_report() -> None:
    proto = transition_bound()
    data = {"x": RNG.standard_normal((16, 4, 32, 32)).astype(np.float32)}
    # speed_fallback=off: int8 compute stays (the default would compute in float on int8 weights, see
    # test_quant_float_compute), so the model stays slower and must say so first
    result = _quant(proto, data, speed_fallback="off")
    speed = result.report.figures["speed"]
    ratio = speed["int8_over_fp32"]["median"]
    # Each 1x1 conv over 4 channels pays a Quantize and a Dequantize over the whole tensor and saves
    # nearly nothing: measured around 1.8x here, so "slower" holds well beyond timing noise.
    assert ratio > 1.0
    assert result.report.warnings and "SLOWER than fp32" in result.report.warnings[0]
    assert f"{ratio:.2f}x" in result.report.warnings[0]
    assert result.report.summary.startswith("SLOWER THAN FP32")
    out = io.StringIO()
    print_report(RunReport(input="m.onnx", passes=[result.report]), Console(file=out, width=400))
    assert out.getvalue().splitlines()[0].startswith("WARNING (quant): the int8 model is SLOWER than fp32")


def test_speed_guard_off_times_nothing_and_warns_never() -> None:
    proto = transition_bound(blocks=3)
    data = {"x": RNG.standard_normal((8, 4, 32, 32)).astype(np.float32)}
    result = _quant(proto, data, speed_guard="off")
    assert "speed" not in result.report.figures and not result.report.warnings


def test_speed_guard_records_every_region_kind_it_timed() -> None:
    proto = mbv3_net(width=8, blocks=2, size=16)
    data = {"x": RNG.standard_normal((16, 3, 16, 16)).astype(np.float32)}
    result = _quant(proto, data, speed_rounds=3)
    tried = result.report.figures["speed"]["tried"]
    kinds = {t["kind"] for t in tried}
    assert "Conv+HardSwish" in kinds, kinds
    # HardSwish alone is timed unless it already went back to float with its convs
    assert "HardSwish" in kinds or next(t for t in tried if t["kind"] == "Conv+HardSwish")["returned_to_float"]
    for t in tried:  # a kind goes back to float exactly when its paired ratio's 95% interval is wholly under 1
        assert t["returned_to_float"] == (t["float_over_int8"]["high"] < 1.0)
    # whatever was kept, the warning and the final ratio agree; after the switch to float compute on int8-stored
    # weights (fp32's own graph once ORT folds the decoding) only a ratio onnxopt.timing calls slower warns
    from onnxopt.timing import ratio_verdict

    final = result.report.figures["speed"]["int8_over_fp32"]
    floated = any(t.get("scope") == "model" and t["returned_to_float"] for t in tried)
    slower = ratio_verdict(final["low"], final["high"], final["median"]) == "slower" if floated else final["median"] > 1.0
    assert bool(result.report.warnings) == slower


def test_conv_after_a_float_hardswish_stays_quantized() -> None:
    proto = activation_chain("HardSwish")
    data = {"x": RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    result = _quant(proto, data, speed_guard="off", exclude_nodes=("*__qexp_*",), keep_outputs_float=False)
    assert _optimized_ops(result.model).count("QLinearConv") == 2
    assert not [s for s in result.report.skipped if "Conv" in s.target], result.report.skipped


def test_exported_hardswish_chain_runs_integer_or_goes_back_to_one_hardswish() -> None:
    from tests.graphs_quant import exported_hardswish_chain

    proto = exported_hardswish_chain()
    data = {"x": (RNG.standard_normal((16, 3, 8, 8)) * 2).astype(np.float32)}
    x = (RNG.standard_normal((8, 3, 8, 8)) * 2).astype(np.float32)
    ref = run_model(proto, {"x": x})[0].ravel()
    quantized = _quant(proto, data, speed_guard="off")
    ops = _optimized_ops(quantized.model)
    assert {"QLinearAdd", "QLinearMul"} <= set(ops) and "Clip" not in ops and "Div" not in ops, ops
    assert any("hard-swish chains" in n for n in quantized.report.notes)
    floated = _quant(proto, data, speed_guard="off", exclude_nodes=("*__qexp_hswish*",))
    graph_ops = [n.op_type for n in floated.model.graph]
    assert graph_ops.count("HardSwish") == 1 and not {"Clip", "Div"} & set(graph_ops), graph_ops
    for result in (quantized, floated):
        got = run_model(result.model, {"x": x})[0].ravel()
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_cli_prints_the_slower_warning_first_and_writes_it_to_the_json_report(tmp_path) -> None:
    import json

    import onnx

    from tests.helpers import run_cli

    onnx.save(transition_bound(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((16, 4, 32, 32)).astype(np.float32))
    proc = run_cli("apply", tmp_path / "m.onnx", "--pass", "quant", "--data", tmp_path / "calib.npz",
                   "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json", "--set", "quant.speed_fallback=off")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("WARNING (quant): the int8 model is SLOWER than fp32")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"][0]["warnings"][0].startswith("the int8 model is SLOWER than fp32")


def test_speed_islands_return_single_regions_of_a_slower_model_to_float() -> None:
    """On the transition-bound graph (int8 about 1.8x fp32, far beyond timing noise) the kinds alone cannot help:
    every region holds a conv. With speed_islands the guard times single regions and layers back in float.
    Four blocks, not twelve: one region of twelve is worth ~3% (about the timing noise here, and the test failed on
    it once); one of four is worth 8-20%, which every run decides."""
    proto = transition_bound(blocks=4)
    data = {"x": RNG.standard_normal((16, 4, 32, 32)).astype(np.float32)}
    result = _quant(proto, data, speed_islands=12, speed_rounds=3)
    speed = result.report.figures["speed"]
    assert speed["int8_over_fp32_after_kinds"]["median"] > 1.0  # the stage ran because the model was slower
    regions = [t for t in speed["tried"] if t.get("scope") == "region"]
    assert 0 < len(regions) <= 12
    for t in regions:  # a region goes back to float exactly when its paired ratio's 95% interval is wholly under 1
        assert t["returned_to_float"] == (t["float_over_int8"]["high"] < 1.0)
    back = [t for t in regions if t["returned_to_float"]]
    assert back, regions
    plain = _quant(proto, data, speed_guard="off")
    assert _optimized_ops(result.model).count("QLinearConv") < _optimized_ops(plain.model).count("QLinearConv")


def test_an_output_validation_times_slower_than_its_input_is_warned_first_whatever_the_pass(tmp_path) -> None:
    """With quant's own guard off nothing in the pass says it; validation's timing does (int8 ~1.8x fp32 here)."""
    import json

    import onnx

    from tests.helpers import run_cli

    onnx.save(transition_bound(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((16, 4, 32, 32)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((16, 4, 32, 32)).astype(np.float32))
    proc = run_cli("apply", tmp_path / "m.onnx", "--pass", "quant", "--data", tmp_path / "calib.npz", "--eval",
                   tmp_path / "eval.npz", "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json",
                   "--set", "quant.speed_guard=off", "--set", "quant.speed_fallback=off")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    latency = report["validation"]["latency"]
    assert latency["verdict"] == "slower", latency  # the premise: int8 lost here beyond the timing's resolution
    assert not report["passes"][0]["warnings"]
    assert report["warnings"][0].startswith("the output is SLOWER than the input"), report["warnings"]
    head = " ".join(line.strip("│╭╮╰╯─ ") for line in proc.stdout.splitlines()[:4])  # the boxed first panel
    assert "WARNING" in head and "the output is SLOWER than the input" in head, proc.stdout[:600]
