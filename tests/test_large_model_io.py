"""The core's large-model path on a small model with external data: weights mapped per read, never copied needlessly.

The model is the ``tiny`` preset of ``benchmarks/make_large_model.py`` (the
benchmark transformer's graph, 0.4 MB of weights in a data file). Each test
compares against a reference computed another way: the data file's bytes,
or ONNX Runtime on a file it loads itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from benchmarks.make_large_model import PRESETS, make_large_model, write_inputs
from onnxopt.activations import activation_bytes_per_sample, bounded_batches
from onnxopt.data import load_dataset, input_specs
from onnxopt.gs_bridge import from_gs, to_gs, unfoldable_weights
from onnxopt.io import MappedTensor, load_model, release_pages, save_model
from onnxopt.opset import ensure_opset
from onnxopt.sessions import SessionFactory


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return make_large_model(tmp_path / "tiny.onnx", PRESETS["tiny"])


def _x(samples: int = 2) -> dict[str, np.ndarray]:
    spec = PRESETS["tiny"]
    return {"x": np.random.default_rng(3).standard_normal((samples, spec.seq, spec.hidden), dtype=np.float32)}


def _ort(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_external_weights_are_mapped_read_only_and_their_pages_can_go(tiny: Path) -> None:
    model = load_model(tiny)
    value = model.graph.initializers["layers.0.ffn.up.weight"]
    tensor = value.const_value
    assert isinstance(tensor, MappedTensor)
    array = tensor.numpy()
    raw = np.fromfile(tiny.with_name("tiny.onnx.data"), dtype=np.float32, count=array.size, offset=tensor.offset or 0)
    np.testing.assert_array_equal(array.reshape(-1), raw)
    with pytest.raises(ValueError):
        array[0, 0] = 1.0  # the input model's data cannot be written through a read
    assert tensor.tobytes() == raw.tobytes()
    assert release_pages(array)  # the array stays valid: its pages are read back from the file
    np.testing.assert_array_equal(array.reshape(-1), raw)
    assert not release_pages(np.ones(3))  # not a mapped array: nothing to give back


def test_a_session_reads_unchanged_weights_in_place_and_new_ones_from_memory(tiny: Path, tmp_path: Path) -> None:
    model = load_model(tiny)
    feed = _x()
    session = SessionFactory().create(model)
    np.testing.assert_array_equal(session.run(None, feed)[0], _ort(tiny, feed))
    # a pass's new weight lives in memory: the session must use it, not the file's
    value = model.graph.initializers["lm_head.weight"]
    value.const_value = ir.tensor(value.const_value.numpy() * 2, name="lm_head.weight")
    changed = SessionFactory().create(model).run(None, feed)[0]
    saved = save_model(model, tmp_path / "changed.onnx")
    assert saved.with_name("changed.onnx.data").is_file()
    np.testing.assert_array_equal(changed, _ort(saved, feed))
    np.testing.assert_allclose(changed, 2 * _ort(tiny, feed), rtol=1e-5, atol=1e-5)


def test_opset_upgrade_and_the_graphsurgeon_bridge_leave_big_weights_unread(tiny: Path, tmp_path: Path) -> None:
    model = load_model(tiny)
    big = {v.name: v.const_value for v in model.graph.initializers.values() if v.const_value.nbytes >= 2**16}
    assert big
    hidden = {v.name for v in unfoldable_weights(model)}
    assert set(big) <= hidden  # every big weight here is a MatMul's: no fold can read it
    upgraded, note = ensure_opset(model, 21)
    assert note and all(upgraded.graph.initializers[name].const_value is tensor for name, tensor in big.items())
    back = from_gs(to_gs(upgraded), upgraded)
    assert all(back.graph.initializers[name].const_value is tensor for name, tensor in big.items())
    assert {v.name for v in back.graph.inputs} == {"x"}
    feed = _x()
    np.testing.assert_array_equal(_ort(save_model(back, tmp_path / "back.onnx"), feed), _ort(tiny, feed))


def test_a_large_models_batches_shrink_to_the_activation_budget(tiny: Path, tmp_path: Path) -> None:
    model = load_model(tiny)
    spec = PRESETS["tiny"]
    data = load_dataset(write_inputs(tmp_path / "x.npz", spec, 10), input_specs(model))
    per_sample = activation_bytes_per_sample(model)
    # every intermediate tensor of one sample: at least the FFN's hidden activations of each layer
    assert per_sample >= spec.layers * spec.seq * spec.ffn * 4
    assert bounded_batches(model, data, budget=3 * per_sample).batch_size == 3
    assert bounded_batches(model, data, budget=per_sample // 2).batch_size == 1
    assert bounded_batches(model, data, budget=10**12).batch_size == data.batch_size


def test_dense_cluster_of_a_large_model_spills_its_weights_and_changes_nothing(tiny: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense cluster's output weights are as large as the input's: on a large model each goes to a scratch file as it
    is made (held, they were a second model in memory: 1.49x the 2.4 GB chain with validation), bit for bit the same."""
    from onnxopt import PassContext, apply
    from onnxopt_passes.cluster import ClusterConfig, ClusterPass

    dense = {"cluster": {"mode": "dense"}}
    held = apply(tiny, "cluster", tmp_path / "held.onnx", settings=dense, validate_result=False)
    monkeypatch.setenv("ONNXOPT_SEGMENT_MIN_BYTES", "1")  # what a model of 1 GiB and more gets
    result = ClusterPass().apply(load_model(tiny), ClusterConfig(mode="dense"), PassContext())
    spilled = [v.name for v in result.model.graph.initializers.values()
               if isinstance(v.const_value, MappedTensor) and "onnxopt-scratch-" in str(v.const_value.base_dir)]
    assert spilled and len(spilled) == result.report.figures["tensors"]
    feed = _x()
    np.testing.assert_array_equal(SessionFactory().create(result.model).run(None, feed)[0], _ort(tmp_path / "held.onnx", feed))
    run = apply(tiny, "cluster", tmp_path / "spilled.onnx", settings=dense, eval_data=None)
    assert run.written and run.validation is not None and run.validation.drop > 0
    np.testing.assert_array_equal(_ort(tmp_path / "spilled.onnx", feed), _ort(tmp_path / "held.onnx", feed))
    assert held.passes[0].figures["tensors"] == run.passes[0].figures["tensors"]
