"""Regression tests for the node-test sweep's findings (issue 15), each on a tiny hand-built graph."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.config import build_config
from onnxopt.data import InputSpec, load_dataset, input_specs, synthetic_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.io import load_model, save_model
from onnxopt.node_corpus import NodeCase, NodeRun, run_cases, write_case
from onnxopt.opset import ensure_opset
from onnxopt.pass_api import PassContext
from onnxopt.plugins import load_registry
from tests.graphs import _vi, init, make_model, streaming_if_model
from tests.helpers import run_cli, run_model


def _fold(proto: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    path = tmp_path / "in.onnx"
    onnx.save(proto, str(path))
    fold = load_registry().passes["fold"]
    result = fold().apply(load_model(path), build_config(fold.Config, {}, pass_name="fold"), PassContext())
    save_model(result.model, tmp_path / "out.onnx")
    return onnx.load(str(tmp_path / "out.onnx"))


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("attrs", [{"start": 1}, {"end": -1}, {"start": 1, "end": 2}, {"start": -2}, {"start": 5}])
def test_fold_shape_start_end_is_exact(attrs: dict[str, int], tmp_path: Path) -> None:
    # graphsurgeon folded Shape(x, start=...) into the whole shape: 3 values where 2 (or 1, or 0) were asked for
    proto = make_model([helper.make_node("Shape", ["x"], ["s"], **attrs), helper.make_node("Identity", ["s"], ["y"])],
                       [_vi("x", [2, 3, 4])], [_vi("y", ["k"], TensorProto.INT64)])
    x = np.zeros((2, 3, 4), np.float32)
    folded = _fold(proto, tmp_path)
    assert "Shape" not in _ops(folded), "a fully static Shape is folded"
    expected = run_model(proto, {"x": x})[0]
    got = run_model(folded, {"x": x} if folded.graph.input else {})[0]
    assert got.tolist() == expected.tolist() == list((2, 3, 4)[slice(attrs.get("start"), attrs.get("end"))])


def test_fold_takes_only_known_dims_of_a_partly_free_shape(tmp_path: Path) -> None:
    # Shape(x, start=1) of x[N,3,4]: [3,4] is known although N is not; Gather/Slice of a whole Shape likewise
    nodes = [
        helper.make_node("Shape", ["x"], ["tail"], start=1),
        helper.make_node("Shape", ["x"], ["full"]),
        helper.make_node("Gather", ["full", "minus_one"], ["last"], axis=0),
        helper.make_node("Slice", ["full", "one", "big"], ["rest"]),
        helper.make_node("Shape", ["x"], ["head"], end=1),  # N: must stay a Shape node
        helper.make_node("Concat", ["tail", "last", "rest", "head"], ["y"], axis=0),
    ]
    proto = make_model(nodes, [_vi("x", ["N", 3, 4])], [_vi("y", ["k"], TensorProto.INT64)],
                       [init("minus_one", np.array([-1], np.int64)), init("one", np.array([1], np.int64)),
                        init("big", np.array([2**62], np.int64))])
    folded = _fold(proto, tmp_path)
    assert _ops(folded).count("Shape") == 1, _ops(folded)
    for n in (1, 5):
        x = np.zeros((n, 3, 4), np.float32)
        assert run_model(folded, {"x": x})[0].tolist() == run_model(proto, {"x": x})[0].tolist() == [3, 4, 4, 3, 4, n]


def test_fold_leaves_random_ops(tmp_path: Path) -> None:
    # folding RandomUniform would freeze one draw into the model
    proto = make_model([helper.make_node("RandomUniform", [], ["r"], shape=[4], dtype=TensorProto.FLOAT),
                        helper.make_node("Add", ["x", "r"], ["y"])], [_vi("x", [4])], [_vi("y", [4])])
    assert "RandomUniform" in _ops(_fold(proto, tmp_path))


def test_fold_never_materialises_a_huge_constant_of_shape(tmp_path: Path) -> None:
    # 172 bytes of model asking for 4 GB: inspect took 3.9 GiB, prune wrote a 4 GB file
    proto = make_model([helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                        helper.make_node("Add", ["x", "s"], ["y"])],
                       [_vi("x", [1])], [_vi("y", [1])], [init("shape", np.array([1000, 1000000], np.int64))])
    path = tmp_path / "big.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    assert all(v.const_value is None or v.const_value.size < 10 for v in model.graph.initializers.values())
    folded = _fold(proto, tmp_path)
    assert "ConstantOfShape" in _ops(folded)
    assert (tmp_path / "out.onnx").stat().st_size < 10_000
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr


def _node_case(proto: onnx.ModelProto, feed: list[np.ndarray], name: str) -> NodeCase:
    expected = run_model(proto, {i.name: x for i, x in zip(proto.graph.input, feed)})
    return NodeCase(name, proto, feed, expected)


def _check(case: NodeCase, labels: list[str], workdir: Path, keep: bool = False) -> dict[str, NodeRun]:
    """The node-corpus verdicts of ``labels`` on ``case`` (each run a child process, as in the sweep)."""
    (runs,) = list(run_cases([case], labels, workdir, keep=keep))
    return {r.label: r for r in runs}


def test_streaming_if_pattern_goes_through_every_pass(tmp_path: Path) -> None:
    # a two-output If whose branches hold nested Ifs reading outer-scope weights (a real streaming audio model):
    # fold wrote it out of topological order, so nothing could be compressed
    proto = streaming_if_model()
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) + 0.5
    labels = list(load_registry().passes)
    runs = _check(_node_case(proto, [x], "stream"), labels, tmp_path, keep=True)
    assert {label: r.status for label, r in runs.items() if r.status != "ok"} == {}, {k: r.detail for k, r in runs.items()}
    assert runs["fold"].changed and runs["quant"].changed and runs["cluster"].changed
    folded = onnx.load(str(tmp_path / "0" / "stream" / f"out-{labels.index('fold')}.onnx"))
    inner = [n.op_type for node in folded.graph.node for a in node.attribute if a.g.node for n in a.g.node]
    assert "Shape" not in inner and "If" in inner, inner  # the branch shape arithmetic folded, the nesting kept


def test_declared_sequence_types_in_subgraphs_survive_load(tmp_path: Path) -> None:
    # shape inference turned a branch's sequence value into a tensor: ORT then refused the saved model
    seq_t = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    opt_t = helper.make_optional_type_proto(seq_t)
    then_g = helper.make_graph([helper.make_node("SequenceConstruct", ["x"], ["s_then"]),
                                helper.make_node("Optional", ["s_then"], ["o_then"])], "then", [],
                               [helper.make_value_info("o_then", opt_t)])
    else_g = helper.make_graph([helper.make_node("Optional", [], ["o_else"], type=seq_t)], "else", [],
                               [helper.make_value_info("o_else", opt_t)])
    proto = make_model([helper.make_node("If", ["c"], ["o"], then_branch=then_g, else_branch=else_g)],
                       [_vi("x", [2]), _vi("c", [], TensorProto.BOOL)], [helper.make_value_info("o", opt_t)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    save_model(load_model(path), tmp_path / "saved.onnx")
    out = run_model(tmp_path / "saved.onnx", {"x": np.ones(2, np.float32), "c": np.array(True)})
    assert np.array_equal(out[0][0], np.ones(2, np.float32))


def test_test_data_loader_reads_sequences_and_optionals(tmp_path: Path) -> None:
    seq_t = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    opt_t = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    proto = make_model([helper.make_node("SequenceLength", ["s"], ["n"]), helper.make_node("OptionalHasElement", ["o"], ["h"])],
                       [helper.make_value_info("s", seq_t), helper.make_value_info("o", opt_t)],
                       [_vi("n", [], TensorProto.INT64), _vi("h", [], TensorProto.BOOL)])
    values = [[np.ones(2, np.float32), np.zeros(2, np.float32)], np.full(2, 3.0, np.float32)]
    write_case(NodeCase("seq", proto, values, [np.array(2), np.array(True)]), tmp_path)
    dataset = load_dataset(tmp_path, input_specs(load_model(tmp_path / "model.onnx")))
    feed = next(dataset.batches())
    assert isinstance(feed["s"], list) and len(feed["s"]) == 2 and feed["o"].tolist() == [3.0, 3.0]
    assert len(dataset) == 1


def test_no_validate_builds_no_data(tmp_path: Path) -> None:
    # a scalar input and inputs with different fixed first dims: building synthetic data crashed with IndexError
    proto = make_model([helper.make_node("ReduceSum", ["a"], ["sa"], keepdims=0), helper.make_node("ReduceSum", ["b"], ["sb"], keepdims=0),
                        helper.make_node("Add", ["sa", "sb"], ["t"]), helper.make_node("Add", ["t", "k"], ["y"])],
                       [_vi("a", [3, 4]), _vi("b", [5, 2]), _vi("k", [])], [_vi("y", [])])
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    result = run_cli("apply", path, "--pass", "fold", "--no-validate", "-q", "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    # and when validation does build synthetic data, each feed has its own fixed batch and one scalar
    specs = [InputSpec("a", np.dtype(np.float32), (3, 4)), InputSpec("b", np.dtype(np.float32), (5, 2)),
             InputSpec("k", np.dtype(np.float32), ())]
    feeds = list(synthetic_dataset(specs, samples=3).batches())
    assert [{k: v.shape for k, v in f.items()} for f in feeds] == [{"a": (3, 4), "b": (5, 2), "k": ()}] * 3
    result = run_cli("apply", path, "--pass", "fold", "-q", "-o", tmp_path / "out2.onnx")
    assert result.returncode == 0, result.stderr


def test_npz_decompression_is_capped(tmp_path: Path) -> None:
    # a few hundred kB of zipped zeros claiming 400 MB: refused from the zip headers, before any array is read
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (100, 1000, 1000)})
            chunk = bytes(2**20)
            for _ in range(400):
                member.write(chunk)
    assert bomb.stat().st_size < 2_000_000
    specs = [InputSpec("x", np.dtype(np.float32), ("N", 1000, 1000))]
    result_env = {"ONNXOPT_MAX_DATA_BYTES": str(100 * 2**20)}
    import os

    old = os.environ.get("ONNXOPT_MAX_DATA_BYTES")
    os.environ.update(result_env)
    try:
        with pytest.raises(OnnxoptError) as err:
            load_dataset(bomb, specs)
    finally:
        if old is None:
            del os.environ["ONNXOPT_MAX_DATA_BYTES"]
        else:
            os.environ["ONNXOPT_MAX_DATA_BYTES"] = old
    message = str(err.value)
    assert "104,857,600-byte limit" in message and "ONNXOPT_MAX_DATA_BYTES" in message and "\n" not in message


def test_training_mode_nodes_are_warned_about(tmp_path: Path) -> None:
    proto = make_model([helper.make_node("Dropout", ["x", "ratio", "train"], ["y"])], [_vi("x", [2, 8])], [_vi("y", [2, 8])],
                       [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))])
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    result = run_cli("apply", path, "--pass", "fold", "--no-validate", "-q", "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert "training mode" in result.stderr and "warning:" in result.stderr


def test_opset_upgrade_of_a_model_without_standard_ops_is_a_plain_import(tmp_path: Path) -> None:
    # quant on an ai.onnx.ml-only model printed the converter's C++ assert and advised re-exporting
    graph = helper.make_graph([helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")], "ml",
                              [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    proto.ir_version = 9
    path = tmp_path / "ml.onnx"
    onnx.save(proto, str(path))
    model, note = ensure_opset(load_model(path), 13)
    assert model.opset_imports[""] == 13 and "no ai.onnx ops" in (note or "")
    save_model(model, tmp_path / "out.onnx")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.allclose(run_model(tmp_path / "out.onnx", {"x": x})[0], run_model(proto, {"x": x})[0])


def test_affine_grid_outer_scope_branches_go_through_fold_and_quant(tmp_path: Path) -> None:
    # onnx's own node test: If branches read outer-scope values. fold printed onnx-ir lines before its rc-2
    # line (graphsurgeon's If flattening left nodes out of order); quant died in clone_graph
    from onnxopt.node_corpus import node_cases

    case = node_cases(names=["test_affine_grid_2d_expanded"])[0]
    runs = _check(case, ["fold", "quant"], tmp_path)
    # folding its shape arithmetic lets ORT's load-time checks see a 1-element Range input: fold gives that fold up
    assert runs["fold"].status == "ok" and "expected outputs" in runs["fold"].detail, runs["fold"].detail
    assert runs["quant"].status == "ok", runs["quant"].detail


def test_sequence_input_data_goes_through_prune_and_lowrank(tmp_path: Path) -> None:
    # once the loader read sequence .pb files, prune and lowrank took the list feed for an array (rc 1)
    seq_t = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    proto = make_model([helper.make_node("SequenceAt", ["s", "zero"], ["t"]), helper.make_node("MatMul", ["t", "w"], ["y"])],
                       [helper.make_value_info("s", seq_t)], [_vi("y", [4])],
                       [init("zero", np.array(0, np.int64)), init("w", np.ones((2, 4), np.float32))])
    values = [[np.ones(2, np.float32), np.zeros(2, np.float32)]]
    runs = _check(NodeCase("seq_in", proto, values, [np.full(4, 2.0, np.float32)]), ["prune", "lowrank"], tmp_path)
    assert {label: r.status for label, r in runs.items()} == {"prune": "ok", "lowrank": "ok"}, runs


def test_cleanup_keeps_optional_outputs_ort_ties_to_inputs() -> None:
    """An Attention reading past_key/past_value whose present_* outputs nobody reads keeps them through cleanup.

    ONNX allows leaving them out, but ONNX Runtime's kernel requires them whenever the past is given; onnx-ir's
    dead-code pass trimmed them, and distill's fused graph (the teacher's copy) then failed at run time.
    """
    import onnx_ir as ir

    from onnxopt.graph import cleanup
    from onnxopt.node_corpus import node_cases, with_weights

    case = with_weights(node_cases(names=["test_attention_4d_with_past_and_present_qk_matmul_bias_3d_mask"])[0])
    assert case is not None
    proto = onnx.ModelProto()
    proto.CopyFrom(case.model)
    del proto.graph.output[1:]  # only Y leaves the graph: the present_* and qk outputs are unused
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    (attention,) = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attention.outputs) == 4
    feed = {"Q": case.inputs[0]}
    (got,) = run_model(model, feed)
    (expected,) = run_model(proto, feed)
    np.testing.assert_array_equal(got, expected)


def test_quant_takes_a_vector_weight_of_matmul(tmp_path: Path) -> None:
    # MatMul(x[K], w[K]) (onnx's test_matmul_1d_1d with w an initializer): the saturation check took every
    # weight for a matrix (numpy AxisError, rc 1)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [3])], [_vi("y", [])],
                       [init("w", np.array([0.5, -1.0, 2.0], np.float32))])
    case = _node_case(proto, [np.array([1.0, 2.0, 3.0], np.float32)], "dot")
    runs = _check(case, ["quant", "quant[keep_outputs_float=False]"], tmp_path)
    assert {label: (r.status, r.changed) for label, r in runs.items()} == {
        "quant": ("ok", True), "quant[keep_outputs_float=False]": ("ok", True)}, runs


def test_distill_refuses_logits_with_no_class(tmp_path: Path) -> None:
    # a student output whose last axis is declared 0 (onnx's test_reshape_allowzero_reordered: [3, 4, 0]):
    # distill wrote a model whose losses ORT cannot run (GatherElements into an empty class axis)
    proto = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)], [_vi("x", [0, 3, 4])],
                       [_vi("y", [3, 4, 0])], [init("shape", np.array([3, 4, 0], np.int64))], opset=14)
    case = _node_case(proto, [np.zeros((0, 3, 4), np.float32)], "empty")
    runs = _check(case, ["distill"], tmp_path)
    assert runs["distill"].status == "refused" and "0 classes" in runs["distill"].detail, runs["distill"]


def test_lossy_runs_may_move_dims_that_follow_values(tmp_path: Path) -> None:
    # fp16 weights (min_elements=1) round NonMaxSuppression's boxes in onnx's iou_threshold_boundary test: one box
    # fewer is selected. That is a lossy pass changing a result, not the interface: count, dtypes and ranks hold
    from onnxopt.node_corpus import _compare, node_cases, with_weights

    two, one = [np.zeros((2, 3), np.int64)], [np.zeros((1, 3), np.int64)]
    assert _compare("fp16", two, two, one, False, True, ["NonMaxSuppression"])[0] == "ok"
    assert _compare("fp16", two, two, one, False, True)[0] == "bad"  # a fixed shape still may not move
    assert _compare("fp16", two, two, [np.zeros((1, 3), np.int32)], False, True, ["NonMaxSuppression"])[0] == "bad"
    assert _compare("fp16", two, two, [np.zeros(3, np.int64)], False, True, ["NonMaxSuppression"])[0] == "bad"
    case = with_weights(node_cases(names=["test_nonmaxsuppression_iou_threshold_boundary"])[0])
    assert case is not None
    runs = _check(case, ["fp16[min_elements=1]"], tmp_path)
    assert runs["fp16[min_elements=1]"].status == "ok" and runs["fp16[min_elements=1]"].changed, runs


def test_an_opset_upgrade_that_changes_the_interface_is_refused(tmp_path: Path) -> None:
    # Scan-8 carries a batch axis that Scan-9 dropped: onnx's version converter strips it from the graph's inputs
    # ([1, 3, 2] -> [3, 2]), so distill's upgraded model no longer took the original's inputs (ORT: invalid rank)
    from onnxopt.node_corpus import node_cases

    case = node_cases(names=["test_scan_sum"])[0]
    runs = _check(case, ["distill", "quant", "fold"], tmp_path)
    for label in ("distill", "quant"):
        assert runs[label].status == "refused" and "changes its interface" in runs[label].detail, runs[label]
    assert runs["fold"].status == "ok", runs["fold"]  # fold needs no upgrade


def test_fp16_on_a_graph_without_ai_onnx_ops_imports_the_opset_for_its_casts(tmp_path: Path) -> None:
    # onnx's training-domain tests (test_momentum[weights]: only an ai.onnx.preview.training op): fp16's Casts
    # left the model without an ai.onnx opset import, and the save check refused it as "a bug in the pass"
    from onnxopt.node_corpus import node_cases, with_weights

    case = with_weights(node_cases(names=["test_momentum"])[0])
    assert case is not None
    runs = _check(case, ["fp16[min_elements=1]"], tmp_path)
    assert runs["fp16[min_elements=1]"].status == "ok" and runs["fp16[min_elements=1]"].changed, runs
