"""Every class of bad input: one line saying what is wrong and how to fix it, exit 2, nothing written, input unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxopt.cli import cli

from tests.helpers import run_cli


@pytest.fixture()
def work(tmp_path: Path, digits: Path) -> Path:
    for name in ("cnn.onnx", "eval.npz", "calib.npz"):
        shutil.copy(digits / name, tmp_path / name)
    return tmp_path


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_clean_failure(result, work: Path, must_mention: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and must_mention.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output
    assert not (work / "out.onnx").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".out.onnx")], "temp files left behind"


def _write_bad_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


CASES = {
    "missing model": (lambda w: ["apply", w / "nope.onnx", "--pass", "fold", "-o", w / "out.onnx"], "no such file"),
    "not onnx": (lambda w: ["apply", w / "eval.npz", "--pass", "fold", "-o", w / "out.onnx"], "not"),
    "truncated model": (lambda w: (w / "t.onnx").write_bytes((w / "cnn.onnx").read_bytes()[:5000]) and
                        ["apply", w / "t.onnx", "--pass", "fold", "-o", w / "out.onnx"], "t.onnx"),
    "unknown pass": (lambda w: ["apply", w / "cnn.onnx", "--pass", "shrinkify", "-o", w / "out.onnx"], "unknown pass"),
    "unknown key": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--set", "fold.colour=red", "-o", w / "out.onnx"],
                    "unknown config key fold.colour"),
    "mistyped value": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--set", "fold.batchnorm=maybe", "-o", w / "out.onnx"],
                       "not a boolean"),
    "malformed set": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--set", "batchnorm", "-o", w / "out.onnx"], "PASS.KEY=VALUE"),
    "settings for absent pass": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--set", "quant.method=mse", "-o", w / "out.onnx"],
                                 "not in the chain"),
    "output is input": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "-o", w / "cnn.onnx"], "is the input"),
    "data wrong name": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--eval",
                                   _write_bad_npz(w / "bad.npz", image=np.zeros((4, 1, 8, 8), np.float32)), "-o", w / "out.onnx"], "no array"),
    "data wrong shape": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--eval",
                                    _write_bad_npz(w / "bad.npz", x=np.zeros((4, 1, 9, 8), np.float32)), "-o", w / "out.onnx"], "axis 2"),
    "data wrong dtype": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--eval",
                                    _write_bad_npz(w / "bad.npz", x=np.zeros((4, 1, 8, 8), np.float64)), "-o", w / "out.onnx"], "dtype"),
    "data wrong rank": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--eval",
                                   _write_bad_npz(w / "bad.npz", x=np.zeros((4, 64), np.float32)), "-o", w / "out.onnx"], "dims"),
    "missing data file": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--eval", w / "none.npz", "-o", w / "out.onnx"], "no such file"),
    "bad shape flag": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--shape", "x=1by3", "-o", w / "out.onnx"], "--shape"),
    "missing output folder": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "-o", w / "no" / "out.onnx"], "does not exist"),
    "bad recipe": (lambda w: (w / "r.toml").write_text("passes = [") and
                   ["apply", w / "cnn.onnx", "--recipe", w / "r.toml", "-o", w / "out.onnx"], "not valid TOML"),
    "missing provider": (lambda w: ["apply", w / "cnn.onnx", "--pass", "fold", "--providers", "NoSuchExecutionProvider",
                                    "-o", w / "out.onnx"], "not offered"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_exit_2(case: str, work: Path) -> None:
    make_args, mention = CASES[case]
    before = (work / "cnn.onnx").read_bytes()
    result = _invoke(*make_args(work))
    _assert_clean_failure(result, work, mention)
    assert (work / "cnn.onnx").read_bytes() == before


def test_subprocess_error_has_no_traceback(work: Path) -> None:
    proc = run_cli("apply", work / "cnn.onnx", "--pass", "fold", "--set", "fold.nope=1", "-o", work / "out.onnx")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (work / "out.onnx").exists()


def test_debug_shows_traceback(work: Path) -> None:
    proc = run_cli("--debug", "apply", work / "cnn.onnx", "--pass", "fold", "--set", "fold.nope=1", "-o", work / "out.onnx")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
