"""Every registered pass over every model of the onnx wheel's backend test data: ok / skipped / failed.

Each cell is one ``onnxopt.corpus.check_pass`` run: load -> pass -> save ->
reload -> run next to the original (ONNX Runtime, or ONNX's reference
evaluator for models ORT no longer loads). ``ok``: valid, runnable, and for
lossless passes numerically equal; ``skipped``: the pass declined or refused
with a one-line reason; ``failed``: a crash, an invalid output, or a result
that does not run or (lossless) does not match. The CI test
(tests/test_corpus_passes.py) runs the small suites; this runs the whole
matrix, the light models with 25-144 M weights included.

Run by hand: ``python benchmarks/corpus.py [--passes quant,prune] [--suites light,simple]``;
prints the tables and writes benchmarks/results/corpus.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from onnxopt.corpus import CORPUS_SUITES, CorpusModel, Outcome, check_pass, corpus_runs, iter_corpus
from onnxopt.plugins import load_registry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARK = {"ok": "ok", "skipped": "skip", "failed": "**FAIL**"}


def mark(outcome: Outcome) -> str:
    return "ok" if outcome.status == "ok" and outcome.changed else "same" if outcome.status == "ok" else MARK[outcome.status]


def run_matrix(cases: list[CorpusModel], runs: list[tuple[str, str, dict[str, Any]]]) -> dict[tuple[str, str], Outcome]:
    """One cell per (model, run label); ``runs`` holds (pass name, label, settings)."""
    registry = load_registry()
    cells: dict[tuple[str, str], Outcome] = {}
    for i, case in enumerate(cases, 1):
        for name, label, settings in runs:
            with tempfile.TemporaryDirectory(prefix="onnxopt-corpus-") as work:
                try:
                    outcome = check_pass(case, registry.passes[name], Path(work), settings)
                except Exception as err:  # the harness itself (loading the original) must not stop the run
                    outcome = Outcome("failed", f"harness: {type(err).__name__}: {err}")
            cells[(f"{case.suite}/{case.name}", label)] = outcome
            if outcome.status == "failed":
                print(f"  FAILED {label} on {case.suite}/{case.name}: {outcome.detail}", flush=True)
        print(f"[{i}/{len(cases)}] {case.suite}/{case.name}", flush=True)
    return cells


def summary_rows(cells: dict[tuple[str, str], Outcome], pass_names: list[str], suites: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in pass_names:
        for suite in [*suites, "all"]:
            counts = Counter(o.status for (model, p), o in cells.items()
                             if p == name and (suite == "all" or model.startswith(suite + "/")))
            if counts:
                seconds = sum(o.seconds for (model, p), o in cells.items()
                              if p == name and (suite == "all" or model.startswith(suite + "/")))
                changed = sum(1 for (model, p), o in cells.items() if p == name and o.status == "ok" and o.changed
                              and (suite == "all" or model.startswith(suite + "/")))
                rows.append({"pass": name, "suite": suite, "models": sum(counts.values()), "ok": counts["ok"],
                             "changed": changed, "skipped": counts["skipped"], "failed": counts["failed"],
                             "seconds": round(seconds, 1)})
    return rows


def to_markdown(cells: dict[tuple[str, str], Outcome], pass_names: list[str], rows: list[dict[str, Any]],
                environment: dict[str, str], seconds: float) -> str:
    models = sorted({m for m, _ in cells}, key=lambda m: (m.split("/")[0], m))
    failed = [(m, p, o) for (m, p), o in sorted(cells.items()) if o.status == "failed"]
    lines = [
        "# Corpus: every pass over the onnx backend test models",
        "",
        f"{len(models)} models x {len(pass_names)} passes = {len(cells)} runs in {seconds:.0f} s; "
        f"{sum(o.status == 'failed' for o in cells.values())} failed. "
        + ", ".join(f"{k} {v}" for k, v in environment.items()) + ".",
        "",
        "Each run: load -> pass -> save -> reload -> run next to the original on ONNX Runtime "
        "(or ONNX's reference evaluator where ORT no longer loads the model). ok = checker-valid, runs, "
        "same outputs (lossless passes: equal values; lossy passes: same count, shapes and dtypes); "
        "skipped = the pass declined or refused with a reason; failed = crash, invalid or unrunnable output, "
        "or a lossless pass that changed values.",
        "",
        "## Summary",
        "",
        "| pass | suite | models | ok | of which changed | skipped | failed | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['pass']} | {r['suite']} | {r['models']} | {r['ok']} | {r['changed']} | {r['skipped']} | {r['failed']} "
          f"| {r['seconds']} |" for r in rows),
        "",
    ]
    if failed:
        lines += ["## Failures", "", "| model | pass | what broke |", "|---|---|---|",
                  *(f"| {m} | {p} | {o.detail.replace('|', '/')} |" for m, p, o in failed), ""]
    lines += ["## Why passes skipped (most common reasons)", "", "| pass | models | reason |", "|---|---:|---|"]
    for name in pass_names:
        reasons = Counter(o.detail for (_, p), o in cells.items() if p == name and o.status == "skipped")
        for reason, n in reasons.most_common(6):
            lines.append(f"| {name} | {n} | {reason.replace('|', '/')[:160]} |")
    lines += ["", "## Matrix", "", "ok = changed and checked; same = ran, nothing to change; skip = declined with a reason.", "",
              "| model | " + " | ".join(pass_names) + " |", "|---|" + "---|" * len(pass_names)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(mark(cells[(m, p)]) for p in pass_names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default=None, help="comma-separated pass names (default: every registered pass)")
    parser.add_argument("--suites", default=",".join(CORPUS_SUITES), help="comma-separated corpus suites")
    args = parser.parse_args()
    registry = load_registry()
    runs = [(name, label, settings) for name in (args.passes.split(",") if args.passes else sorted(registry.passes))
            for label, settings in corpus_runs(name)]
    pass_names = [label for _, label, _ in runs]
    suites = [s for s in args.suites.split(",") if s]
    cases = list(iter_corpus(tuple(suites)))
    suites = [s for s in suites if any(c.suite == s for c in cases)]
    start = time.perf_counter()
    cells = run_matrix(cases, runs)
    seconds = time.perf_counter() - start
    rows = summary_rows(cells, pass_names, suites)
    environment = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
                   "machine": platform.machine()}
    markdown = to_markdown(cells, pass_names, rows, environment, seconds)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "corpus.md").write_text(markdown)
    by_pass: dict[str, dict[str, Any]] = defaultdict(dict)
    for (model, name), outcome in cells.items():
        by_pass[name][model] = {"status": outcome.status, "changed": outcome.changed, "detail": outcome.detail,
                                "seconds": round(outcome.seconds, 3)}
    (RESULTS / "corpus.json").write_text(json.dumps(
        {"environment": environment, "seconds": round(seconds, 1), "summary": rows, "runs": by_pass}, indent=2) + "\n")


if __name__ == "__main__":
    main()
