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


#: Corpus models fold must change (it changed 6 of 149 before its own shape folding; measured, not guessed:
#: benchmarks/results/corpus.md). A fold that silently stops folding fails here, not only one that folds wrong.
MIN_CHANGED = 6
#: Whether fold changed each corpus model, filled by the parametrised test (same worker: --dist loadfile).
CHANGED: dict[str, bool] = {}


def _fold_case(case, out: Path):
    model = load_model(case.path)
    result = FoldPass().apply(model)
    CHANGED[f"{case.suite}/{case.name}"] = result.modified
    save_model(result.model, out)
    return model, result


@pytest.mark.parametrize("case", CORPUS, ids=[f"{c.suite}/{c.name}" for c in CORPUS])
def test_fold_is_lossless_on_corpus(case, tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    model, result = _fold_case(case, out)
    onnx.checker.check_model(str(out))
    reloaded = load_model(out)
    if not result.modified:  # nothing to compare: the same graph would only be compared with itself
        assert sum(1 for _ in reloaded.graph) == sum(1 for _ in model.graph)
        return
    if any(n.domain in UNRUNNABLE_DOMAINS for n in model.graph):
        assert len(list(reloaded.graph)) == len(list(model.graph))
        return
    engine, run_reference = runner_for(model)
    _, run_folded = runner_for(reloaded, engine)
    for feed in case.dataset().batches():
        problem = outputs_match(run_reference(feed), run_folded(feed))
        assert problem is None, f"{engine}: {problem}"


def test_fold_changes_at_least_the_stated_number_of_corpus_models(tmp_path: Path) -> None:
    for case in CORPUS:
        if f"{case.suite}/{case.name}" not in CHANGED:  # run alone (-k): fold what the other tests did not
            _fold_case(case, tmp_path / f"{case.suite}-{case.name}.onnx")
    changed = sorted(name for name, modified in CHANGED.items() if modified)
    assert len(changed) >= MIN_CHANGED, f"fold changed only {len(changed)} corpus models: {changed}"
