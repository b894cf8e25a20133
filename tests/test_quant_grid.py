"""cluster.init=grid then quant: weights on an int4 grid keep 4-bit storage and still run as integer kernels."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt.io import serialize_model
from onnxopt_passes.cluster import ClusterConfig, ClusterPass
from onnxopt_passes.cluster.kmeans import grid_rows
from onnxopt_passes.quant import QuantConfig, QuantPass
from onnxopt_passes.quant.grid import grid_levels

from tests.graphs_quant import mbv3_net
from tests.conftest import ROOT
from tests.helpers import run_cli, run_model, to_ir
from tests.test_quant import _optimized_ops

RNG = np.random.default_rng(0)


def test_grid_rows_are_found_again_with_their_step() -> None:
    rows = RNG.standard_normal((6, 40))
    clustering = grid_rows(rows, 16)
    decoded = np.take_along_axis(clustering.centroids, clustering.labels.astype(np.intp), axis=1).astype(np.float32)
    step = grid_levels(decoded, 0)
    assert step is not None
    np.testing.assert_allclose(step, clustering.centroids[:, 1] - clustering.centroids[:, 0], rtol=1e-6)
    assert grid_levels(rows.astype(np.float32), 0) is None  # unclustered weights are not on a grid


def test_grid_step_is_chosen_by_error_not_by_the_largest_weight() -> None:
    rows = RNG.standard_normal((64, 256))
    clustering = grid_rows(rows, 16)
    decoded = np.take_along_axis(clustering.centroids, clustering.labels.astype(np.intp), axis=1)
    plain = np.abs(rows).max(axis=1, keepdims=True) / 7  # the step that just reaches the largest |w|
    rounded = np.clip(np.rint(rows / plain), -8, 7) * plain
    chosen, reference = np.square(decoded - rows).sum(axis=1), np.square(rounded - rows).sum(axis=1)
    assert np.all(chosen <= reference * (1 + 1e-9))
    assert chosen.sum() < 0.8 * reference.sum()  # clipping the tails of a Gaussian row pays at 4 bits


def test_cluster_grid_then_quant_stores_int4_and_runs_integer() -> None:
    proto = mbv3_net(width=8, blocks=1, size=16)
    clustered = ClusterPass().apply(to_ir(proto), ClusterConfig(init="grid", k=16, granularity="channel", min_size=64),
                                    PassContext())
    calib = Dataset("calib", {"x": RNG.standard_normal((16, 3, 16, 16)).astype(np.float32)}, batch_size=8)
    results = {grid: QuantPass().apply(model, QuantConfig(speed_guard="off"), PassContext(calibration=calib))
               for grid, model in (("grid", clustered.model), ("plain", to_ir(proto)))}
    stored = results["grid"].report.figures["weights_stored_int4"]
    assert stored >= 3 and results["plain"].report.figures["weights_stored_int4"] == 0
    proto_q = onnx.ModelProto()
    proto_q.ParseFromString(serialize_model(results["grid"].model))
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in proto_q.graph.initializer) == stored
    ops = _optimized_ops(results["grid"].model)
    assert ops.count("QLinearConv") >= stored - 1 and "Cast" not in ops  # the Cast is folded at load
    # 4-bit weights are half the bytes of the int8 ones
    assert results["grid"].report.figures["weight_bytes_int8"] < 0.75 * results["plain"].report.figures["weight_bytes_int8"]
    # quantizing grid weights adds no weight error: the int8 model tracks the clustered model as closely as
    # plain int8 tracks the float one
    x = RNG.standard_normal((16, 3, 16, 16)).astype(np.float32)
    ref = run_model(clustered.model, {"x": x})[0].ravel()
    got = run_model(results["grid"].model, {"x": x})[0].ravel()
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999


#: The examples walk-through's stacking command (examples/README.md, section 6): chosen on calib.npz (selection),
#: gated and checked here on eval.npz (held out: neither the choice of settings nor any pass saw it).
STACK_20X = ("apply examples/digits/cnn.onnx --pass prune,cluster,quant --set prune.saliency=reconstruct "
             "--set prune.ratio=0.55 --set prune.round_to=4 --set cluster.init=grid --set cluster.k=16 "
             "--set cluster.granularity=channel --set cluster.min_size=300 --set quant.speed_guard=warn "
             "--data examples/digits/train.npz --eval examples/digits/calib.npz --holdout examples/digits/eval.npz "
             "--max-drop 0.01 --compact")


def test_prune_cluster_quant_is_20x_smaller_within_1pt_on_held_out_digits(tmp_path: Path) -> None:
    out = tmp_path / "cnn_20x.onnx"
    proc = run_cli(*shlex.split(STACK_20X), "-o", out, "-q", "--time-budget", "1", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    original = ROOT / "examples" / "digits" / "cnn.onnx"
    assert original.stat().st_size / out.stat().st_size >= 20
    held = np.load(ROOT / "examples" / "digits" / "eval.npz")
    accuracy = [float((run_model(str(m), {"x": held["x"]})[0].argmax(axis=1) == held["labels"]).mean())
                for m in (original, out)]
    assert accuracy[0] - accuracy[1] <= 0.01
    proto = onnx.load(str(out))
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in proto.graph.initializer) >= 5
    assert _optimized_ops(ir.load(str(out))).count("QLinearConv") == 8  # stacked, and still all integer kernels


def test_cluster_budget_ladder_under_grid_offers_only_grid_sizes() -> None:
    """--max-drop climbs k under init=grid too: only the k a 4-bit grid takes (k=256 used to crash the config)."""
    config = ClusterConfig(init="grid", k=16, granularity="channel")
    ladder = ClusterPass().budget_ladder(config, PassContext())
    assert [c.k for _, c in ladder] == [16, 8, 4] and all(c.init == "grid" for _, c in ladder)
