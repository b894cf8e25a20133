"""prune on onnx's shipped "light" model zoo: full-size CNNs whose weights come from ConstantOfShape.

Their weights are all equal (scores tie), so these tests check structure,
not accuracy: every model comes out valid, smaller and runnable on ONNX
Runtime; and with random weights put in, the pruned model computes exactly
what the dense one computes once the readers' columns of the removed
channels are zeroed, which is what removing a channel means.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import PassContext
from onnxopt.graph import Names, constant_array, is_onnx_op, replace_input_weight
from onnxopt.io import load_model, serialize_model
from onnxopt.measure import count_parameters
from onnxopt_passes.prune import PruneConfig, PrunePass
from onnxopt_passes.prune.constants import fold_constant_chains
from onnxopt_passes.prune.distribution import Limits, build_keep, uniform_plan
from onnxopt_passes.prune.groups import SliceInput
from onnxopt_passes.prune.ops import discover
from onnxopt_passes.prune.saliency import magnitude_scores, ranking
from onnxopt_passes.prune.surgery import apply_surgery, kept_mask

from tests.helpers import run_model

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem for p in LIGHT.glob("light_*.onnx"))


def _input(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    value = next(v for v in model.graph.inputs if v.const_value is None)
    shape = [d if isinstance(d, int) else 1 for d in value.shape.dims]  # type: ignore[union-attr]
    return {value.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}  # type: ignore[dict-item]


def test_zoo_is_present() -> None:
    assert {"light_resnet50", "light_vgg19", "light_shufflenet", "light_densenet121"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_prunes_to_a_valid_smaller_runnable_model(name: str) -> None:
    model = load_model(LIGHT / f"{name}.onnx")
    result = PrunePass().apply(model, PruneConfig(ratio=0.5), PassContext())
    assert result.modified, result.report.summary
    before, after = count_parameters(model), count_parameters(result.model)
    assert after < 0.6 * before, (name, before, after)
    data = serialize_model(result.model)
    onnx.checker.check_model(onnx.load_from_string(data))
    expected = onnx.load_tensor(str(LIGHT / f"{name}_output_0.pb"))
    (out,) = run_model(result.model, _input(model))[:1]
    assert list(out.shape) == list(expected.dims)


def _randomize(model: ir.Model, rng: np.random.Generator) -> None:
    names = Names(model)
    for node in model.graph:
        for i, value in enumerate(node.inputs):
            array = constant_array(value)
            if array is None or array.dtype != np.float32 or array.size <= 1:
                continue
            if is_onnx_op(node, "BatchNormalization") and i == 4:
                new = rng.uniform(0.5, 2.0, array.shape)
            else:
                new = rng.standard_normal(array.shape) / np.sqrt(max(array[0].size if array.ndim > 1 else 1, 1))
            replace_input_weight(node, i, new.astype(np.float32), names)


def _zero_removed_inputs(model: ir.Model, keep: np.ndarray) -> ir.Model:
    """A dense copy whose readers ignore the removed channels (their weight columns zeroed)."""
    copy = model.clone()
    cg = discover(copy)
    names = Names(copy)
    for edit in cg.edits:
        node = edit.node
        if not (isinstance(edit, SliceInput) and edit.index == 1 and edit.value is node.inputs[0]
                and is_onnx_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul")):
            continue
        mask = kept_mask(cg, keep, edit.value)
        if edit.blocks > 1:
            mask = mask.reshape(edit.blocks, -1)[0]
        w = constant_array(node.inputs[1]).copy()  # type: ignore[union-attr]
        index: list[slice | np.ndarray] = [slice(None)] * w.ndim
        index[edit.axis] = ~mask
        w[tuple(index)] = 0
        replace_input_weight(node, 1, w, names)
    return copy


@pytest.mark.parametrize("name", ["light_shufflenet", "light_squeezenet", "light_inception_v2", "light_resnet50"])
def test_zoo_pruning_equals_zeroed_readers(name: str) -> None:
    model = load_model(LIGHT / f"{name}.onnx")
    fold_constant_chains(model)
    _randomize(model, np.random.default_rng(0))
    pruned = model.clone()
    cg = discover(pruned)
    groups = cg.groups()
    keep = build_keep(cg, groups, ranking(groups, magnitude_scores(cg, 1)), uniform_plan(groups, 0.5, Limits(round_to=1)))
    reference = _zero_removed_inputs(model, keep)
    apply_surgery(pruned, cg, keep)
    feed = _input(model, 1)
    got, want = run_model(pruned, feed)[0], run_model(reference, feed)[0]
    dense = run_model(model, feed)[0]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert np.abs(dense - want).max() > 1e-2 * scale  # channels really went
