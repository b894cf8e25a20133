"""Models with If/Loop/Scan: every pass goes inside the subgraphs or leaves them with a reason, and never breaks them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.config import build_config
from onnxopt.corpus import candidate_feed, corpus_runs, corpus_settings, outputs_match
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.graph import iter_graphs
from onnxopt.io import load_model, save_model
from onnxopt.pass_api import PassContext
from onnxopt.plugins import load_registry

from tests.graphs import SUBGRAPH_MODELS
from tests.helpers import run_model

REGISTRY = load_registry()
# every pass with its defaults and with the settings that push it further (so it rewrites inside the bodies too)
RUNS = [(name, label, settings) for name in sorted(REGISTRY.passes) for label, settings in corpus_runs(name)]
#: Words a pass's report uses when it leaves a subgraph alone on purpose (lowercase), or the op names (as written).
SUBGRAPH_WORDS = ("subgraph", "subgraphs", "branch", "branches", "body", "bodies")
SUBGRAPH_OPS = re.compile(r"\b(If|Loop|Scan)\b")


def _feeds(kind: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal((5, 64)).astype(np.float32) for _ in range(4)]
    if kind == "if":  # both branches, twice each
        return [{"x": a, "cond": np.array(i % 2 == 0)} for i, a in enumerate(x)]
    return [{"x": a} for a in x]


def _subgraph_fingerprint(model: ir.Model) -> list[tuple[Any, ...]]:
    """What a pass could change inside the subgraphs: their nodes, wiring and weights."""
    prints = []
    for graph in list(iter_graphs(model))[1:]:
        nodes = tuple((n.op_type, tuple(v.name if v is not None else "" for v in n.inputs)) for n in graph)
        weights = tuple(sorted((name, hashlib.sha1(v.const_value.tobytes()).hexdigest())
                               for name, v in graph.initializers.items() if v.const_value is not None))
        prints.append((nodes, weights))
    return prints


def _mentions_subgraphs(report: Any) -> bool:
    texts = [report.summary, *report.notes, *(f"{s.target} {s.reason}" for s in report.skipped)]
    # the bare English word "if" is no explanation: only subgraph words or the op names If/Loop/Scan count
    words = {w for text in texts for w in re.findall(r"[a-z]+", text.lower())}
    return any(w in SUBGRAPH_WORDS for w in words) or any(SUBGRAPH_OPS.search(text) for text in texts)


@pytest.mark.parametrize("kind", list(SUBGRAPH_MODELS))
def test_models_are_valid_and_run(kind: str, tmp_path: Path) -> None:
    proto = SUBGRAPH_MODELS[kind]()
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    assert len(list(iter_graphs(model))) >= 2  # the subgraphs survive loading
    for feed in _feeds(kind):
        np.testing.assert_allclose(run_model(model, feed)[0], run_model(proto, feed)[0], rtol=1e-6)


@pytest.mark.parametrize("kind", list(SUBGRAPH_MODELS))
@pytest.mark.parametrize("pass_name,label,settings", RUNS, ids=[label for _, label, _ in RUNS])
def test_pass_keeps_subgraphs_working(pass_name: str, label: str, settings: dict, kind: str, tmp_path: Path) -> None:
    proto = SUBGRAPH_MODELS[kind]()
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    before = path.read_bytes()
    model = load_model(path)
    feeds = _feeds(kind)
    data = Dataset("subgraph feeds", feeds=feeds, batch_size=5)
    cls = REGISTRY.passes[pass_name]
    ctx = PassContext(calibration=data, evaluation=data, base_dir=tmp_path)
    config = build_config(cls.Config, {**corpus_settings(pass_name, path), **settings}, pass_name=pass_name)
    try:
        result = cls().apply(model, config, ctx)
    except OnnxoptError as err:  # a clean refusal of the whole model is a reason too
        assert str(err).strip() and "\n" not in str(err)
        return
    out = tmp_path / "out.onnx"
    save_model(result.model, out)  # checks the result with onnx.checker before writing
    reloaded = load_model(out)
    assert path.read_bytes() == before

    touched = _subgraph_fingerprint(reloaded) != _subgraph_fingerprint(model)
    assert touched or not result.modified or _mentions_subgraphs(result.report), (
        f"{label} changed the model but left the {kind} subgraphs alone without saying why: {result.report.to_dict()}")

    if not cls.comparable:  # e.g. distill: other inputs/outputs on purpose; it must still run on ORT
        for feed in feeds:
            got = run_model(reloaded, candidate_feed(feed, reloaded, run_model(proto, feed)))
            assert all(np.isfinite(g).all() for g in got if np.asarray(g).dtype.kind == "f"), pass_name
        return
    for feed in feeds:
        expected, got = run_model(proto, feed), run_model(reloaded, feed)
        if cls.lossless:
            assert outputs_match(expected, got) is None, pass_name
        else:
            assert [g.shape for g in got] == [e.shape for e in expected]
            assert all(np.isfinite(g).all() for g in got), f"{pass_name} made non-finite outputs on {kind}"
