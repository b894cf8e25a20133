"""Test helpers: run models on real ONNX Runtime sessions and the CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.io import serialize_model

__all__ = ["run_model", "run_cli", "file_digest", "to_ir", "confirmation_part"]


def _session(model: onnx.ModelProto | ir.Model | str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if isinstance(model, ir.Model):
        source: str | bytes = serialize_model(model)
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        source = str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_model(model: onnx.ModelProto | ir.Model | str | Path, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` on ``feed`` from a real ORT CPU session."""
    return _session(model).run(None, dict(feed))


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    """A hand-built proto as an IR model (checked first, so tests start from valid graphs)."""
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def run_cli(*args: str | Path, cwd: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m onnxopt ARGS`` in a subprocess; returns the completed process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def sigint_as_a_terminal_gives_it() -> None:
    """``preexec_fn`` of a child the test will Ctrl-C: a shell starts background jobs with SIGINT ignored, Python keeps
    an ignored SIGINT ignored (as onnxopt should), and a suite run in the background (CI runners, ``pytest &``) must
    still test Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def file_digest(path: Path) -> bytes:
    """Contents of a file, to prove an input was not modified."""
    return Path(path).read_bytes()


def confirmation_part(npz: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of ``npz`` that `apply` (run with ``seed``) validates and gates on: its confirmation part."""
    from onnxopt.data import Dataset
    from onnxopt.split import split_dataset

    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    labels = arrays.pop("labels", None)
    split = split_dataset(Dataset(str(npz), arrays, [], labels), seed)
    out = {k: v[split.confirmation_indices] for k, v in arrays.items()}
    if labels is not None:
        out["labels"] = labels[split.confirmation_indices]
    return out
