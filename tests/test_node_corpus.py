"""A deterministic sample of onnx's node-test corpus through every pass, each run a CLI child process.

benchmarks/node_corpus.py runs the whole corpus and writes the table; CI runs every 942nd case (sorted by
name: 2 cases) and the weights variant of every 942nd from offset 471 (2 more), all passes, two cases at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from onnxopt.node_corpus import node_cases, run_case, with_weights
from onnxopt.plugins import load_registry

EVERY = 942
PASSES = list(load_registry().passes)


def test_node_corpus_sample_has_no_bad_run(tmp_path: Path) -> None:
    plain = node_cases(every=EVERY)
    weighted = [w if (w := with_weights(c)) is not None else c for c in node_cases(every=EVERY, offset=EVERY // 2)]
    cases = plain + weighted
    assert len(cases) == 4 and len({c.name for c in cases}) == 4

    def one(i_case):
        i, case = i_case
        (tmp_path / str(i)).mkdir()
        return run_case(case, PASSES, tmp_path / str(i))

    with ThreadPoolExecutor(2) as pool:
        runs = [r for rows in pool.map(one, enumerate(cases)) for r in rows]
    assert len(runs) == len(cases) * len(PASSES)
    bad = [f"{r.case} {r.label}: {r.detail}" for r in runs if r.status == "bad"]
    assert not bad, "\n".join(bad)
    # fold is lossless and never needs to refuse a valid single-op model
    assert all(r.status == "ok" for r in runs if r.label == "fold"), [r.detail for r in runs if r.label == "fold"]
    # the weights variant gives the lossy passes something to change (measured on this sample: 1 lossy run changed)
    assert sum(r.changed for r in runs if r.case.endswith("[weights]") and r.label != "fold") >= 1
