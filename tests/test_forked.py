"""onnxopt.forked: a call or a CLI run in a forked child, its crash or hang reported instead of shared."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from onnxopt.cli import cli
from onnxopt.forked import call_forked, exit_description, run_cli_forked
from tests.helpers import run_cli

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")


def _kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(10)


def _raise() -> None:
    raise ValueError("no\nway")


def test_a_forked_call_returns_its_value() -> None:
    result = call_forked(np.arange, 6)
    assert result.ok and result.value.tolist() == list(range(6))
    big = call_forked(np.ones, 3_000_000)  # 24 MB: more than a pipe holds, read while written
    assert big.ok and big.value.shape == (3_000_000,) and big.value.sum() == 3_000_000


def test_a_forked_call_reports_its_exception_in_one_line() -> None:
    result = call_forked(_raise)
    assert not result.ok and result.died is None and result.error == "ValueError: no way"


@pytest.mark.parametrize("signum", [signal.SIGABRT, signal.SIGSEGV, signal.SIGKILL])
def test_a_child_killed_by_a_signal_is_reported_not_shared(signum: int) -> None:
    result = call_forked(_kill_self, signum)
    assert not result.ok and result.died == signal.Signals(signum).name and result.error is None
    assert exit_description(-signum) == signal.Signals(signum).name and exit_description(3) == "exit code 3"


def test_a_hanging_child_is_killed_at_its_timeout() -> None:
    start = time.perf_counter()
    result = call_forked(time.sleep, 60, timeout=1.0)
    assert result.died == "timed out after 1 s" and time.perf_counter() - start < 20


@pytest.mark.parametrize("args", [["inspect", "{tmp}/missing.onnx"], ["inspect", "{tmp}/garbage.onnx"],
                                  ["apply", "--bogus"], ["apply", "{tmp}/garbage.onnx", "--pass", "nosuchpass"],
                                  ["--help"]])
def test_a_forked_cli_run_gives_the_console_scripts_exit_code_and_stderr(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    argv = [a.format(tmp=tmp_path) for a in args]
    expected = run_cli(*argv)
    code, seconds = run_cli_forked(argv, tmp_path / "out.txt", tmp_path / "err.txt", cli, timeout=120)
    assert code == expected.returncode and seconds > 0
    assert (tmp_path / "err.txt").read_text() == expected.stderr
    assert (tmp_path / "out.txt").read_text() == expected.stdout


def test_an_ort_crash_in_the_probe_is_one_error_line_and_anything_else_is_left_to_the_run() -> None:
    from onnxopt.errors import OnnxoptError
    from onnxopt.validate import probe_verdict

    with pytest.raises(OnnxoptError, match=r"ONNX Runtime crashed \(SIGSEGV\)"):
        probe_verdict(call_forked(_kill_self, signal.SIGSEGV))
    with pytest.raises(OnnxoptError, match=r"crashed \(SIGABRT\)"):
        probe_verdict(call_forked(os.abort))
    probe_verdict(call_forked(_raise))  # ORT raised: the run says it in its own words
    probe_verdict(call_forked(time.sleep, 60, timeout=0.5))  # out of time: inconclusive, the run goes on
    probe_verdict(call_forked(np.arange, 3))


def test_apply_probes_a_small_model_and_still_reports_what_ort_refuses(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from onnxopt.io import load_model
    from onnxopt.sessions import SessionFactory
    from onnxopt.validate import probe_model

    root = Path(__file__).resolve().parents[1] / "examples" / "digits"
    model = load_model(root / "cnn.onnx")
    probe_model(model, {"x": np.zeros((1, 1, 8, 8), np.float32)}, SessionFactory())  # loads and runs: no error
    done = run_cli("apply", root / "cnn.onnx", "--pass", "fold", "--eval", root / "eval.npz", "--probe", "-q",
                   "--time-budget", "0.5", "-o", tmp_path / "out.onnx")
    assert done.returncode == 0, done.stderr
    # an op ORT has no kernel for: ORT raises (no crash), so the probe stays silent and the run's own message is kept
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Celu", ["x"], ["y"], alpha=1.0)], "g", [helper.make_tensor_value_info("x", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2])]), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(bad, tmp_path / "bad.onnx")
    probed = run_cli("apply", tmp_path / "bad.onnx", "--pass", "fold", "--probe", "-q", "-o", tmp_path / "b1.onnx")
    unprobed = run_cli("apply", tmp_path / "bad.onnx", "--pass", "fold", "--no-probe", "-q", "-o", tmp_path / "b2.onnx")
    assert probed.returncode == unprobed.returncode == 2 and probed.stderr == unprobed.stderr
    assert "crashed" not in probed.stderr
    checked = [run_cli("validate", tmp_path / "bad.onnx", tmp_path / "bad.onnx", flag, "-q", "--time-budget", "0.5")
               for flag in ("--probe", "--no-probe")]
    assert checked[0].returncode == checked[1].returncode == 2 and checked[0].stderr == checked[1].stderr
