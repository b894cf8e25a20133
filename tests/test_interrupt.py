"""SIGINT/SIGTERM during a pass or a save: no output file, no temp file, the input unchanged (real subprocesses).

The probe plugin (tests/probe_plugin) pauses the process at a known point and
says so in a marker file; the test waits for that line, then sends the signal.
No timing guesses: a process that never reaches its point fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.graphs import gemm_chain
from tests.helpers import run_model, sigint_as_a_terminal_gives_it
from tests.probe_plugin import probe_env

INTERRUPTED_EXIT = 130
REACH_TIMEOUT = 60.0


def _start(tmp_path: Path, model: Path, passes: str, pause: str) -> tuple[subprocess.Popen[str], Path, Path]:
    marker = tmp_path / "marker.txt"
    scratch = tmp_path / "tmp"  # the process's TMPDIR: session temp folders must be gone too
    scratch.mkdir()
    env = {**os.environ, **probe_env(tmp_path, marker=marker, pause=pause), "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", "apply", str(model), "--pass", passes,
                             "-o", str(tmp_path / "out" / "out.onnx")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_a_terminal_gives_it)
    return proc, marker, scratch


def _wait_for(proc: subprocess.Popen[str], marker: Path, point: str) -> None:
    deadline = time.monotonic() + REACH_TIMEOUT
    while time.monotonic() < deadline:
        if marker.exists() and point in marker.read_text().splitlines():
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended before reaching {point!r}: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"process never reached {point!r}")


def _model(tmp_path: Path, external: bool) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    proto = gemm_chain((64, 128, 16))
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    else:
        onnx.save_model(proto, str(path))
    return path


def _leftovers(scratch: Path) -> list[str]:
    # `import onnxruntime` keeps its telemetry session id in $TMPDIR/.ses: ORT's own file, not a leftover
    return sorted(p.name for p in scratch.iterdir() if p.name != ".ses")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point,passes,external", [
    ("pass", "probe_slow", False),
    ("save", "fold", False),
    ("save", "fold", True),
], ids=["during-pass", "during-save", "during-save-external-data"])
def test_interrupt_leaves_nothing(tmp_path: Path, sig: signal.Signals, point: str, passes: str, external: bool) -> None:
    model = _model(tmp_path, external)
    before = _snapshot(model.parent)
    (tmp_path / "out").mkdir()
    proc, marker, scratch = _start(tmp_path, model, passes, point)
    _wait_for(proc, marker, point)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=REACH_TIMEOUT)
    assert proc.returncode == INTERRUPTED_EXIT, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), stderr
    assert list((tmp_path / "out").iterdir()) == []  # no output, no data file, no temp folder
    assert _leftovers(scratch) == []
    assert _snapshot(model.parent) == before


def test_interrupt_keeps_previous_output(tmp_path: Path) -> None:
    """An output from an earlier run survives an interrupted save untouched (the rename never happened)."""
    model = _model(tmp_path, external=False)
    (tmp_path / "out").mkdir()
    old = tmp_path / "out" / "out.onnx"
    old.write_bytes(b"earlier result")
    proc, marker, _ = _start(tmp_path, model, "fold", "save")
    _wait_for(proc, marker, "save")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=REACH_TIMEOUT)
    assert proc.returncode == INTERRUPTED_EXIT
    assert sorted(p.name for p in old.parent.iterdir()) == ["out.onnx"] and old.read_bytes() == b"earlier result"


def test_interrupt_inside_commit_leaves_a_whole_output(tmp_path: Path) -> None:
    """A signal between the data file's rename and the model's is held back: the pair lands whole."""
    model = _model(tmp_path, external=True)
    (tmp_path / "out").mkdir()
    proc, marker, scratch = _start(tmp_path, model, "fold", "commit")
    _wait_for(proc, marker, "commit")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=REACH_TIMEOUT)
    assert proc.returncode == INTERRUPTED_EXIT
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert _leftovers(scratch) == []
    onnx.checker.check_model(str(out / "out.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_model(out / "out.onnx", {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
