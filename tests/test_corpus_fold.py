"""fold over every model in the onnx wheel's backend test data: equivalent, valid, reloadable."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxopt.corpus import iter_corpus, outputs_match, runner_for
from onnxopt.io import load_model, save_model
from onnxopt_passes.fold import FoldPass

CORPUS = list(iter_corpus(("light", "pytorch-converted", "pytorch-operator", "simple")))
# Ops no engine here implements (training-only): their models can only be checked for validity.
UNRUNNABLE_DOMAINS = {"ai.onnx.preview.training"}


def test_corpus_is_present() -> None:
    assert len(CORPUS) > 100


@pytest.mark.parametrize("case", CORPUS, ids=[f"{c.suite}/{c.name}" for c in CORPUS])
def test_fold_is_lossless_on_corpus(case, tmp_path: Path) -> None:
    model = load_model(case.path)
    result = FoldPass().apply(model)
    out = tmp_path / "folded.onnx"
    save_model(result.model, out)
    onnx.checker.check_model(str(out))
    reloaded = load_model(out)
    if any(n.domain in UNRUNNABLE_DOMAINS for n in model.graph):
        assert len(list(reloaded.graph)) == len(list(model.graph))
        return
    engine, run_reference = runner_for(model)
    _, run_folded = runner_for(reloaded, engine)
    for feed in case.dataset().batches():
        problem = outputs_match(run_reference(feed), run_folded(feed))
        assert problem is None, f"{engine}: {problem}"
