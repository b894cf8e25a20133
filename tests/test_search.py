"""`onnxopt search`: Pareto fronts against brute force, the strategy's pruning, an end-to-end search through the
CLI on the digits MLP, resuming after an interrupt, reproducing a candidate from the JSON, and Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onnxopt.api import load_data
from onnxopt.io import load_model, serialize_model
from onnxopt.plugins import load_registry
from onnxopt.search import apply_recipe, pareto_front, recipe_from_json, search
from onnxopt.search.pareto import dominates
from onnxopt.search.space import PassSpace, Space
from onnxopt.search.strategy import Strategy, within_budget
from onnxopt.sessions import SessionFactory
from onnxopt.timing import TimingConfig
from onnxopt.split import split_dataset
from tests.conftest import unavailable
from tests.helpers import run_cli, run_model, sigint_as_a_terminal_gives_it


def _parts(reference, digits: Path, seed: int):
    """The search's selection and confirmation indices of eval.npz (the same split by seed)."""
    split = split_dataset(load_data(reference, digits / "eval.npz"), seed)
    return split.selection_indices, split.confirmation_indices

# prune and quant are the passes every digits model takes; one setting each keeps the search to 4 candidates
SPACE_TOML = """
[prune]
kind = "ladder"
fixed = { saliency = "reconstruct" }
settings = [{ ratio = 0.5 }]

[quant]
kind = "alternatives"
settings = [{ method = "minmax" }]
"""


def _brute_front(points: list[tuple[float, ...]]) -> list[int]:
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


@pytest.mark.parametrize("dims", [2, 3])
def test_pareto_front_matches_brute_force(dims: int) -> None:
    rng = np.random.default_rng(dims)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        # few distinct values: ties and exact duplicates are common, the cases a sweep gets wrong
        points = [tuple(float(v) for v in row) for row in rng.integers(0, 6, size=(n, dims))]
        assert pareto_front(points) == _brute_front(points), points


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 2.0), (1.0, 2.0), (0.0, 3.0), (2.0, 2.0)]) == [0, 1, 2]


def _space() -> Space:
    return Space(("prune", "quant"), {
        "prune": PassSpace("ladder", ({"ratio": 0.25}, {"ratio": 0.5}, {"ratio": 0.75})),
        "quant": PassSpace("alternatives", ({"method": "minmax"}, {"method": "entropy"})),
    })


def _result(strategy: Strategy, choice: dict[str, int], drop: float, size: float, latency: float) -> tuple[str, dict]:
    from onnxopt.search.recipe import recipe_key, recipe_to_json

    recipe = strategy.chain(choice)
    return recipe_key(recipe), {"status": "ok", "recipe": recipe_to_json(recipe), "drop": drop, "size_bytes": size,
                                "latency_ratio": latency}


def test_strategy_stops_ladders_and_prunes_the_lattice() -> None:
    strategy = Strategy(_space(), 0.01, "size", "fold")
    proposals, _ = strategy.propose({}, set())
    # the base, the first rung of the prune ladder and every quant alternative, nothing more aggressive yet
    assert [p.stage for p in proposals] == ["base", "sensitivity", "sensitivity", "sensitivity"]
    results = dict([_result(strategy, {}, 0.0, 100, 1.0), _result(strategy, {"prune": 0}, 0.002, 60, 0.8),
                    _result(strategy, {"quant": 0}, 0.001, 30, 0.9), _result(strategy, {"quant": 1}, 0.004, 30, 0.9)])
    proposals, _ = strategy.propose(results, set())
    assert [p.recipe[-1].settings for p in proposals] == [{"ratio": 0.5}]  # the ladder goes on one rung at a time
    results.update([_result(strategy, {"prune": 1}, 0.03, 30, 0.5)])  # over budget: the ladder ends here
    proposals, _ = strategy.propose(results, set())
    # combinations from the settings within budget only; quant's alternatives are represented by the best alone
    assert [strategy.choice_of(json.loads(json.dumps([s.to_json() for s in p.recipe]))) for p in proposals] == [{"prune": 0, "quant": 0}]
    assert proposals[0].stage == "combine"
    results.update([_result(strategy, {"prune": 0, "quant": 0}, 0.005, 18, 0.7)])
    proposals, _ = strategy.propose(results, set())
    # refinement: the other quant alternative; prune one rung up is at least as aggressive as prune(0.5), over budget
    assert [strategy.choice_of([s.to_json() for s in p.recipe]) for p in proposals] == [{"prune": 0, "quant": 1}]
    results.update([_result(strategy, {"prune": 0, "quant": 1}, 0.02, 18, 0.7)])
    assert strategy.propose(results, set()) == ([], True)


def test_strategy_learns_that_passes_interact() -> None:
    space = Space(("prune", "cluster", "quant"), {
        "prune": PassSpace("ladder", ({"ratio": 0.5},)),
        "cluster": PassSpace("ladder", ({"k": 16},)),
        "quant": PassSpace("alternatives", ({"method": "minmax"},)),
    })
    strategy = Strategy(space, 0.01, "size", "fold")
    results = dict([_result(strategy, {}, 0.0, 100, 1.0), _result(strategy, {"prune": 0}, 0.001, 50, 0.6),
                    _result(strategy, {"cluster": 0}, 0.001, 20, 1.0), _result(strategy, {"quant": 0}, 0.001, 30, 0.8)])

    def order() -> list[set[str]]:
        return [set(strategy.choice_of([s.to_json() for s in p.recipe]) or {}) for p in strategy.propose(results, set())[0]]

    # sizes multiply until measured otherwise: all three passes first
    assert order()[0] == {"prune", "cluster", "quant"}
    # int8 weights after clustering measured no smaller than int8 alone: chains holding both fall back
    results.update([_result(strategy, {"cluster": 0, "quant": 0}, 0.002, 30, 0.8)])
    assert order()[:2] == [{"prune", "cluster"}, {"prune", "cluster", "quant"}]


@pytest.fixture(scope="module")
def cli_search(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One search on the digits MLP through the CLI with two worker processes: 4 candidates."""
    folder = tmp_path_factory.mktemp("search")
    (folder / "space.toml").write_text(SPACE_TOML)
    plot = ["--plot", folder / "pareto.png"] if importlib.util.find_spec("matplotlib") else []  # an optional extra
    proc = run_cli("search", digits / "mlp.onnx", "--eval", digits / "eval.npz", "--data", digits / "calib.npz",
                   "--passes", "prune,quant", "--space", folder / "space.toml", "--max-drop", "0.02",
                   "-o", folder / "best.onnx", "--report", folder / "search.json", *plot, "--workers", "2", "-q", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "best (size)" in proc.stdout and "wrote" in proc.stdout
    return folder


def test_cli_search_end_to_end(cli_search: Path, digits: Path) -> None:
    doc = json.loads((cli_search / "search.json").read_text())
    cands = doc["candidates"]
    assert doc["complete"] and len(cands) == 4 and all(c["status"] == "ok" for c in cands)
    assert {c["stage"] for c in cands} == {"base", "sensitivity", "combine"}
    assert not (cli_search / "search.json.models").exists()  # the model cache goes when the search completes
    # the fronts in the JSON are the fronts of its own figures
    for axis, attr in (("latency", "latency_ms"), ("size", "size_bytes")):
        front = pareto_front([(c["drop"], c[attr]) for c in cands])
        assert [i for i, c in enumerate(cands) if c["front"][axis]] == front
    best = next(c for c in cands if c["id"] == doc["best"])
    within = [c for c in cands if within_budget(c, 0.02)]
    assert best["size_bytes"] <= min(c["size_bytes"] for c in within) * 1.01
    assert best["size_bytes"] < doc["reference"]["size_bytes"] / 4  # prune(0.5) + int8 on a Gemm stack
    # the written model is the best candidate: same accuracy on real ORT on the part it was picked on, same size
    # on disk; its confirmation figure is on the other part, which no candidate was measured on
    ev = np.load(digits / "eval.npz")
    sel, conf = _parts(load_model(digits / "mlp.onnx"), digits, doc["settings"]["seed"])
    assert len(np.intersect1d(sel, conf)) == 0 and len(sel) + len(conf) == len(ev["labels"])
    assert doc["settings"]["split"]["selection_samples"] == len(sel) == doc["reference"]["samples"]
    logits = run_model(cli_search / "best.onnx", {"x": ev["x"]})[0]
    accuracy = float((logits.argmax(1)[sel] == ev["labels"][sel]).mean())
    assert accuracy == pytest.approx(best["accuracy"], abs=1e-9)
    assert doc["reference"]["accuracy"] - accuracy <= 0.02
    assert float((logits.argmax(1)[conf] == ev["labels"][conf]).mean()) == pytest.approx(best["accuracy_confirmation"],
                                                                                           abs=1e-9)
    # the same rule on both parts (1 - agreement): the optimism; the gate's figure is accuracy lost on the labels
    assert best["optimism"] == pytest.approx(best["drop_confirmation_agreement"] - best["drop_selection"])
    ref_logits = run_model(digits / "mlp.onnx", {"x": ev["x"]})[0]
    assert best["drop_selection"] == pytest.approx(float((logits.argmax(1)[sel] != ref_logits.argmax(1)[sel]).mean()), abs=1e-9)
    assert best["drop_confirmation_agreement"] == pytest.approx(
        float((logits.argmax(1)[conf] != ref_logits.argmax(1)[conf]).mean()), abs=1e-9)
    assert best["drop_confirmation"] == pytest.approx(
        float((ref_logits.argmax(1)[conf] == ev["labels"][conf]).mean()) - best["accuracy_confirmation"], abs=1e-9)
    assert (cli_search / "best.onnx").stat().st_size == best["file_size_bytes"]
    pytest.importorskip("matplotlib")
    assert (cli_search / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_recipe_reproduces_a_candidate(cli_search: Path, digits: Path) -> None:
    doc = json.loads((cli_search / "search.json").read_text())
    cand = next(c for c in doc["candidates"] if c["id"] == doc["best"])
    recipe = recipe_from_json(cand["recipe"])
    assert [s.pass_name for s in recipe] == ["fold", "prune", "quant"] and recipe[-1].max_drop is not None
    reference = load_model(digits / "mlp.onnx")
    split = split_dataset(load_data(reference, digits / "eval.npz"), doc["settings"]["seed"])
    model, _ = apply_recipe(reference, recipe, registry=load_registry(), sessions=SessionFactory(),
                            calibration=load_data(reference, digits / "calib.npz"),
                            evaluation=split.selection, seed=doc["settings"]["seed"])
    ev = np.load(digits / "eval.npz")
    sel = split.selection_indices
    accuracy = float((run_model(model, {"x": ev["x"]})[0].argmax(1)[sel] == ev["labels"][sel]).mean())
    assert accuracy == pytest.approx(cand["accuracy"], abs=1.5 / len(ev["labels"]))
    assert len(serialize_model(model)) == pytest.approx(cand["size_bytes"], rel=0.01)


def test_pick_writes_a_front_candidate(cli_search: Path, digits: Path) -> None:
    doc = json.loads((cli_search / "search.json").read_text())
    front = [c for c in doc["candidates"] if c["front"]["latency"] or c["front"]["size"]]
    chosen = next((c for c in front if c["id"] != doc["best"]), front[0])  # a point other than the pick, if any
    proc = run_cli("search", digits / "mlp.onnx", "--eval", digits / "eval.npz", "--report", cli_search / "search.json",
                   "--pick", str(chosen["id"]), "-o", cli_search / "picked.onnx")
    assert proc.returncode == 0, proc.stderr
    ev = np.load(digits / "eval.npz")
    sel, _ = _parts(load_model(digits / "mlp.onnx"), digits, doc["settings"]["seed"])
    logits = run_model(cli_search / "picked.onnx", {"x": ev["x"]})[0]
    assert float((logits.argmax(1)[sel] == ev["labels"][sel]).mean()) == pytest.approx(chosen["accuracy"], abs=1e-9)
    assert (cli_search / "picked.onnx").stat().st_size == pytest.approx(chosen["size_bytes"], rel=0.01)


def test_resume_evaluates_only_the_missing_candidates(cli_search: Path, digits: Path, tmp_path: Path) -> None:
    full = json.loads((cli_search / "search.json").read_text())
    # an interrupted search: only the first two candidates were recorded
    partial = {**full, "candidates": full["candidates"][:2], "complete": False, "best": None}
    report = tmp_path / "search.json"
    report.write_text(json.dumps(partial))
    (tmp_path / "space.toml").write_text(SPACE_TOML)
    result = search(digits / "mlp.onnx", eval_data=digits / "eval.npz", data=digits / "calib.npz", max_drop=0.02,
                    passes="prune,quant", space=tmp_path / "space.toml", report=report, workers=1)
    assert (result.evaluated, result.reused) == (2, 2)
    doc = json.loads(report.read_text())
    assert [c["key"] for c in doc["candidates"][:2]] == [c["key"] for c in full["candidates"][:2]]
    assert {c["key"] for c in doc["candidates"]} == {c["key"] for c in full["candidates"]}
    assert [c["session"] for c in doc["candidates"]] == [1, 1, 2, 2]
    # same data, same recipes: the same accuracy and size as the uninterrupted run
    by_key = {c["key"]: c for c in full["candidates"]}
    for c in doc["candidates"][2:]:
        assert c["drop"] == pytest.approx(by_key[c["key"]]["drop"], abs=1e-9)
        assert c["size_bytes"] == pytest.approx(by_key[c["key"]]["size_bytes"], rel=0.01)


def test_search_resumes_after_sigint(digits: Path, tmp_path: Path) -> None:
    (tmp_path / "space.toml").write_text(SPACE_TOML)
    args = [sys.executable, "-m", "onnxopt", "search", str(digits / "mlp.onnx"), "--eval", str(digits / "eval.npz"),
            "--data", str(digits / "calib.npz"), "--passes", "prune,quant", "--space", str(tmp_path / "space.toml"),
            "--report", str(tmp_path / "s.json"), "--workers", "1", "--max-drop", "0.02", "-q"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_a_terminal_gives_it)
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads((tmp_path / "s.json").read_text())["candidates"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"exit {proc.returncode} (0: the search ignored Ctrl-C or ended first): {err}"
    assert "rerun the same command to resume" in err
    saved = json.loads((tmp_path / "s.json").read_text())
    assert 1 <= len(saved["candidates"]) < 4 and not saved["complete"]
    rerun = run_cli(*args[3:], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["complete"] and len(doc["candidates"]) == 4
    assert doc["sessions"][-1]["evaluated"] == 4 - len(saved["candidates"])


def test_a_report_from_another_search_is_refused(cli_search: Path, digits: Path, tmp_path: Path) -> None:
    shutil.copy(cli_search / "search.json", tmp_path / "search.json")
    proc = run_cli("search", digits / "cnn.onnx", "--eval", digits / "eval.npz", "--data", digits / "calib.npz",
                   "--passes", "quant", "--max-drop", "0.02", "--report", tmp_path / "search.json", "-q")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "is from another search (model differ)" in proc.stderr


def test_search_on_ray(digits: Path, tmp_path: Path) -> None:
    """On a local Ray instance that the search starts itself (no RAY_ADDRESS), and shuts down when done."""
    try:
        import ray
    except ImportError:
        unavailable("ray", "Ray is not installed (pip install -e '.[ray]')")
    monkeypatch_env = {k: os.environ.pop(k) for k in ("RAY_ADDRESS",) if k in os.environ}
    space = {"quant": PassSpace("alternatives", ({"method": "minmax"}, {"method": "percentile"}))}
    try:
        assert not ray.is_initialized()
        result = search(digits / "mlp.onnx", eval_data=digits / "eval.npz", data=digits / "calib.npz", max_drop=0.01,
                        passes="quant", space=space, report=tmp_path / "s.json", executor="ray", workers=2)
    finally:
        os.environ.update(monkeypatch_env)
    assert not ray.is_initialized()  # the instance it started is gone
    workers = {c["worker"] for c in result.candidates}
    assert len(result.candidates) == 3 and all(c["status"] == "ok" for c in result.candidates)
    assert os.getpid() not in workers  # evaluated by Ray actors, not in this process
    assert result.best is not None and result.best["size_bytes"] < result.state.reference["size_bytes"] / 3


def test_search_on_a_ray_instance_the_test_started(digits: Path, tmp_path: Path) -> None:
    """A Ray instance already running (started here, local) is used as it is, and left running for its owner."""
    try:
        import ray
    except ImportError:
        unavailable("ray", "Ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        node = ray.get_runtime_context().get_node_id()
        space = {"quant": PassSpace("alternatives", ({"method": "minmax"},))}
        result = search(digits / "mlp.onnx", eval_data=digits / "eval.npz", data=digits / "calib.npz", max_drop=0.01,
                        passes="quant", space=space, executor="ray", workers=2)
        assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node  # not shut down under its owner
        assert len(result.candidates) == 2 and all(c["status"] == "ok" for c in result.candidates)
        assert os.getpid() not in {c["worker"] for c in result.candidates}
    finally:
        ray.shutdown()


def _two_output_model(folder: Path) -> tuple[Path, Path]:
    """x[N,32] -> scores = Relu(x) (no weights: no pass can touch it) and head = Gemm -> Relu -> Gemm [N,16]."""
    import onnx
    from onnx import TensorProto, helper

    from tests.graphs import init, make_model

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Relu", ["x"], ["scores"], name="scores"),
             helper.make_node("Gemm", ["x", "w0", "b0"], ["g0"], transB=1, name="gemm0"),
             helper.make_node("Relu", ["g0"], ["h0"], name="relu0"),
             helper.make_node("Gemm", ["h0", "w1", "b1"], ["head"], transB=1, name="gemm1")]
    inits = [init("w0", (rng.standard_normal((64, 32)) / np.sqrt(32)).astype(np.float32)),
             init("b0", np.zeros(64, np.float32)),
             init("w1", (rng.standard_normal((16, 64)) / 8).astype(np.float32)),
             init("b1", np.zeros(16, np.float32))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                       [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 32]),
                        helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 16])], inits)
    onnx.save(model, folder / "two.onnx")
    np.savez(folder / "eval.npz", x=rng.standard_normal((240, 32)).astype(np.float32))
    return folder / "two.onnx", folder / "eval.npz"


def test_search_measures_every_output(tmp_path: Path) -> None:
    """Only the second output is hurt: search's drop (pick and confirmation) is apply's, every output by its metric."""
    from onnxopt.metrics import cosine, top1_agreement

    model_path, eval_path = _two_output_model(tmp_path)
    space = {"cluster": PassSpace("ladder", ({"k": 256}, {"k": 2}), fixed={"mode": "dense", "init": "linear"})}
    reference = load_model(model_path)
    split = split_dataset(load_data(reference, eval_path), 0)
    x = np.load(eval_path)["x"]
    ref_scores, ref_head = run_model(model_path, {"x": x})

    def candidate_outputs(c: dict) -> list[np.ndarray]:
        model, _ = apply_recipe(reference, recipe_from_json(c["recipe"]), registry=load_registry(),
                                sessions=SessionFactory(), calibration=None, evaluation=split.selection)
        return run_model(model, {"x": x})

    from onnxopt.timing import TimingConfig

    result = search(model_path, eval_data=eval_path, max_drop=0.01, passes="cluster", space=space, workers=1,
                    timing=TimingConfig(repeat=2, time_budget=0.5))
    by_k = {c["recipe"][-1]["settings"].get("k"): c for c in result.candidates if c["status"] == "ok"}
    sel, conf = split.selection_indices, split.confirmation_indices
    scores, head = candidate_outputs(by_k[2])
    assert top1_agreement(ref_scores[sel], scores[sel]) == 1.0  # the first output is untouched ...
    hurt = 1.0 - top1_agreement(ref_head[sel], head[sel])
    assert hurt > 0.05  # ... the second is not, and the drop says so (the first-output rule measured 0)
    assert by_k[2]["drop"] == pytest.approx(hurt, abs=1e-9)
    assert result.best is not None and result.best["key"] != by_k[2]["key"]
    scores, head = candidate_outputs(result.best)
    assert result.best["drop_confirmation"] == pytest.approx(1.0 - top1_agreement(ref_head[conf], head[conf]), abs=1e-9)

    # declared metrics (--metric) reach the search's figures, as in apply: head by cosine, scores left out
    proc = run_cli("search", model_path, "--eval", eval_path, "--passes", "cluster", "--max-drop", "0.01",
                   "--metric", "head=cosine", "--space", _space_file(tmp_path, space), "--report", tmp_path / "s.json",
                   "--workers", "1", "--repeat", "2", "--time-budget", "0.5", "-q", cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["settings"]["metrics"] == {"head": "cosine"}
    cand = next(c for c in doc["candidates"] if c["status"] == "ok" and c["recipe"][-1]["settings"].get("k") == 2)
    _, head = candidate_outputs(cand)
    assert cand["drop"] == pytest.approx(1.0 - cosine(ref_head[sel], head[sel]), abs=1e-6)
    bad = run_cli("search", model_path, "--eval", eval_path, "--passes", "cluster", "--metric", "head=nonsense", "-q",
                  cwd=tmp_path)
    assert bad.returncode == 2 and "unknown metric" in bad.stderr


def _space_file(folder: Path, space: dict) -> Path:
    lines = []
    for name, entry in space.items():
        settings = ", ".join("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in s.items()) + " }" for s in entry.settings)
        fixed = ", ".join(f"{k} = {json.dumps(v)}" for k, v in entry.fixed.items())
        lines += [f"[{name}]", f'kind = "{entry.kind}"', f"fixed = {{ {fixed} }}", f"settings = [{settings}]", ""]
    (folder / "space.toml").write_text("\n".join(lines))
    return folder / "space.toml"


def test_search_picks_by_the_budget_rule(digits: Path, tmp_path: Path) -> None:
    """A candidate whose net accuracy is within but whose 1 - agreement plus one standard error is not (the rule of
    apply's ladders) is not picked; its figures are measured independently on ORT on the selection indices."""
    from onnxopt.budget import margin
    from onnxopt.metrics import top1_agreement

    space = {"prune": PassSpace("ladder", ({"ratio": 0.5},), fixed={"saliency": "reconstruct"})}
    result = search(digits / "mlp.onnx", eval_data=digits / "eval.npz", data=digits / "calib.npz", max_drop=0.01,
                    passes="prune", space=space, workers=1, timing=TimingConfig(repeat=2, time_budget=0.5))
    pruned = next(c for c in result.candidates if c["status"] == "ok" and c["recipe"][-1]["pass"] == "prune")
    reference = load_model(digits / "mlp.onnx")
    sel, conf = _parts(reference, digits, 0)
    assert len(np.intersect1d(sel, conf)) == 0
    model, _ = apply_recipe(reference, recipe_from_json(pruned["recipe"]), registry=load_registry(),
                            sessions=SessionFactory(), calibration=load_data(reference, digits / "calib.npz"),
                            evaluation=split_dataset(load_data(reference, digits / "eval.npz"), 0).selection)
    ev = np.load(digits / "eval.npz")
    ref = run_model(digits / "mlp.onnx", {"x": ev["x"][sel]})[0]
    out = run_model(model, {"x": ev["x"][sel]})[0]
    labels = ev["labels"][sel]
    net = float((ref.argmax(1) == labels).mean() - (out.argmax(1) == labels).mean())
    disagree = 1.0 - top1_agreement(ref, out)
    assert net <= 0.01 < disagree + margin(disagree, len(sel))  # the premise: the two rules disagree here
    assert pruned["drop"] == pytest.approx(disagree, abs=1e-9)
    assert pruned["drop_labels"] == pytest.approx(net, abs=1e-9)
    assert pruned["drop_margin"] == pytest.approx(margin(disagree, len(sel)), abs=1e-12)
    assert not within_budget(pruned, 0.01)
    assert result.best is None or result.best["key"] != pruned["key"]


def test_search_gates_its_pick_on_the_confirmation_part(tmp_path: Path) -> None:
    """The pick is confirmed on samples no candidate saw; over budget there, nothing is written (exit 3) unless
    --force. The eval set is built so the selection part cannot see the damage: its samples are all zeros."""
    from onnxopt.metrics import top1_agreement

    model_path, eval_path = _two_output_model(tmp_path)
    reference = load_model(model_path)
    split = split_dataset(load_data(reference, eval_path), 0)
    sel, conf = split.selection_indices, split.confirmation_indices
    assert len(np.intersect1d(sel, conf)) == 0
    x = np.load(eval_path)["x"]
    x[sel] = 0.0  # every output 0 there: the k=2 candidate agrees on all of them, and disagrees elsewhere
    np.savez(eval_path, x=x)
    space = {"cluster": PassSpace("ladder", ({"k": 256}, {"k": 2}), fixed={"init": "linear"})}
    args = ("search", model_path, "--eval", eval_path, "--passes", "cluster", "--max-drop", "0.01", "--space",
            _space_file(tmp_path, space), "--workers", "1", "--repeat", "2", "--time-budget", "0.5", "-q")
    proc = run_cli(*args, "-o", tmp_path / "best.onnx", "--report", tmp_path / "s.json", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    best = next(c for c in doc["candidates"] if c["id"] == doc["best"])
    assert best["recipe"][-1]["settings"].get("k") == 2 and best["drop_selection"] == 0.0  # within on selection
    model, _ = apply_recipe(reference, recipe_from_json(best["recipe"]), registry=load_registry(),
                            sessions=SessionFactory(), calibration=None, evaluation=split.selection)
    _, head = run_model(model, {"x": x})
    _, ref_head = run_model(model_path, {"x": x})
    assert best["drop_confirmation"] == pytest.approx(1.0 - top1_agreement(ref_head[conf], head[conf]), abs=1e-9)
    assert best["drop_confirmation"] > 0.01 and not best["within_budget_confirmation"]
    assert not (tmp_path / "best.onnx").exists() and "nothing written" in proc.stdout
    forced = run_cli(*args, "-o", tmp_path / "best.onnx", "--force", cwd=tmp_path)
    assert forced.returncode == 3 and (tmp_path / "best.onnx").exists() and "written all the same" in forced.stdout


def test_a_search_saved_before_the_per_sample_margin_is_not_resumed(digits: Path, tmp_path: Path) -> None:
    """Older JSONs measured cosine/SNR/textmap candidates without the per-sample margin: resuming would mix the two."""
    from onnxopt.errors import OnnxoptError
    from onnxopt.search.state import SCHEMA, SearchState, fingerprint

    fp = fingerprint(digits / "mlp.onnx", digits / "eval.npz", digits / "calib.npz", max_drop=0.01, seed=0, threads=1)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": SCHEMA, "fingerprint": {**fp, "drop": "budget rule"}, "candidates": []}))
    with pytest.raises(OnnxoptError, match=r"another search \(drop differ\)"):
        SearchState.open(path, fp)
    path.write_text(json.dumps({"schema": SCHEMA, "fingerprint": fp, "candidates": [{"key": "k"}]}))
    assert len(SearchState.open(path, fp).candidates) == 1
