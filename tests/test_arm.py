"""`onnxopt validate --target arm64`: the aarch64 onnxruntime under qemu-user emulation against the x86 run.

The emulated environment comes from scripts/setup_arm64.sh; without it the
arm64 run is skipped and only the one-line error is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxopt.api import apply
from onnxopt.arm import SETUP_SCRIPT, SYSROOT_ENV, find_runtime
from onnxopt.errors import OnnxoptError
from tests.conftest import unavailable
from tests.helpers import run_cli, run_model


def _have_runtime() -> bool:
    try:
        find_runtime()
        return True
    except OnnxoptError:
        return False


def test_missing_environment_is_one_line_naming_the_setup_script(digits: Path, tmp_path: Path) -> None:
    proc = run_cli("validate", digits / "mlp.onnx", digits / "mlp.onnx", "--eval", digits / "eval.npz", "--target", "arm64",
                   env={SYSROOT_ENV: str(tmp_path / "nowhere")})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and SETUP_SCRIPT in proc.stderr and "no arm64 environment" in proc.stderr


def test_int8_model_on_arm64_matches_x86(digits: Path, tmp_path: Path) -> None:
    if not _have_runtime():
        unavailable("arm64", f"no arm64 environment (bash {SETUP_SCRIPT})")
    # 128 samples keep the emulated run short
    ev = np.load(digits / "eval.npz")
    np.savez(tmp_path / "eval128.npz", x=ev["x"][:128], labels=ev["labels"][:128])
    apply(digits / "mlp.onnx", "fold,quant", tmp_path / "int8.onnx", data=digits / "calib.npz", validate_result=False)
    proc = run_cli("validate", digits / "mlp.onnx", tmp_path / "int8.onnx", "--eval", tmp_path / "eval128.npz",
                   "--target", "arm64", "--report", tmp_path / "arm.json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "not a device latency" in proc.stdout
    target = json.loads((tmp_path / "arm.json").read_text())["target"]
    assert target["machine"] == "aarch64"
    ref, cand = target["runs"]["reference"], target["runs"]["candidate"]
    # fp32 on aarch64 agrees with x86 to float rounding; int8 to the 0.2 pt the issue asks
    assert ref["top1_agreement"] == 1.0 and ref["max_abs_diff"] < 1e-3
    assert abs(cand["accuracy_arm"] - cand["accuracy_x86"]) <= 0.002
    # the x86 side is real: the int8 model's accuracy computed here with this machine's ORT
    logits = run_model(tmp_path / "int8.onnx", {"x": ev["x"][:128]})[0]
    assert cand["accuracy_x86"] == pytest.approx(float((logits.argmax(1) == ev["labels"][:128]).mean()))
    assert target["drop"] == pytest.approx(ref["accuracy_arm"] - cand["accuracy_arm"])
