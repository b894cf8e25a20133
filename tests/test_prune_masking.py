"""Pruning equals masking, on every real model the tests use.

For a random quarter of each group's channels, the model pruned by prune's
surgery must compute what the dense model computes with those channels'
outputs zeroed by masks (:mod:`tests.masking`, built without the surgery).
That holds wherever zeros flow from the masks to the next layers; groups
where an op maps 0 to something else (PP-OCRv4's learnable affine block
after HardSwish) are found by running the masked model and left out, and
each model must still have groups to check. Outputs are compared before a
final Sigmoid/Softmax, where differences are not squashed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.graph import expose_values, is_onnx_op
from onnxopt.io import load_model
from onnxopt_passes.prune.ops import discover

from tests.helpers import run_model
from tests.masking import masked_copy, nonzero_at_readers, prepared, pruned_copy, removal
from tests.test_prune_zoo import LIGHT, _randomize

REAL = Path(os.environ.get("ONNXOPT_REAL_MODELS", "/nonexistent"))
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"

#: model -> (path, input shape); small inputs where the model allows them
CASES = {
    "digits_cnn": (DIGITS / "cnn.onnx", (8, 1, 8, 8)),
    "digits_mlp": (DIGITS / "mlp.onnx", (8, 1, 8, 8)),
    "digits_transformer": (DIGITS / "transformer.onnx", (8, 1, 8, 8)),
    "ppocr_cls": (REAL / "ch_ppocr_mobile_v2.0_cls_infer.onnx", (2, 3, 48, 192)),
    "ppocr_det": (REAL / "ch_PP-OCRv4_det_infer.onnx", (1, 3, 96, 96)),
    **{p.stem: (p, None) for p in sorted(LIGHT.glob("light_*.onnx"))},
}
#: the light zoo's fixed 224x224 CNNs cost seconds per run; these are left to test_prune_zoo's structure checks
HEAVY = {"light_vgg19", "light_bvlc_alexnet", "light_zfnet512"}


def _before_squash(model: ir.Model) -> ir.Model:
    """The model with each output read before a final Sigmoid/Softmax (where pruning's differences still show)."""
    names = []
    for out in model.graph.outputs:
        node = out.producer()
        squash = node is not None and is_onnx_op(node, "Sigmoid", "Softmax") and node.inputs[0] is not None
        names.append(node.inputs[0].name if squash else out.name)  # type: ignore[union-attr]
    return expose_values(model, names)


def _feed(model: ir.Model, shape: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    value = next(v for v in model.graph.inputs if v.const_value is None)
    dims = shape or tuple(d if isinstance(d, int) else 1 for d in value.shape.dims)  # type: ignore[union-attr]
    return {value.name: np.random.default_rng(3).uniform(-1, 1, dims).astype(np.float32)}  # type: ignore[dict-item]


@pytest.mark.parametrize("name", [n for n in CASES if n not in HEAVY])
def test_pruned_model_equals_masked_model(name: str) -> None:
    path, shape = CASES[name]
    if not path.is_file():
        pytest.skip(f"{path} missing (set ONNXOPT_REAL_MODELS to a folder made by shared/models/fetch.sh)")
    model = prepared(load_model(path))
    if name.startswith("light_"):
        _randomize(model, np.random.default_rng(0))  # their weights are all equal: every channel would tie
    feed = _feed(model, shape)
    cg = discover(model.clone())
    groups = [g for g in cg.groups() if len(g.roots) >= 2]
    if name.startswith("light_"):
        groups = groups[:: max(1, len(groups) // 12)]  # about a dozen groups over the depth keeps CI time sane
    keep = removal(cg, groups, 0.25, np.random.default_rng(1))
    stuck = nonzero_at_readers(model, keep, feed)
    checked = [g for g in groups if not stuck.intersection(g.roots.tolist())]
    for g in groups:
        if g not in checked:
            keep[g.roots] = True
    # DenseNet's BatchNorm after each Concat maps 0 to its shift: about half its groups are out of reach
    assert len(checked) >= max(1, len(groups) // 3), (name, len(checked), len(groups))

    dense = run_model(_before_squash(model), feed)
    masked = run_model(_before_squash(masked_copy(model, keep)), feed)
    pruned = run_model(_before_squash(pruned_copy(model, keep)), feed)
    for want, got, full in zip(masked, pruned, dense):
        scale = float(np.abs(want).max())
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * scale + 1e-6, name
        assert np.abs(full - want).max() > 1e-3 * scale, name  # the masked channels mattered: not a vacuous check


@pytest.mark.parametrize("name", ["digits_cnn", "ppocr_cls"])
def test_each_group_alone_equals_its_mask(name: str) -> None:
    """Group by group (a wrong tie or slice in one group cannot hide behind the others)."""
    path, shape = CASES[name]
    if not path.is_file():
        pytest.skip(f"{path} missing (set ONNXOPT_REAL_MODELS to a folder made by shared/models/fetch.sh)")
    model = prepared(load_model(path))
    feed = _feed(model, shape)
    cg = discover(model.clone())
    groups = [g for g in cg.groups() if len(g.roots) >= 2]
    rng = np.random.default_rng(2)
    for g in groups[:: max(1, len(groups) // 4)]:  # about four groups, spread over the depth
        keep = removal(cg, [g], 0.25, rng)
        assert not nonzero_at_readers(model, keep, feed), g.name
        want = run_model(_before_squash(masked_copy(model, keep)), feed)[0]
        got = run_model(_before_squash(pruned_copy(model, keep)), feed)[0]
        assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max()) + 1e-6, g.name
