"""The onnx wheel's own backend test models, as a corpus to run every pass over."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.data import Dataset, input_specs, load_dataset, synthetic_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.io import load_model, serialize_model
from onnxopt.pass_api import Pass
from onnxopt.plugins import Registry
from onnxopt.sessions import SessionFactory

__all__ = ["CorpusModel", "corpus_root", "iter_corpus", "CORPUS_SUITES", "Runner", "runner_for", "outputs_match",
           "Outcome", "check_pass", "corpus_settings", "corpus_runs", "candidate_feed", "UNRUNNABLE_DOMAINS"]

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


# Ops no engine here implements (training-only): their models can only be checked for validity.
UNRUNNABLE_DOMAINS = frozenset({"ai.onnx.preview.training"})

@functools.lru_cache(maxsize=1)
def _installed() -> Registry:
    from onnxopt.plugins import load_registry

    return load_registry()


def _pass_class(pass_name: str) -> type[Pass[Any]]:
    return _installed().get_pass(pass_name)


def corpus_runs(pass_name: str) -> list[tuple[str, dict[str, Any]]]:
    """``(label, settings)`` of every corpus run of a pass: its defaults, then the variants it declares
    (:attr:`onnxopt.Pass.corpus_variants`)."""
    variants = _pass_class(pass_name).corpus_variants
    return [(pass_name, {})] + [(f"{pass_name}[{','.join(f'{k}={v}' for k, v in v.items())}]", dict(v)) for v in variants]


def corpus_settings(pass_name: str, model_path: Path) -> dict[str, Any]:
    """The ``--set`` values used for ``pass_name`` on the model at ``model_path``, as the pass declares
    (:meth:`onnxopt.Pass.corpus_settings`; empty for most passes)."""
    return dict(_pass_class(pass_name).corpus_settings(model_path))


@dataclass(frozen=True)
class Outcome:
    """One pass on one corpus model: ``ok``, ``skipped`` (with the reason) or ``failed`` (with what broke)."""

    status: str
    detail: str = ""
    seconds: float = 0.0
    #: for ``ok``: whether the pass changed the model (False: it ran and found nothing to do)
    changed: bool = False


def candidate_feed(feed: Mapping[str, np.ndarray], model: ir.Model, expected: list) -> dict[str, np.ndarray]:
    """The original's feed for a pass's result: its own inputs, plus inputs the pass added.

    distill adds a labels input; its metadata names it and the student's logits
    output, so the labels are class 0 at every position of those logits.
    """
    specs = input_specs(model)
    out = {s.name: np.asarray(feed[s.name]) for s in specs if s.name in feed}
    missing = [s for s in specs if s.name not in out]
    if not missing:
        return out
    labels = json.loads(model.metadata_props.get("onnxopt.distill.inputs", "{}")).get("labels")
    student = json.loads(model.metadata_props.get("onnxopt.distill.outputs", "{}")).get("student")
    logits = dict(zip([v.name for v in model.graph.outputs], expected)).get(student)
    for spec in missing:
        if spec.name == labels and logits is not None:
            out[spec.name] = np.zeros(np.shape(logits)[:-1], np.int64)
    rest = [s for s in missing if s.name not in out]
    if rest:
        out.update(next(iter(synthetic_dataset(rest, samples=1).batches())))
    return out


def check_pass(
    case: CorpusModel,
    pass_cls: type[Pass[Any]],
    workdir: Path,
    settings: Mapping[str, Any] | None = None,
) -> Outcome:
    """Load ``case``, run ``pass_cls`` on it, save, reload, and run the result next to the original.

    A lossless pass must give the same outputs; any other pass must give a
    valid model that the original's engine still runs, with the same outputs
    (count and shapes) unless the pass changes the interface on purpose. A
    pass that declines (``PassSkipped``) or refuses with a one-line
    ``OnnxoptError`` is ``skipped``; anything else that goes wrong is ``failed``.
    """
    from onnxopt.config import build_config
    from onnxopt.io import save_model
    from onnxopt.pass_api import CALIBRATION_DATA, EVALUATION_DATA, PassContext

    start = time.perf_counter()

    changed = False

    def done(status: str, detail: str = "") -> Outcome:
        return Outcome(status, " ".join(detail.split())[:300], time.perf_counter() - start, changed)

    original_bytes = case.path.read_bytes()
    model = load_model(case.path)
    try:
        dataset: Dataset | None = case.dataset()
    except OnnxoptError:
        dataset = None
    needs = pass_cls.requires & {CALIBRATION_DATA, EVALUATION_DATA}
    if needs and dataset is None:
        return done("skipped", "needs data and the model has free input dims and no test data")
    try:
        config = build_config(pass_cls.Config, {**pass_cls.corpus_settings(case.path), **(settings or {})},
                              pass_name=pass_cls.name)
        ctx = PassContext(calibration=dataset, evaluation=dataset, base_dir=case.path.parent)
        result = pass_cls().apply(model, config, ctx)
    except OnnxoptError as err:
        return _refusal(err, model)
    except Exception as err:  # a crash: exactly what the corpus run is here to find
        return done("failed", f"crash in {pass_cls.name}: {type(err).__name__}: {err}")
    if result.report.summary.startswith("skipped:"):
        return done("skipped", result.report.summary[len("skipped:"):].strip())
    changed = result.modified
    out = workdir / f"{pass_cls.name}.onnx"
    try:
        save_model(result.model, out)
        reloaded = load_model(out)
    except OnnxoptError as err:
        return done("failed", f"invalid output: {err}")
    if case.path.read_bytes() != original_bytes:
        return done("failed", "the input model file changed")
    if any(n.domain in UNRUNNABLE_DOMAINS for n in ir.traversal.RecursiveGraphIterator(model.graph)):
        return done("ok", "valid (training ops: no engine runs it)")
    try:
        engine, run_original = runner_for(model)
    except Exception:  # neither engine runs the original: validity is all there is to check
        return done("ok", "valid (no engine runs the original)")
    try:
        # a result of an ORT-runnable model must run on ORT; one of a model only the reference evaluator
        # runs may run on either (a pass that upgrades the opset can make it ORT-runnable)
        _, run_result = runner_for(reloaded, "ort" if engine == "ort" else None)
        pairs = []
        for feed in dataset.batches() if dataset is not None else []:
            expected = run_original(feed)
            pairs.append((expected, run_result(candidate_feed(feed, reloaded, expected))))
    except Exception as err:
        return done("failed", f"{engine} cannot run the output: {type(err).__name__}: {err}")
    nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(reloaded.graph))
    if not pass_cls.comparable:
        return done("ok", f"runs on {engine}" if pairs else "valid (no data to run it on)")
    for expected, got in pairs:
        if pass_cls.lossless:
            problem = outputs_match(expected, got)
        else:
            problem = _same_interface(expected, got)
        if problem:
            return done("failed", f"{engine}: {problem}")
    drift = max((_max_error(e, g) for e, g in pairs), default=0.0)
    return done("ok", f"{engine}, {nodes} nodes" + ("" if pass_cls.lossless else f", max abs error {drift:.3g}"))


def _refusal(err: OnnxoptError, model: ir.Model) -> Outcome:
    """A pass's refusal: ``skipped`` when it is one line and not contradicted, else ``failed``.

    Not every OnnxoptError is a fine refusal: a multi-line one is a leaked
    traceback or tool output, and one that says ONNX Runtime cannot load a
    model ORT loads is false (quant said so of models fold had broken).
    """
    text = str(err).strip()
    if "\n" in text or not text:
        return Outcome("failed", f"refusal is not one line: {text[:200]!r}")
    if "runtime cannot load" in text.lower():
        try:
            SessionFactory().create(model)
        except OnnxoptError:
            pass
        else:
            return Outcome("failed", f"false refusal (ONNX Runtime loads the original): {text[:200]}")
    return Outcome("skipped", " ".join(f"refused: {text}".split())[:300])


def _same_interface(expected: list, got: list) -> str | None:
    """None when a lossy result has the original's outputs (count, shapes, dtypes), else what differs."""
    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, got)):
        if isinstance(a, list) or isinstance(b, list):
            if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
                return f"output {i}: sequence differs"
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {b.dtype}{list(b.shape)} instead of {a.dtype}{list(a.shape)}"
    return None


def _max_error(expected: list, got: list) -> float:
    errors = [float(np.max(np.abs(np.asarray(b, np.float64) - np.asarray(a, np.float64))))
              for a, b in zip(expected, got)
              if not isinstance(a, list) and np.asarray(a).dtype.kind in "fiu" and np.asarray(a).size]
    return max(errors, default=0.0)
