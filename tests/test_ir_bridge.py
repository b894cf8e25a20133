"""onnxopt passes in onnx-ir's PassManager, and onnx-ir / onnxscript passes as steps of an onnxopt chain."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes as ir_passes
import onnx_ir.passes.common as common
import pytest
from onnx import TensorProto, helper

from onnxopt import PassContext, hookimpl
from onnxopt.errors import OnnxoptError
from onnxopt.ir_bridge import as_ir_pass, from_ir_pass
from onnxopt.manager import plan_passes, run_passes
from onnxopt.plugins import get_plugin_manager, load_registry

from tests.graphs import conv_bn_relu, gemm_chain, init, make_model
from tests.helpers import run_cli, run_model, to_ir

X = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_an_onnxopt_pass_runs_in_onnx_irs_pass_manager() -> None:
    registry = load_registry()
    model = to_ir(conv_bn_relu())
    expected = run_model(model, {"x": X})[0]
    fold = as_ir_pass(registry.get_pass("fold"))
    manager = ir_passes.PassManager([common.IdentityEliminationPass(), fold, common.RemoveUnusedNodesPass(),
                                     common.TopologicalSortPass()])
    result = manager(model)
    assert result.modified and "BatchNormalization" not in _ops(result.model)
    assert "BatchNormalization" in _ops(model)  # functional, as onnxopt's passes are: the input is left alone
    assert fold.report is not None and fold.report.modified
    np.testing.assert_allclose(run_model(result.model, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


def test_an_onnxopt_pass_in_sequential_and_a_skip_keeps_onnx_irs_contract() -> None:
    registry = load_registry()
    model = to_ir(gemm_chain())  # no BatchNorm and no constant to fold: fold finds nothing
    seq = ir_passes.Sequential(as_ir_pass(registry.get_pass("fold")), common.TopologicalSortPass())
    result = seq(model)
    assert result.model is not model and not result.modified
    assert _ops(result.model) == _ops(model)


def _dead_and_noop_model() -> onnx.ModelProto:
    """x -> Mul(x, 1) -> Gemm -> y, plus a Relu no output reads."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Mul", ["x", "one"], ["m"], name="mul1"),
             helper.make_node("Gemm", ["m", "w", "b"], ["y"], transB=1, name="gemm"),
             helper.make_node("Relu", ["x"], ["dead"], name="dead_relu")]
    inits = [init("one", np.array(1.0, np.float32)), init("w", rng.standard_normal((8, 16)).astype(np.float32)),
             init("b", rng.standard_normal(8).astype(np.float32))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)


def test_an_onnx_ir_pass_by_import_path_is_a_step_of_a_cli_chain(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(_dead_and_noop_model().SerializeToString())
    out = tmp_path / "out.onnx"
    proc = run_cli("apply", src, "--pass", "ir:onnx_ir.passes.common.RemoveUnusedNodesPass", "-o", out)
    assert proc.returncode == 0, proc.stderr
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops == ["Mul", "Gemm"]  # the dead Relu went, the rest stayed
    feed = {"x": np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(out, feed)[0], run_model(src, feed)[0])


@pytest.mark.parametrize("name,message", [
    ("ir:onnx_ir.passes.common.NoSuchPass", "not an onnx_ir.passes.PassBase subclass"),
    ("ir:os.path.join", "not an onnx_ir.passes.PassBase subclass"),
    ("ir:no_such_module_xyz.Pass", "cannot import no_such_module_xyz"),
    ("ir:../evil.py", "is not an import path"),
])
def test_a_bad_onnx_ir_pass_path_is_one_clear_error(name: str, message: str) -> None:
    with pytest.raises(OnnxoptError, match=message):
        load_registry().get_pass(name)


def test_an_onnx_ir_pass_that_needs_arguments_is_refused_by_path() -> None:
    """onnxscript's constant folding takes keyword-only arguments: by path it cannot be built, so it is refused
    with the way to register it instead."""
    pytest.importorskip("onnxscript.optimizer")
    with pytest.raises(OnnxoptError, match="needs constructor arguments.*from_ir_pass"):
        load_registry().get_pass("ir:onnxscript.optimizer._constant_folding.FoldConstantsPass")


def test_an_onnxscript_rewriter_step_runs_in_an_onnxopt_chain() -> None:
    rewriter = pytest.importorskip("onnxscript.rewriter")
    from onnxscript.rewriter.rules.common import mul_by_1_rule

    rewrite = from_ir_pass(lambda: rewriter.RewritePass([mul_by_1_rule]), "no-op-mul",
                           "onnxscript's rewriter: drop multiplications by 1.", lossless=True)

    @hookimpl
    def onnxopt_register_passes(register):  # noqa: ANN001, ANN202
        register(rewrite)

    pm = get_plugin_manager(entry_points=False)
    import onnxopt_passes.fold

    pm.register(onnxopt_passes.fold, name="fold")
    pm.register(types.SimpleNamespace(onnxopt_register_passes=onnxopt_register_passes), name="rewrite_plugin")
    registry = load_registry(pm)
    model = to_ir(_dead_and_noop_model())
    out, reports = run_passes(model, plan_passes(registry, ["no-op-mul", "fold"]), PassContext(), registry)
    assert _ops(out) == ["Gemm"]  # the rewriter dropped Mul(x, 1); fold then removed the dead Relu
    assert _ops(model) == ["Mul", "Gemm", "Relu"]  # the chain's input is left as it was
    assert [r.pass_name for r in reports] == ["no-op-mul", "fold"] and reports[0].modified
    feed = {"x": np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(out, feed)[0], run_model(model, feed)[0])
