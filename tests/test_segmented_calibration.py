"""Calibration of a large model a segment at a time: the same ranges as one session, with a residual branch
crossing segment boundaries and the model's input read again in a later segment."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt import activations
from onnxopt.data import Dataset
from onnxopt.io import load_model
from onnxopt.sessions import SessionFactory
from onnxopt_passes.quant.calibration import collect_ranges

from tests.graphs import init, make_model

RNG = np.random.default_rng(11)


def _residual_chain(tmp_path, width: int = 64, layers: int = 6):
    """x -> MatMul -> Relu -> (+ skip from two layers back) ... -> + x at the end; weights external."""
    nodes, inits, prev, skip = [], [], "x", "x"
    for i in range(layers):
        inits.append(init(f"w{i}", (RNG.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
        if i % 2 == 1:
            nodes.append(helper.make_node("Add", [prev, skip], [f"s{i}"], name=f"add{i}"))
            prev = skip = f"s{i}"
    nodes.append(helper.make_node("Add", [prev, "x"], ["y"], name="out"))  # the input read again at the very end
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    path = tmp_path / "chain.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="chain.data",
              size_threshold=0)
    return load_model(path)


def test_segmented_ranges_equal_one_session(tmp_path, monkeypatch) -> None:
    model = _residual_chain(tmp_path)
    data = Dataset("test", {"x": RNG.standard_normal((24, 64)).astype(np.float32)}, batch_size=8)
    names = ["x", *(f"m{i}" for i in range(6)), "s1", "s3", "s5", "y"]
    whole = collect_ranges(model, names, data, SessionFactory(), method="minmax")

    monkeypatch.setattr(activations, "SEGMENT_MIN_BYTES", 1)  # every model is "large"
    monkeypatch.setattr(activations, "SEGMENT_SHARE", 0.2)  # one 64x64 weight per segment
    exposed = activations.expose_values(model, names)
    segments = activations._segments(exposed)
    assert segments is not None and len(segments) >= 5  # really segmented
    parts = list(activations.iter_activation_parts(model, names, data, SessionFactory()))
    seen = {name for part in parts for name in part}
    assert seen == set(names)
    assert sum(len(part.get("m3", ())) for part in parts) == 24  # every sample of every value, once
    segmented = collect_ranges(model, names, data, SessionFactory(), method="minmax")
    assert segmented.keys() == whole.keys() == set(names)
    for name in names:
        np.testing.assert_allclose(segmented[name], whole[name], rtol=1e-6, err_msg=name)
