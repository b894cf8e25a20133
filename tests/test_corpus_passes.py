"""Every pass but fold over the onnx wheel's backend test models: load -> pass -> save -> reload -> run.

Lossless passes must keep the outputs equal; lossy passes must give a valid
model that the original's engine (ONNX Runtime, or ONNX's reference evaluator
for what ORT no longer loads) still runs with the same outputs (count, shapes,
dtypes); a pass may decline with a reason. Zero crashes, zero invalid outputs.
CI runs the small suites and two light models with each pass's defaults,
and the small suites with the settings that push each pass further
(each pass's ``corpus_variants``); benchmarks/corpus.py runs the whole
matrix and writes the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxopt.corpus import check_pass, corpus_runs, iter_corpus
from onnxopt.plugins import load_registry

REGISTRY = load_registry()
# fold has its own corpus test; each other pass runs with its defaults and with settings that push it further
RUNS = [(name, label, settings) for name in sorted(REGISTRY.passes) if name != "fold" for label, settings in corpus_runs(name)]
#: Light models cheap enough for CI (the others hold 7-144 M weights: benchmarks/corpus.py runs them).
CI_LIGHT = {"light_squeezenet", "light_shufflenet"}
CI_CORPUS = [c for c in iter_corpus(("pytorch-converted", "pytorch-operator", "simple"))] + [
    c for c in iter_corpus(("light",)) if c.name in CI_LIGHT]


#: Corpus models each run must change (ok and modified), about 90 % of what it changed in the last full corpus run
#: (benchmarks/results/corpus.json, CI models only). A pass that quietly stops working fails here; so does one that
#: refuses everything, since a refusal is never a change. prune's pushed variant changes only light models, which
#: the variants do not run on in CI: it has no floor here. quant with its defaults keeps float every node whose
#: result is a graph output (keep_outputs_float), which is most of a one- or two-op corpus model: its floor is low,
#: and the keep_outputs_float=False run carries the floor the defaults had before (28 changed).
MIN_CHANGED = {
    "cluster": 5, "cluster[min_size=16,k=4]": 28, "distill": 118, "fp16": 5, "fp16[min_elements=1]": 45,
    "lowrank": 2, "lowrank[ratio=0.5,margin=1.0]": 21, "prune": 2, "quant": 2, "quant[mode=dynamic]": 2, "quant[keep_outputs_float=False]": 26,
    "quant[weight_bits=4,block_size=16]": 2, "quant[method=entropy,activation_type=int8,per_channel=False]": 1,
}


def test_ci_corpus_is_present() -> None:
    assert len(CI_CORPUS) > 100 and len({c.suite for c in CI_CORPUS}) == 4


@pytest.mark.parametrize("pass_name,label,settings", RUNS, ids=[label for _, label, _ in RUNS])
def test_pass_over_corpus(pass_name: str, label: str, settings: dict, tmp_path: Path) -> None:
    cls = REGISTRY.passes[pass_name]
    failed, changed = [], 0
    for case in CI_CORPUS if not settings else [c for c in CI_CORPUS if c.suite != "light"]:  # variants: small suites
        work = tmp_path / f"{case.suite}-{case.name}"
        work.mkdir()
        outcome = check_pass(case, cls, work, settings)
        changed += outcome.status == "ok" and outcome.changed
        if outcome.status == "failed":
            failed.append(f"{case.suite}/{case.name}: {outcome.detail}")
        elif outcome.status == "skipped":
            assert outcome.detail.strip(), f"{case.name}: skipped without a reason"
    assert not failed, f"{label} failed on {len(failed)} corpus model(s):\n" + "\n".join(failed)
    assert changed >= MIN_CHANGED.get(label, 0), f"{label} changed {changed} corpus models, fewer than {MIN_CHANGED[label]}"


def test_every_run_has_a_floor() -> None:
    unfloored = {label for _, label, _ in RUNS} - set(MIN_CHANGED)
    assert unfloored == {"prune[ratio=0.75,saliency=activation]"}, unfloored
