"""A large run (external data) writes its candidate first and validates it from that file; the gate still decides.

The candidate is staged beside -o, let go, and read back memory-mapped for
validation (one ORT session at a time); it is renamed into place only when
the budget holds, and nothing is left behind otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.api import apply

from tests.graphs import init, make_model
from tests.helpers import confirmation_part, run_model

RNG = np.random.default_rng(5)


def _external_model(tmp_path):
    # rows of a few wide features then a 10-way classifier: top-1 agreement is the drop, cluster at k=2 breaks it
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="mm1")]
    inits = [init("w0", RNG.standard_normal((64, 128)).astype(np.float32)),
             init("w1", RNG.standard_normal((128, 10)).astype(np.float32))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(onnx.ModelProto.FromString(proto.SerializeToString()), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((64, 64)).astype(np.float32))
    return proto, path


def test_large_run_validates_the_written_candidate(tmp_path) -> None:
    proto, path = _external_model(tmp_path)
    out = tmp_path / "out" / "c.onnx"
    out.parent.mkdir()
    run = apply(path, "cluster", out, settings={"cluster": {"k": 16, "min_size": 16, "mode": "dense"}},
                eval_data=tmp_path / "eval.npz")
    assert run.written and run.validation is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.onnx", "c.onnx.data"]  # staging folder gone
    # the figures are those of the file that was written
    x = confirmation_part(tmp_path / "eval.npz")["x"]  # what apply validates on
    (ref,), (got,) = run_model(proto, {"x": x}), run_model(str(out), {"x": x})
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    assert run.validation.drop == pytest.approx(1.0 - agreement)
    assert run.validation.candidate.size_bytes == sum(p.stat().st_size for p in out.parent.iterdir())


def test_large_run_over_budget_writes_nothing(tmp_path) -> None:
    _, path = _external_model(tmp_path)
    out = tmp_path / "out" / "c.onnx"
    out.parent.mkdir()
    run = apply(path, "cluster", out, settings={"cluster": {"k": 2, "min_size": 16, "mode": "dense"}},
                eval_data=tmp_path / "eval.npz", max_drop=0.0, rollback=False)  # the gate decides, no rollback
    assert run.validation is not None and run.validation.drop > 0
    assert run.gate_passed is False and not run.written
    assert list(out.parent.iterdir()) == []  # the staged candidate was removed
