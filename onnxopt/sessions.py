"""ONNX Runtime sessions, made one way for validation, calibration and benchmarks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import OnnxoptError
from onnxopt.io import PROTOBUF_LIMIT, serialize_model, tensor_bytes

__all__ = ["SessionFactory", "available_providers", "resolve_providers", "run_batches"]

# ORT logs optimizer warnings to stderr by default; a user sees our report, not its internals.
ort.set_default_logger_severity(4)

#: Short CLI spellings of execution providers.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime build offers."""
    return list(ort.get_available_providers())


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """Map user spellings to provider names; CPU is always last as the fallback.

    A provider the installed onnxruntime lacks is a clear error, not a crash.
    """
    wanted = [PROVIDER_ALIASES.get(n.strip().lower(), n.strip()) for n in (names or []) if n.strip()]
    have = available_providers()
    missing = [p for p in wanted if p not in have]
    if missing:
        raise OnnxoptError(
            f"execution provider {', '.join(missing)} is not offered by this onnxruntime build (it has {', '.join(have)})",
            "install an onnxruntime build with that provider, or drop --providers",
        )
    providers = [p for p in wanted if p != "CPUExecutionProvider"]
    return [*providers, "CPUExecutionProvider"]


@dataclass
class SessionFactory:
    """Creates ORT sessions with one set of providers and a fixed thread count.

    ``threads`` fixes intra-op threads so latency figures are comparable;
    ``optimization`` is ORT's graph optimization level.
    """

    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 1
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def options(self, optimized_model_path: str | os.PathLike[str] | None = None) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = self.optimization
        opts.log_severity_level = 3
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
        return opts

    def create(
        self,
        model: ir.Model | str | os.PathLike[str] | bytes,
        *,
        optimized_model_path: str | os.PathLike[str] | None = None,
    ) -> ort.InferenceSession:
        """A session for an in-memory model, a file, or serialised bytes.

        Models over the protobuf limit are written to a temporary folder with
        external data first, since ORT cannot take them as bytes.
        """
        opts = self.options(optimized_model_path)
        if isinstance(model, ir.Model):
            if tensor_bytes(model) >= PROTOBUF_LIMIT:
                tmp = Path(tempfile.mkdtemp(prefix="onnxopt-session-"))
                try:
                    path = tmp / "model.onnx"
                    ir.save(model, path, external_data="model.onnx.data")
                    return self._session(str(path), opts)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            return self._session(serialize_model(model), opts)
        if isinstance(model, (bytes, bytearray)):
            return self._session(bytes(model), opts)
        return self._session(str(model), opts)

    def _session(self, source: str | bytes, opts: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(source, sess_options=opts, providers=self.providers)
        except Exception as err:  # ORT raises several types (Fail, InvalidGraph, NotImplemented, RuntimeError)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OnnxoptError(f"ONNX Runtime cannot load the model: {first[:300]}",
                               "check the model with `onnxopt inspect`; unsupported ops need a newer onnxruntime") from None


def run_batches(
    session: ort.InferenceSession,
    batches: Iterator[dict[str, np.ndarray]],
    output_names: Sequence[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``session`` on each feed; yield ``{output name: array}`` per batch."""
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    for feed in batches:
        try:
            results = session.run(names, feed)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OnnxoptError(f"ONNX Runtime failed while running the model: {first[:300]}",
                               "check that the data matches the model's inputs (`onnxopt inspect`)") from None
        yield dict(zip(names, results))
