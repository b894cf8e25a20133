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


#: Comma-separated features whose tests must run where this is set (CI sets all of them): a missing one fails
#: the test instead of skipping it, so CI cannot pass while quietly not testing what the README claims.
REQUIRE_ENV = "ONNXOPT_REQUIRE"
FEATURES = ("ray", "arm64", "real-models", "chromium", "build")


def unavailable(feature: str, reason: str) -> None:
    """Skip a test whose ``feature`` is missing here, or fail it when ``$ONNXOPT_REQUIRE`` names the feature."""
    import os

    assert feature in FEATURES, feature
    required = {f.strip() for f in os.environ.get(REQUIRE_ENV, "").split(",")}
    if feature in required or "all" in required:
        pytest.fail(f"{reason}; {REQUIRE_ENV} says the {feature} tests must run", pytrace=False)
    pytest.skip(reason)


