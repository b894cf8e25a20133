"""Static int8 on a plain chain of MatMuls over a wide (4096) input, with external weights: every MatMul quantized.

Regression: the DSP front-end rule took any rank-2 float input of 4000+ values
for a raw audio signal and kept every MatMul after it float (a chain has no
non-linearity to end the "front end"), and the pass then said "no
Conv/MatMul/Gemm with constant float weights". A 2.4 GB model of MatMuls on
4096-wide hidden states was left unchanged with a success exit.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt import PassContext
from onnxopt.api import apply
from onnxopt.data import Dataset
from onnxopt_passes.quant import QuantConfig, QuantPass

from tests.graphs import init, make_model
from tests.helpers import run_model, to_ir

RNG = np.random.default_rng(3)
WIDTH = 4096  # the width the 2.4 GB model's hidden states had: the rule's threshold is 4000


def _chain(sizes: tuple[int, ...] = (WIDTH, 32, 32, 16)) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits.append(init(f"w{i}", (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                      [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", sizes[-1]])], inits)


def test_wide_matmul_chain_with_external_weights_is_quantized(tmp_path) -> None:
    proto = _chain()
    path = tmp_path / "chain.onnx"
    onnx.save(onnx.ModelProto.FromString(proto.SerializeToString()), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="chain.data",
              size_threshold=0)
    x = RNG.standard_normal((32, WIDTH)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:16])
    np.savez(tmp_path / "eval.npz", x=x[16:])
    out = tmp_path / "q.onnx"
    run = apply(path, "quant", out, data=tmp_path / "calib.npz", eval_data=tmp_path / "eval.npz")
    (report,) = run.passes
    assert report.modified, report.summary
    assert sorted(i["node"] for i in report.items if i["op"] == "MatMul") == ["mm0", "mm1", "mm2"]
    # the written model runs integer MatMuls and stays close to the original on held-out inputs
    written = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in written.graph.node) >= 3
    (ref,) = run_model(proto, {"x": x[16:]})
    (got,) = run_model(str(out), {"x": x[16:]})
    rel = float(np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean()))
    assert rel < 0.1, rel


def test_audio_front_end_still_kept_float_on_framed_signal() -> None:
    """The rule still holds for a real front end: framing (Reshape) then a DFT MatMul, then a filterbank."""
    frames, win, bins = 16, 256, 32
    nodes = [helper.make_node("Reshape", ["audio", "shape"], ["framed"]),
             helper.make_node("MatMul", ["framed", "dft"], ["spec"], name="dft_mm"),
             helper.make_node("Mul", ["spec", "spec"], ["power"]),
             helper.make_node("MatMul", ["power", "mel"], ["melspec"], name="mel_mm"),
             helper.make_node("MatMul", ["melspec", "learned"], ["y"], name="learned_mm")]
    inits = [init("shape", np.array([0, frames, win], np.int64)),
             init("dft", RNG.standard_normal((win, bins)).astype(np.float32)),
             init("mel", np.abs(RNG.standard_normal((bins, 8))).astype(np.float32)),
             init("learned", RNG.standard_normal((8, 4)).astype(np.float32))]
    proto = make_model(nodes, [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", frames * win])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", frames, 4])], inits)
    data = {"audio": RNG.standard_normal((8, frames * win)).astype(np.float32)}
    # speed_fallback=off: placement under test (the tiny learned layer may not pay in int8 on this CPU)
    result = QuantPass().apply(to_ir(proto), QuantConfig(speed_fallback="off"),
                               PassContext(calibration=Dataset("t", data, batch_size=8)))
    reasons = {s.target: s.reason for s in result.report.skipped}
    assert "DSP front end" in reasons["MatMul dft_mm"] and "DSP front end" in reasons["MatMul mel_mm"]
    # past the transform and the filterbank the learned network has started
    assert [i["node"] for i in result.report.items if i["op"] == "MatMul"] == ["learned_mm"]


def test_whole_model_skip_names_the_real_reason() -> None:
    proto = _chain((64, 16, 8))
    data = {"x": RNG.standard_normal((8, 64)).astype(np.float32)}
    result = QuantPass().apply(to_ir(proto), QuantConfig(exclude_ops=("MatMul",)),
                               PassContext(calibration=Dataset("t", data, batch_size=8)))
    assert not result.modified
    assert "none of 2 Conv/MatMul/Gemm" in result.report.summary and "exclude_ops has MatMul" in result.report.summary
