"""A deterministic sample of onnx's node-test corpus through every pass, each run a child process.

benchmarks/node_corpus.py runs the whole corpus and writes the table. CI runs every 100th case (sorted by name:
19 cases) with every pass at its defaults; and with every pass at its defaults and with the settings each pass
declares to push it (``corpus_variants``), the weights variant of every 100th case from offset 50 (those that
have one: 15) and of every 4th case of the ops that hold weights (Conv, MatMul, Gemm, RNNs, Einsum: 15), two
cases at a time. Each run is forked from a warm worker (onnxopt.node_corpus.run_cases), so the sample costs the
passes' work, not an interpreter start per run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from onnxopt.node_corpus import node_cases, pushed_labels, run_cases, with_weights
from onnxopt.plugins import load_registry

EVERY = 100
PASSES = list(load_registry().passes)
PUSHED = pushed_labels(PASSES)
WEIGHT_OPS = ("test_conv", "test_matmul", "test_gemm", "test_lstm", "test_gru", "test_rnn", "test_simple_rnn",
              "test_einsum")
#: Of the 15 weight-op cases, how many each run must change (measured on this sample: fp16[min_elements=1] 14,
#: cluster[min_size=16,k=4] 11, quant[keep_outputs_float=False] 4, lowrank[ratio=0.5,margin=1.0] 3; the floors
#: leave room for a pass that starts to decline a case for a good reason). prune has no floor: in a one-op model
#: every prunable channel is a graph output's, which prune keeps (it changed 0 node cases in every sweep).
MIN_CHANGED = {"fp16[min_elements=1]": 10, "cluster[min_size=16,k=4]": 8, "quant[keep_outputs_float=False]": 2,
               "lowrank[ratio=0.5,margin=1.0]": 2}


def test_node_corpus_sample_has_no_bad_run(tmp_path: Path) -> None:
    plain = node_cases(every=EVERY)
    weighted = [w for c in node_cases(every=EVERY, offset=EVERY // 2) if (w := with_weights(c)) is not None]
    names = {c.name for c in weighted}
    weight_ops = [w for c in node_cases() if c.name.startswith(WEIGHT_OPS) and (w := with_weights(c)) is not None][::4]
    weight_ops = [c for c in weight_ops if c.name not in names]
    assert len(plain) == 19 and len(weighted) == 15 and len(weight_ops) == 15
    weighted += weight_ops

    def labels(case):
        return PASSES + (PUSHED if case.name.endswith("[weights]") else [])

    runs = [r for rows in run_cases(plain + weighted, labels, tmp_path, jobs=2) for r in rows]
    assert len(runs) == len(plain) * len(PASSES) + len(weighted) * (len(PASSES) + len(PUSHED))
    bad = [f"{r.case} {r.label}: {r.detail}" for r in runs if r.status == "bad"]
    assert not bad, "\n".join(bad)
    # fold is lossless and never needs to refuse a valid single-op model
    assert all(r.status == "ok" for r in runs if r.label == "fold"), [r.detail for r in runs if r.label == "fold"]
    ops = {c.name for c in weight_ops}
    changed = Counter(r.label for r in runs if r.case in ops and r.changed and r.status == "ok")
    assert all(changed[label] >= floor for label, floor in MIN_CHANGED.items()), changed
