"""Shared fixtures: the bundled example models and data, and a scratch folder per test."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


@pytest.fixture(scope="session")
def digits() -> Path:
    """Folder of the digits example: cnn.onnx, mlp.onnx, transformer.onnx, calib.npz, eval.npz, train.npz."""
    return DIGITS
