"""A deterministic sample of onnx's node-test corpus through every pass, each run a child process.

benchmarks/node_corpus.py runs the whole corpus and writes the table. CI runs every 100th case (sorted by name:
19 cases) with every pass at its defaults, and the weights variant of every 100th case from offset 50 (those
that have one) with every pass at its defaults and with the settings each pass declares to push it
(``corpus_variants``), two cases at a time. Each run is forked from a warm worker (onnxopt.node_corpus.run_cases),
so the sample costs the passes' work, not an interpreter start per run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from onnxopt.node_corpus import node_cases, pushed_labels, run_cases, with_weights
from onnxopt.plugins import load_registry

EVERY = 100
PASSES = list(load_registry().passes)
PUSHED = pushed_labels(PASSES)
#: lossy runs (pushed or not) that changed a `[weights]` case of this sample: at least this many (measured: 30
#: on this sample; the floor leaves room for a pass that starts to decline a case for a good reason)
MIN_LOSSY_CHANGED = 20


def test_node_corpus_sample_has_no_bad_run(tmp_path: Path) -> None:
    plain = node_cases(every=EVERY)
    weighted = [w for c in node_cases(every=EVERY, offset=EVERY // 2) if (w := with_weights(c)) is not None]
    assert len(plain) == 19 and len(weighted) >= 10

    def labels(case):
        return PASSES + (PUSHED if case.name.endswith("[weights]") else [])

    runs = [r for rows in run_cases(plain + weighted, labels, tmp_path, jobs=2) for r in rows]
    assert len(runs) == len(plain) * len(PASSES) + len(weighted) * (len(PASSES) + len(PUSHED))
    bad = [f"{r.case} {r.label}: {r.detail}" for r in runs if r.status == "bad"]
    assert not bad, "\n".join(bad)
    # fold is lossless and never needs to refuse a valid single-op model
    assert all(r.status == "ok" for r in runs if r.label == "fold"), [r.detail for r in runs if r.label == "fold"]
    lossless = {name for name in PASSES if load_registry().passes[name].lossless}
    lossy_changed = Counter(r.label for r in runs if r.case.endswith("[weights]") and r.changed
                            and r.label.partition("[")[0] not in lossless)
    assert sum(lossy_changed.values()) >= MIN_LOSSY_CHANGED, lossy_changed
