"""Model I/O: safe loading of external data, weights normalised to initializers, atomic saves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxopt.errors import OnnxoptError
from onnxopt.io import has_external_data, load_model, save_model
from onnxopt.measure import weight_storage

from tests.graphs import gemm_chain, init, make_model
from tests.helpers import run_model


def _external_model(folder: Path, location: str = "w.data") -> Path:
    proto = gemm_chain((16, 32, 8))
    path = folder / "m.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def _relocate(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


def test_external_data_stays_mapped_and_round_trips(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    model = load_model(path)
    assert has_external_data(model)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    save_model(model, out)
    assert (out.parent / "o.onnx.data").is_file()
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], run_model(gemm_chain((16, 32, 8)), {"x": x})[0], rtol=1e-6)


@pytest.mark.parametrize("location,message", [("/etc/passwd", "absolute"), ("../w.data", "'..'"), ("gone.data", "not found")])
def test_unsafe_or_missing_external_data_refused(tmp_path: Path, location: str, message: str) -> None:
    path = _external_model(tmp_path)
    _relocate(path, location)
    with pytest.raises(OnnxoptError, match=message):
        load_model(path)


def test_symlink_escaping_folder_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _external_model(tmp_path)
    os.replace(path, inner / "m.onnx")
    os.symlink(tmp_path / "w.data", inner / "link.data")
    _relocate(inner / "m.onnx", "link.data")
    with pytest.raises(OnnxoptError, match="outside the model's folder"):
        load_model(inner / "m.onnx")


def test_truncated_external_data_refused(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OnnxoptError, match="truncated"):
        load_model(path)


def test_constants_and_constant_of_shape_become_initializers(tmp_path: Path) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
        helper.make_node("ConstantOfShape", ["shape"], ["b"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [init("shape", np.array([4], np.int64))])
    model = ir.serde.deserialize_model(proto)
    raw = weight_storage(model)
    assert raw.constant_nodes == 1 and raw.constant_of_shape_nodes == 1
    onnx.save(proto, str(tmp_path / "c.onnx"))
    loaded = load_model(tmp_path / "c.onnx")
    assert [n.op_type for n in loaded.graph] == ["MatMul", "Add"]
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), w)
    np.testing.assert_array_equal(loaded.graph.initializers["b"].const_value.numpy(), np.full(4, 0.5, np.float32))
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(run_model(loaded, {"x": x})[0], run_model(proto, {"x": x})[0])


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(gemm_chain())
    model.graph.node(0).op_type = "NoSuchOp"  # the checker refuses it before anything is renamed into place
    with pytest.raises(OnnxoptError, match="invalid model"):
        save_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_existing_output_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    save_model(ir.serde.deserialize_model(gemm_chain()), out)
    assert onnx.load(str(out)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
