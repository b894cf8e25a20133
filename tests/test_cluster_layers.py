"""cluster's per-layer settings: ``layers`` entries, and the per-layer refinement --max-drop verifies after its k ladder."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import OnnxoptError, PassContext
from onnxopt.api import apply, load_data
from onnxopt.budget import margin
from onnxopt.config import build_config
from onnxopt.graph import expose_values
from onnxopt.io import load_model
from onnxopt.manager import PlannedPass, run_chain
from onnxopt.metrics import top1_agreement
from onnxopt.split import split_dataset
from onnxopt_passes.cluster import ClusterConfig, ClusterPass
from onnxopt_passes.cluster.allocation import allocate, proposals
from onnxopt_passes.cluster.storage import as_rows, index_bits

from tests.graphs import gemm_chain
from tests.helpers import run_model, to_ir


def _weights(model: ir.Model, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights as the model computes them (its in-graph decode run by ONNX Runtime)."""
    return dict(zip(names, run_model(expose_values(model, names), feed)))


def _distinct_per_row(weight: np.ndarray, axis: int | None) -> int:
    return max(len(np.unique(row)) for row in as_rows(weight, axis))


# -- layers entries -------------------------------------------------------------------------------------------------


def test_layers_entries_give_matched_weights_their_own_k_and_granularity() -> None:
    proto = gemm_chain((64, 128, 96, 32), trans_b=0)
    config = build_config(ClusterConfig, {"k": 16, "min_size": 64, "layers": "w0=4/channel,gemm2=256"},
                          pass_name="cluster")
    result = ClusterPass().apply(to_ir(proto), config, PassContext())
    items = {item["tensor"]: item for item in result.report.items}
    # w0 by its own name, w2 by its reader's node name (gemm2), w1 by the config's k
    assert (items["w0"]["k"], items["w0"]["granularity"], items["w0"]["set_by"]) == (4, "channel", "w0=4/channel")
    assert (items["w2"]["k"], items["w2"]["bits"], items["w2"]["set_by"]) == (256, 8, "gemm2=256")
    assert (items["w1"]["k"], items["w1"]["granularity"], items["w1"]["bits"]) == (16, "tensor", 4)
    assert "set_by" not in items["w1"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    decoded = _weights(result.model, ["w0", "w1", "w2"], {"x": x})
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    # as ONNX Runtime decodes them: w0 holds at most 4 values per output channel (and more than 4 over the tensor)
    assert _distinct_per_row(decoded["w0"], 1) <= 4 < len(np.unique(decoded["w0"]))
    assert len(np.unique(decoded["w1"])) <= 16
    assert 16 < len(np.unique(decoded["w2"])) <= 256
    # and the one at k=256 is the closest to its original
    errors = {n: float(np.square(decoded[n] - originals[n]).sum() / np.square(originals[n]).sum()) for n in decoded}
    assert errors["w2"] < errors["w1"] < errors["w0"]
    assert result.report.figures["per_layer_settings"] == 2
    outputs = run_model(result.model, {"x": x})[0]
    assert np.isfinite(outputs).all()


@pytest.mark.parametrize("entry", ["w0", "w0=", "=16", "w0=1", "w0=300", "w0=16/row", "w0=k16"])
def test_bad_layers_entry_is_a_one_line_error(entry: str) -> None:
    with pytest.raises(OnnxoptError) as err:
        build_config(ClusterConfig, {"layers": entry}, pass_name="cluster")
    assert "layers entry" in err.value.message and "\n" not in err.value.message


def test_exact_entries_escape_glob_characters() -> None:
    from onnxopt_passes.cluster.layers import exact_entry, parse_layers, setting_for

    (setting,) = parse_layers([exact_entry("blocks[0]*w=1", 4, "tensor")])
    assert setting_for([setting], "blocks[0]*w=1", []) is setting
    assert setting_for([setting], "blocks0xw=1", []) is None and setting_for([setting], "blocks[0]Xw=1", []) is None


# -- the allocation ---------------------------------------------------------------------------------------------------


def test_allocation_is_the_fewest_bytes_within_the_error_budget_among_all_assignments() -> None:
    """Against brute force over every assignment of small tables: never over the budget, and no more bytes than the
    best assignment within the budget less one resolution step per layer (each error is rounded up to a step)."""
    from onnxopt_passes.cluster.allocation import RESOLUTION

    layers, options = 5, 4
    rows = np.arange(layers)
    every = np.array(list(itertools.product(range(options), repeat=layers)))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sizes = np.sort(rng.integers(100, 5000, (layers, options)), axis=1)[:, ::-1].astype(float)  # more bytes ...
        errors = np.sort(rng.random((layers, options)) ** 3, axis=1)  # ... less error
        sizes[0, 2] = np.inf  # a setting layer 0 cannot take
        err_all, bytes_all = errors[rows, every].sum(axis=1), sizes[rows, every].sum(axis=1)
        for budget in np.quantile(err_all[np.isfinite(bytes_all)], [0.05, 0.2, 0.5, 0.8]):
            columns = allocate(errors, sizes, float(budget))
            assert columns is not None and np.isfinite(sizes[rows, columns]).all()
            assert errors[rows, columns].sum() <= budget * (1 + 1e-9)
            assert sizes[rows, columns].sum() <= bytes_all[err_all <= budget * (1 - layers / RESOLUTION)].min()
        assert allocate(errors, sizes, float(errors[:, 0].sum()) * 0.5) is None  # below the least error possible


def test_proposals_store_fewer_bytes_than_the_uniform_setting_and_grow_stronger() -> None:
    rng = np.random.default_rng(1)
    sizes = np.array([[4000, 2000, 1000, 500]] * 6, float) * rng.uniform(0.5, 2, (6, 1))
    errors = np.array([[0.0001, 0.004, 0.03, 0.1]] * 6) * rng.uniform(0.2, 5, (6, 1))
    baseline = np.full(6, 1)
    found = proposals(errors, sizes, baseline)
    uniform = sizes[np.arange(6), baseline].sum()
    assert found and all(p.bytes <= 0.99 * uniform for p in found)
    assert [p.bytes for p in found] == sorted((p.bytes for p in found), reverse=True)  # weaker (more bytes) first
    assert all(p.error <= p.scale * errors[np.arange(6), baseline].sum() * (1 + 1e-9) for p in found)


# -- under --max-drop -------------------------------------------------------------------------------------------------


def _selection_drop(digits: Path, written: Path, seed: int = 0) -> tuple[float, int]:
    """1 - top-1 agreement of ``written`` with the original cnn on the selection part of eval.npz (by split indices)."""
    data = load_data(load_model(digits / "cnn.onnx"), digits / "eval.npz")
    split = split_dataset(data, seed)
    x = np.load(digits / "eval.npz")["x"][split.selection_indices]
    (ref,), (out,) = run_model(digits / "cnn.onnx", {"x": x}), run_model(written, {"x": x})
    return 1.0 - float(top1_agreement(ref, out)), len(x)


def test_budget_refines_cnn_per_layer_as_reported_and_within_on_selection(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn.onnx"
    uniform_out = tmp_path / "uniform.onnx"
    run = apply(digits / "cnn.onnx", ["cluster"], out, settings={"cluster": {"per_layer": True}},
                data=digits / "calib.npz", eval_data=digits / "eval.npz", max_drop=0.02, seed=0, force=True)
    budget = run.passes[0].figures["budget"]
    refined = budget["refinement"]
    assert refined["kept"] and refined["tried"] and refined["from"] == budget["ladder"][budget["rung"]]
    k_star = int(refined["from"].split("=")[1].split()[0])
    # the assignment is applied as reported: each layer at its reported k and granularity, in the written file
    items = run.passes[0].items
    moved = [item for item in items if "set_by" in item]
    assert moved and all(item["set_by"].startswith(item["tensor"]) for item in moved)
    written = ir.load(str(out))
    proto = onnx.load(str(out))
    decoded = _weights(written, [item["tensor"] for item in items], {"x": np.load(digits / "eval.npz")["x"][:1]})
    for item in items:
        k = int(item["set_by"].split("=")[-1].split("/")[0]) if "set_by" in item else k_star
        assert item["k"] <= k
        weight = decoded[item["tensor"]]
        axis = 0 if item["granularity"] == "channel" else None
        assert _distinct_per_row(weight, axis) <= item["k"]
        packed = next(t for t in proto.graph.initializer if t.name == f"{item['tensor']}.indices")
        assert onnx.numpy_helper.to_array(packed).size == -(-weight.size * index_bits(item["k"]) // 8)
    # within the budget on the selection part, as measured again here from the split's indices, with the margin
    drop, n = _selection_drop(digits, out)
    chosen = next(t for t in refined["tried"] if t["setting"] == refined["chosen"])
    assert drop == pytest.approx(chosen["drop"], abs=1e-9)
    assert drop + margin(drop, n) <= 0.02 + 1e-12
    # and smaller on disk than the uniform k the ladder chose
    apply(digits / "cnn.onnx", ["cluster"], uniform_out, settings={"cluster": {"k": k_star}}, force=True, seed=0)
    assert out.stat().st_size < uniform_out.stat().st_size


def test_explicit_k_turns_the_budget_and_its_refinement_off(digits: Path, tmp_path: Path) -> None:
    run = apply(digits / "cnn.onnx", ["cluster"], tmp_path / "o.onnx", settings={"cluster": {"k": 32, "per_layer": True}},
                data=digits / "calib.npz", eval_data=digits / "eval.npz", max_drop=0.02, seed=0, force=True)
    report = run.passes[0]
    assert "budget" not in report.figures and all("set_by" not in item for item in report.items)
    assert {item["k"] for item in report.items} == {32}
    assert any("set by you" in note for note in report.notes)
    # per_layer off (the default) keeps the ladder and skips the refinement
    run = apply(digits / "cnn.onnx", ["cluster"], tmp_path / "p.onnx",
                data=digits / "calib.npz", eval_data=digits / "eval.npz", max_drop=0.02, seed=0, force=True)
    assert "refinement" not in run.passes[0].figures["budget"]
    assert all("set_by" not in item for item in run.passes[0].items)


class _OverBudgetRefinement(ClusterPass):
    """ClusterPass whose refinement also offers, as its strongest proposal, every weight at k=2 (over any budget)."""

    only_breaking = False

    def budget_refinement(self, model, config, ctx, explicit=frozenset(), over=None):
        real = [] if self.only_breaking else super().budget_refinement(model, config, ctx, explicit, over)
        return [*real, ("every weight at k=2", replace(config, layers=("*=2",)))]


def _chain(digits: Path, pass_: ClusterPass, budget: float = 0.02):
    model = load_model(digits / "cnn.onnx")
    split = split_dataset(load_data(model, digits / "eval.npz"), 0)
    ctx = PassContext(calibration=load_data(model, digits / "calib.npz"), evaluation=split.selection,
                      confirmation=split.confirmation, max_drop=budget)
    return run_chain(model, [PlannedPass(pass_, ClusterConfig(per_layer=True))], ctx, timed=False)


def test_a_refinement_over_the_budget_is_backed_off(digits: Path) -> None:
    plain = _chain(digits, ClusterPass())
    forced = _chain(digits, _OverBudgetRefinement())
    refined = forced.reports[0].figures["budget"]["refinement"]
    over = refined["tried"][0]
    assert over["setting"] == "every weight at k=2" and not over["within"]  # the strongest is measured first ...
    # ... and backed off: the same proposal is kept as without the breaking one, within the budget on selection
    expected = plain.reports[0].figures["budget"]["refinement"]
    assert refined["kept"] == expected["kept"] and refined["chosen"] == expected["chosen"]
    assert forced.ledger[0]["drop_selection"] <= 0.02 and forced.ledger[0]["action"] == "kept"
    assert [i["k"] for i in forced.reports[0].items] == [i["k"] for i in plain.reports[0].items]


def test_a_refinement_with_nothing_within_keeps_the_uniform_k(digits: Path) -> None:
    pass_ = _OverBudgetRefinement()
    pass_.only_breaking = True
    chain = _chain(digits, pass_)
    budget = chain.reports[0].figures["budget"]
    refined = budget["refinement"]
    assert not refined["kept"] and refined["chosen"] is None and "stays" in refined["reason"]
    assert budget["chosen"] == refined["from"]  # the ladder's uniform k, unrefined
    k_star = int(refined["from"].split("=")[1].split()[0])
    assert all(item["k"] <= k_star and "set_by" not in item for item in chain.reports[0].items)
    assert chain.ledger[0]["action"] == "kept" and chain.ledger[0]["drop_selection"] <= 0.02


def test_proposals_stay_below_the_error_the_ladder_measured_over() -> None:
    from onnxopt_passes.cluster.allocation import ERROR_SCALES, error_scales

    scales = error_scales(1e-3, 4e-3)
    assert scales[0] == 1.0 and all(1.0 <= s < 4.0 for s in scales) and list(scales) == sorted(scales)
    assert error_scales(1e-3, None) == ERROR_SCALES == (1.0,)


def test_layers_from_the_command_line(digits: Path, tmp_path: Path) -> None:
    import json

    from tests.helpers import run_cli

    proc = run_cli("apply", digits / "mlp.onnx", "--pass", "cluster", "--set", "cluster.layers=net.1*=4,net.3*=16/channel",
                   "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    items = {i["tensor"]: i for i in json.loads((tmp_path / "r.json").read_text())["passes"][0]["items"]}
    assert (items["net.1.weight"]["k"], items["net.1.weight"]["set_by"]) == (4, "net.1*=4")
    assert (items["net.3.weight"]["granularity"], items["net.3.weight"]["set_by"]) == ("channel", "net.3*=16/channel")
    assert "set_by" not in items["net.5.weight"] and items["net.5.weight"]["granularity"] == "tensor"


def test_the_terminal_report_says_what_the_refinement_tried(digits: Path, tmp_path: Path) -> None:
    from tests.helpers import run_cli

    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "cluster", "--set", "cluster.per_layer=true",
                   "--data", digits / "calib.npz", "--eval", digits / "eval.npz", "--max-drop", "0.02",
                   "-o", tmp_path / "o.onnx", env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "refinement of k=" in line)
    import re

    assert re.search(r"refinement of k=\d+ \(tensor\) kept: per layer at ", line) and "; tried per layer at" in line
