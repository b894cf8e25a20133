"""The path a first-time user walks (issue 19): each mistake gets a true, early, one-line answer."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.measure import count_parameters, stored_weight_bytes
from onnxopt.io import load_model
from tests.graphs import gemm_chain, init, make_model
from tests.helpers import run_cli
from tests.probe_plugin import DISTRIBUTION, PLUGIN_NAME, VERSION, probe_env


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(gemm_chain().SerializeToString())
    return path


# --- 1. an output that cannot take a model is refused before any pass runs -------------------------

@pytest.mark.parametrize("target, says", [("somedir/", "is a folder"), ("out.txt", "does not end in .onnx"),
                                          ("missing/out.onnx", "does not exist")])
def test_bad_output_is_refused_before_any_pass(target: str, says: str, model: Path, tmp_path: Path) -> None:
    (tmp_path / "somedir").mkdir()
    marker = tmp_path / "marker.txt"
    env = probe_env(tmp_path, marker=marker)
    proc = run_cli("apply", model, "--pass", "probe_slow,fold", "-o", target, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert says in line and target.rstrip("/") in line
    if target == "somedir/":
        assert ".onnx" in line and "somedir/model.onnx" in line  # the hint names a file in that folder
    assert not marker.exists(), "a pass ran before the output path was checked"
    assert sorted(p.name for p in (tmp_path / "somedir").iterdir()) == []
    assert not (tmp_path / "out.txt").exists()


# --- 2. without -o nothing is written, and the run says so -------------------------------------------

def test_apply_without_output_says_no_file_written(model: Path, tmp_path: Path) -> None:
    proc = run_cli("apply", model, "--pass", "fold", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no file written" in proc.stdout and "-o" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    proc = run_cli("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx")
    assert "no file written" not in proc.stdout and f"wrote {tmp_path / 'out.onnx'}" in proc.stdout


# --- 3. --threads is a count of at least 1 ---------------------------------------------------------

@pytest.mark.parametrize("command", ["apply", "validate", "search"])
@pytest.mark.parametrize("threads", ["0", "-3"])
def test_threads_below_one_refused(command: str, threads: str, model: Path, tmp_path: Path) -> None:
    args = {"apply": ["apply", model, "--pass", "fold"], "validate": ["validate", model, model],
            "search": ["search", model, "--eval", "x.npz"]}[command]
    proc = run_cli(*args, "--threads", threads, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"--threads {threads} is not a thread count" in _one_line(proc.stderr)


@pytest.mark.parametrize("threads, label", [("1", "(1 thread)"), ("2", "(2 threads)")])
def test_thread_wording(threads: str, label: str, model: Path) -> None:
    proc = run_cli("apply", model, "--pass", "fold", "--threads", threads)
    assert proc.returncode == 0, proc.stderr
    assert f"latency ms {label}" in proc.stdout


# --- 4/5. --shape: a zero is named; ORT's complaint is shown in full -----------------------------------

def test_zero_dim_is_named(model: Path) -> None:
    proc = run_cli("apply", model, "--pass", "fold", "--shape", "x=0x16")
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert "at least 1" in line and "0 (dim 0)" in line and "x=1x16" in line and "is not NAME=" not in line
    assert "is not NAME=" in _one_line(run_cli("apply", model, "--pass", "fold", "--shape", "x=ax16").stderr)


def test_rejected_shape_shows_ort_reason(digits: Path) -> None:
    # cnn.onnx takes x[batch, 1, 8, 8]; 9x9 passes the format check and ORT refuses it
    proc = run_cli("validate", digits / "cnn.onnx", digits / "cnn.onnx", "--shape", "x=1x1x9x9")
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert "index: 2 Got: 9 Expected: 8" in line and "index: 3 Got: 9 Expected: 8" in line
    assert "[ONNXRuntimeError]" not in line


# --- 6. many outputs: the metrics table is never cut ---------------------------------------------------

def _eight_outputs(path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    names = [f"transformer_block_{i}_hidden_state_output" for i in range(8)]
    inits = [init(f"w{i}", rng.standard_normal((64, 10)).astype(np.float32)) for i in range(8)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [n]) for i, n in enumerate(names)]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 10]) for n in names], inits)
    path.write_bytes(proto.SerializeToString())
    return names


def test_metrics_of_eight_outputs_not_cut_at_80_columns(tmp_path: Path) -> None:
    names = _eight_outputs(tmp_path / "eight.onnx")
    proc = run_cli("apply", tmp_path / "eight.onnx", "--pass", "cluster", "--set", "cluster.k=4",
                   "--report", tmp_path / "r.json", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    outputs = json.loads((tmp_path / "r.json").read_text())["validation"]["outputs"]
    assert list(outputs) == names
    table = proc.stdout[proc.stdout.index("validation on"):proc.stdout.index("\nmodel")]
    first_cells = "".join(line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│"))
    assert first_cells == "".join(names)  # every name whole, folded over lines at worst
    from onnxopt.report import _fmt
    for row in outputs.values():
        for value in row.values():
            assert _fmt(value) in table


# --- 7. a recipe table outside --pass: the hint names the recipe --------------------------------------------

def test_recipe_table_outside_the_chain_names_the_recipe(model: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["fold", "prune"]\n[prune]\nratio = 0.5\n')
    proc = run_cli("apply", model, "--recipe", recipe, "--pass", "fold")
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert str(recipe) in line and "[prune]" in line and "--set" not in line
    # typed on the command line, the same mistake still points at --set
    line = _one_line(run_cli("apply", model, "--pass", "fold", "--set", "prune.ratio=0.5").stderr)
    assert "--set prune.KEY" in line


# --- 8. cluster: logical parameters unchanged, stored bytes down ---------------------------------------------

def test_cluster_reports_logical_parameters_and_stored_bytes(digits: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "c.onnx", tmp_path / "c.json"
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "cluster", "--eval", digits / "eval.npz", "-o", out,
                   "--report", report)
    assert proc.returncode == 0, proc.stderr
    v = json.loads(report.read_text())["validation"]
    ref, cand = load_model(digits / "cnn.onnx"), load_model(out)
    assert v["reference"]["parameters"] == count_parameters(ref) == v["candidate"]["parameters"] == count_parameters(cand)
    # the decoded weights are the clustered weights: same elements as the originals
    assert v["candidate"]["weight_bytes"] == stored_weight_bytes(cand) < 0.3 * stored_weight_bytes(ref)
    assert v["ratios"]["weight_bytes"] < 0.3 and v["ratios"]["parameters"] == 1.0
    assert re.search(r"weights stored\s*│[^\n]*│[^\n]*│\s*0\.\d+x", proc.stdout)


def test_logical_parameters_of_dequantized_weights() -> None:
    # an int8 weight decoded by DequantizeLinear counts as its float weight (not 0, not plus scale and zero point)
    w = np.arange(-24, 24, dtype=np.int8).reshape(8, 6)
    proto = make_model(
        [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [init("wq", w), init("s", np.float32(0.1)), init("z", np.int8(0))])
    from tests.helpers import to_ir
    model = to_ir(proto)
    assert count_parameters(model) == 48
    assert stored_weight_bytes(model) == 48 + 4 + 1


# --- 9. the search JSON has the mode of any other output ---------------------------------------------------

def test_report_json_respects_umask(tmp_path: Path) -> None:
    from onnxopt.report import write_json

    old = os.umask(0o027)
    try:
        write_json({"a": 1}, tmp_path / "a.json")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640


# --- 10. plugins: disable by either name, unknown names warned, a broken one skipped ------------------------

def test_disable_by_distribution_name_and_unknown_warned(model: Path, tmp_path: Path) -> None:
    env = probe_env(tmp_path)
    listing = json.loads(run_cli("passes", "--json", env=env).stdout)
    assert "probe_slow" in [e["name"] for e in listing]
    for name in (PLUGIN_NAME, DISTRIBUTION, DISTRIBUTION.replace("-", "_").upper()):
        proc = run_cli("passes", "--json", env={**env, "ONNXOPT_DISABLE_PLUGINS": name})
        names = [e["name"] for e in json.loads(proc.stdout)]
        assert "probe_slow" not in names and "fold" in names, name
        assert "warning" not in proc.stderr
    proc = run_cli("passes", "--json", env={**env, "ONNXOPT_DISABLE_PLUGINS": "onnxopt-prob"})
    assert "probe_slow" in [e["name"] for e in json.loads(proc.stdout)]
    assert "warning: ONNXOPT_DISABLE_PLUGINS names onnxopt-prob, which no installed plugin is called" in proc.stderr
    assert f"{PLUGIN_NAME} ({DISTRIBUTION} {VERSION})" in proc.stderr  # what is installed, to pick from


def test_allowlist_and_no_plugins(tmp_path: Path) -> None:
    env = probe_env(tmp_path)
    for args, extra in ((["--no-plugins"], {}), ([], {"ONNXOPT_PLUGINS": "none"}), ([], {"ONNXOPT_PLUGINS": "fp16_weights"})):
        names = [e["name"] for e in json.loads(run_cli(*args, "passes", "--json", env={**env, **extra}).stdout)]
        assert "probe_slow" not in names and {"fold", "prune", "quant", "cluster"} <= set(names), (args, extra)
    names = [e["name"] for e in json.loads(run_cli("passes", "--json", env={**env, "ONNXOPT_PLUGINS": DISTRIBUTION}).stdout)]
    assert "probe_slow" in names and "fold" in names


def test_broken_plugin_does_not_stop_other_passes(model: Path, tmp_path: Path) -> None:
    env = probe_env(tmp_path, fail="import")
    proc = run_cli("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx", env=env)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: plugin")]
    assert len(warning) == 1 and f"{PLUGIN_NAME} ({DISTRIBUTION} {VERSION}) failed to load" in warning[0]
    assert f"ONNXOPT_DISABLE_PLUGINS={PLUGIN_NAME}" in warning[0] and "probe failure in import" in warning[0]
    # its own pass, asked for: an error naming the plugin that did not load
    proc = run_cli("apply", model, "--pass", "probe_slow", env=env)
    assert proc.returncode == 2
    assert f"plugin {PLUGIN_NAME} ({DISTRIBUTION} {VERSION}) failed to load" in _one_line(
        "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("warning:")))
    proc = run_cli("--no-plugins", "apply", model, "--pass", "fold", env=env)
    assert proc.returncode == 0 and "warning" not in proc.stderr


# --- README: --providers ----------------------------------------------------------------------------------

def test_providers_as_the_readme_says(digits: Path, tmp_path: Path) -> None:
    """PyPI's onnxruntime has no XNNPACK: one line naming what this build has; a provider it has is used."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "XnnpackExecutionProvider" not in have:
        proc = run_cli("validate", digits / "mlp.onnx", digits / "mlp.onnx", "--eval", digits / "eval.npz", "--providers", "xnnpack")
        assert proc.returncode == 2
        line = _one_line(proc.stderr)
        assert "XnnpackExecutionProvider is not offered by this onnxruntime build" in line and all(p in line for p in have)
    other = next((p for p in have if p != "CPUExecutionProvider"), None)
    if other is None:
        pytest.skip("this onnxruntime build has no provider besides CPU")
    proc = run_cli("validate", digits / "mlp.onnx", digits / "mlp.onnx", "--eval", digits / "eval.npz", "--providers", other,
                   "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["providers"] == [other, "CPUExecutionProvider"]
