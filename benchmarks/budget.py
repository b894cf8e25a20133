"""Benchmark of the budget machinery: each lossy pass and the chain prune,cluster,quant under --max-drop.

For every digits model, every lossy pass (and the chain) at --max-drop 0.01
and 0.02, ``onnxopt.apply`` is run the way a user runs it (--data calib.npz,
--eval EVAL, --max-drop B). Reported per run:

- the settings each pass chose (its budget choice) and the ledger's rollbacks;
- the drop on the *selection* part of EVAL (what the choices were made on);
- the drop on the *confirmation* part of EVAL (what the gate is measured on);
- size and latency against the original (validate's figures, 1 thread);
- the drop on *fresh* inputs neither part contained: eval.npz is cut before
  the run, its last FRESH samples never reach onnxopt until the end.

All drops are top-1 accuracy lost against the labels (the automatic metric of
a [N, 10] logits output with labels). Written models that the gate refused
(exit 3) are measured all the same (--force), and marked.

Run by hand: ``python benchmarks/budget.py`` (a few minutes on 2 cores);
writes benchmarks/results/budget.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import onnxopt
from onnxopt.io import load_model
from onnxopt.measure import file_size
from onnxopt.metrics import top1_accuracy
from onnxopt.sessions import SessionFactory
from onnxopt.validate import collect_outputs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mlp", "cnn", "transformer")
RUNS = ("prune", "cluster", "lowrank", "quant", "prune,cluster,quant")
BUDGETS = (0.01, 0.02)
#: The last samples of eval.npz, kept from every run: the fresh inputs.
FRESH = 180


def accuracy(path: Path, x: np.ndarray, labels: np.ndarray) -> float:
    session = SessionFactory().create(load_model(path))
    name = session.get_outputs()[0].name
    from onnxopt.data import Dataset

    out = collect_outputs(session, Dataset("fresh", {"x": x}), [name])[name]
    value = top1_accuracy(out, labels)
    assert value is not None
    return value


def chosen(run: onnxopt.RunReport) -> str:
    parts = []
    for p, row in zip(run.passes, run.ledger or [{}] * len(run.passes)):
        budget = p.figures.get("budget")
        if row.get("action") == "rolled back":
            parts.append(f"{p.pass_name}: rolled back")
        elif budget is not None:
            parts.append(f"{p.pass_name}: {budget['chosen'] or 'none within'} ({len(budget['tried'])} tried)")
        else:
            parts.append(f"{p.pass_name}: {p.summary[:40]}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", default="|".join(RUNS), help="runs separated by |")
    args = parser.parse_args()
    ev = np.load(DIGITS / "eval.npz")
    x, labels = ev["x"], ev["labels"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        eval_path = folder / "eval_part.npz"
        np.savez(eval_path, x=x[:-FRESH], labels=labels[:-FRESH])
        fresh_x, fresh_y = x[-FRESH:], labels[-FRESH:]
        for model in args.models.split(","):
            src = DIGITS / f"{model}.onnx"
            ref_fresh = accuracy(src, fresh_x, fresh_y)
            for chain in args.runs.split("|"):
                for budget in BUDGETS:
                    out = folder / f"{model}_{chain.replace(',', '_')}_{budget}.onnx"
                    start = time.perf_counter()
                    run = onnxopt.apply(src, chain, out, data=DIGITS / "calib.npz", eval_data=eval_path, max_drop=budget,
                                        force=True, seed=0)
                    seconds = time.perf_counter() - start
                    v = run.validation
                    assert v is not None
                    fresh = ref_fresh - accuracy(out, fresh_x, fresh_y)
                    row = {
                        "model": model, "passes": chain, "max_drop": budget, "chosen": chosen(run),
                        "drop_selection": run.drop_selection, "drop_confirmation": v.drop, "drop_fresh": fresh,
                        "gate_passed": run.gate_passed, "size_ratio": file_size(out) / file_size(src),
                        "latency_ratio": v.ratio("latency_ms"), "rollbacks": [r["pass"] for r in run.ledger
                                                                              if r["action"] == "rolled back"],
                        "selection_samples": run.split["selection_samples"] if run.split else None,
                        "confirmation_samples": run.split["confirmation_samples"] if run.split else None,
                        "fresh_samples": FRESH, "seconds": seconds,
                        "budget_choices": run.budget_choices(), "ledger": run.ledger,
                    }
                    rows.append(row)
                    print(f"{model:12s} {chain:20s} {budget:.2f}  sel {row['drop_selection'] * 100:5.2f}  "
                          f"conf {v.drop * 100:5.2f}  fresh {fresh * 100:5.2f}  size {row['size_ratio']:.3f}  "
                          f"lat {row['latency_ratio'] or 0:.3f}  {row['chosen']}  ({seconds:.0f} s)", flush=True)
    write(rows)


def _pt(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def write(rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "machine": platform.machine(), "onnxopt": onnxopt.__version__}
    (RESULTS / "budget.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str) + "\n")
    n = rows[0] if rows else {}
    lines = [
        "# Budget: each lossy pass under --max-drop, chosen on one part, judged on another",
        "",
        "Written by `python benchmarks/budget.py`. digits models (examples/digits); `onnxopt.apply(model, passes, "
        "data=calib.npz, eval_data=EVAL, max_drop=B, seed=0)`. EVAL is eval.npz without its last "
        f"{n.get('fresh_samples', FRESH)} samples; apply splits it by seed into a **selection** part "
        f"({n.get('selection_samples')} samples: every choice is made on it) and a **confirmation** part "
        f"({n.get('confirmation_samples')} samples: the gate and the report). **fresh** is the last "
        f"{n.get('fresh_samples', FRESH)} samples of eval.npz, which onnxopt never saw. Drops are top-1 accuracy "
        "lost against the labels, in points (negative: the compressed model scored higher). size and latency are "
        "ratios to the original (file size; validate's interleaved median latency, 1 thread, batch 1, on the "
        "confirmation data). One run per row on a shared 2-core machine: latency ratios of models this small are "
        "noisy. Models the gate refused were written with --force so that their fresh drop could be measured too "
        "(gate column).",
        "",
        "| model | passes | max-drop | chosen | drop selection | drop confirmation | drop fresh | gate | size | latency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['passes']} | {r['max_drop']:g} | {r['chosen']} | {_pt(r['drop_selection'])} | "
                     f"{_pt(r['drop_confirmation'])} | {_pt(r['drop_fresh'])} | {'pass' if r['gate_passed'] else 'REFUSED'} | "
                     f"{r['size_ratio']:.3f} | {r['latency_ratio']:.3f} |" if r['latency_ratio'] else
                     f"| {r['model']} | {r['passes']} | {r['max_drop']:g} | {r['chosen']} | {_pt(r['drop_selection'])} | "
                     f"{_pt(r['drop_confirmation'])} | {_pt(r['drop_fresh'])} | {'pass' if r['gate_passed'] else 'REFUSED'} | "
                     f"{r['size_ratio']:.3f} | - |")
    held = [r for r in rows if r["drop_fresh"] <= r["max_drop"] + 1e-12]
    win = [r for r in rows if r["size_ratio"] < 0.99 or (r["latency_ratio"] or 1) < 0.95]
    lines += ["", f"Held the budget on fresh inputs: {len(held)} of {len(rows)} runs; with a size or latency win "
              f"(size < 0.99 or latency < 0.95): {len(win)} of {len(rows)}. PP-OCR det/cls were not run (no "
              "evaluation data for them in this benchmark)."]
    (RESULTS / "budget.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
