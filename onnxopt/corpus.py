"""The onnx wheel's own backend test models, as a corpus to run every pass over."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.data import Dataset, input_specs, load_dataset, synthetic_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.io import load_model, serialize_model
from onnxopt.sessions import SessionFactory

__all__ = ["CorpusModel", "corpus_root", "iter_corpus", "CORPUS_SUITES", "Runner", "runner_for", "outputs_match"]

CORPUS_SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple", "real")


@dataclass(frozen=True)
class CorpusModel:
    """One corpus model: its suite, name, path, and the test-data folder beside it (if any)."""

    suite: str
    name: str
    path: Path
    data_dir: Path | None

    def dataset(self) -> Dataset:
        """Its own test inputs when shipped, else synthetic inputs from its (fixed) shapes."""
        model = load_model(self.path)
        specs = input_specs(model)
        if self.data_dir is not None:
            return load_dataset(self.data_dir, specs)
        return synthetic_dataset(specs, samples=1)


def corpus_root() -> Path:
    """Where the installed onnx package keeps its backend test data."""
    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


def iter_corpus(suites: tuple[str, ...] = CORPUS_SUITES) -> Iterator[CorpusModel]:
    """Every corpus model that exists in this onnx install (the `real` suite ships no weights, only stubs)."""
    root = corpus_root()
    for suite in suites:
        folder = root / suite
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and (entry / "model.onnx").is_file():
                data = entry if any(entry.glob("test_data_set_*")) else None
                yield CorpusModel(suite, entry.name, entry / "model.onnx", data)
            elif entry.suffix == ".onnx":
                yield CorpusModel(suite, entry.stem, entry, None)


#: Runs a model on one feed and returns its outputs in order.
Runner = Callable[[Mapping[str, np.ndarray]], list]


def runner_for(model: ir.Model, engine: str | None = None) -> tuple[str, Runner]:
    """A way to run ``model``: ONNX Runtime when it loads the model, else ONNX's reference evaluator.

    Many corpus models use opsets ORT no longer implements (opset 6 Add/Gemm)
    or need a locale this machine lacks; the reference evaluator still runs them.
    """
    if engine in (None, "ort"):
        try:
            session = SessionFactory().create(model)
            return "ort", lambda feed: session.run(None, dict(feed))
        except OnnxoptError:
            if engine == "ort":
                raise
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(onnx.load_from_string(serialize_model(model)))
    return "reference", lambda feed: evaluator.run(None, dict(feed))


def outputs_match(expected: list, got: list, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    """None when every output matches (numbers within tolerance, strings equal), else what differs."""
    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, got)):
        if isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                return f"output {i}: sequence lengths differ"
            inner = outputs_match(a, b, rtol, atol)
            if inner:
                return f"output {i}: {inner}"
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"output {i}: shape {b.shape} instead of {a.shape}"
        if a.dtype.kind in "OUSb" or b.dtype.kind in "OUSb":
            if not np.array_equal(a, b):
                return f"output {i}: values differ"
        elif not np.allclose(b.astype(np.float64), a.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
            err = float(np.max(np.abs(b.astype(np.float64) - a.astype(np.float64))))
            return f"output {i}: max abs error {err:.3g}"
    return None
