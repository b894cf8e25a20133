"""onnxopt: compress ONNX models and prove on ONNX Runtime what each pass cost and won."""

from __future__ import annotations

from onnxopt.config import option
from onnxopt.errors import OnnxoptError, PassSkipped
from onnxopt.hookspecs import hookimpl
from onnxopt.io import load_model, save_model
from onnxopt.metrics import Metric
from onnxopt.pass_api import CALIBRATION_DATA, EVALUATION_DATA, Pass, PassContext, PassReport, PassResult, PassSpace, Skip

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "apply",
    "validate_models",
    "load_model",
    "save_model",
    "option",
    "hookimpl",
    "Metric",
    "Pass",
    "PassContext",
    "PassReport",
    "PassResult",
    "PassSpace",
    "PassSkipped",
    "Skip",
    "OnnxoptError",
    "CALIBRATION_DATA",
    "EVALUATION_DATA",
]


def __getattr__(name: str):  # the API module pulls in sessions and plugins: load it on first use
    if name in ("apply", "validate_models"):
        from onnxopt import api

        return getattr(api, name)
    raise AttributeError(name)
