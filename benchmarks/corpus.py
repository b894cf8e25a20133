"""Every registered pass over every model of the onnx wheel's backend test data: ok / skipped / failed.

Each cell is one ``onnxopt.corpus.check_pass`` run: load -> pass -> save ->
reload -> run next to the original (ONNX Runtime, or ONNX's reference
evaluator for models ORT no longer loads). ``ok``: valid, runnable, and for
lossless passes numerically equal; ``skipped``: the pass declined or refused
with a one-line reason; ``failed``: a crash, an invalid output, or a result
that does not run or (lossless) does not match. The CI test
(tests/test_corpus_passes.py) runs the small suites; this runs the whole
matrix, the light models with 25-144 M weights included.

Run by hand: ``python benchmarks/corpus.py [--passes quant,prune] [--suites light,simple]``
(about an hour on 2 busy cores: lowrank's SVDs of the light models' 100 M-weight
layers take most of it); prints the tables and writes
benchmarks/results/corpus.{md,json}. ``--from-json`` renders an earlier run again.
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
    suites = [r["suite"] for r in rows if r["pass"] == pass_names[0] and r["suite"] != "all"]
    failed = [(m, p, o) for (m, p), o in sorted(cells.items()) if o.status == "failed"]
    by = {(r["pass"], r["suite"]): r for r in rows}
    suite_sizes = ", ".join(f"{s} {by[(pass_names[0], s)]['models']}" for s in suites)
    lines = [
        "# Corpus: every pass over the onnx backend test models",
        "",
        f"{len(models)} models ({suite_sizes}) "
        f"x {len(pass_names)} pass settings = {len(cells)} runs in {seconds:.0f} s: "
        f"**{sum(o.status == 'failed' for o in cells.values())} failed**. "
        + ", ".join(f"{k} {v}" for k, v in environment.items()) + ".",
        "",
        "Each run: load -> pass -> save -> reload -> run next to the original on ONNX Runtime "
        "(or ONNX's reference evaluator where ORT no longer loads the model: opset-6 ops, string ops). "
        "ok = checker-valid, runs, same outputs (lossless passes: equal values; lossy passes: same count, "
        "shapes and dtypes), *changed* when the pass modified the model; skipped = the pass declined or "
        "refused with a one-line reason; failed = a crash, an invalid or unrunnable output, or a lossless "
        "pass that changed values. `pass[key=value]` rows push a pass past its defaults "
        "(each pass's `corpus_variants`): the corpus's weights are small, so with defaults most passes "
        "find little to do there.",
        "",
        "## Summary",
        "",
        "| pass | ok | of which changed | skipped | failed | seconds |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {p} | {by[(p, 'all')]['ok']} | {by[(p, 'all')]['changed']} | {by[(p, 'all')]['skipped']} "
          f"| {by[(p, 'all')]['failed']} | {by[(p, 'all')]['seconds']} |" for p in pass_names),
        "",
        "## By suite (changed / ok / skipped / failed)",
        "",
        "| pass | " + " | ".join(suites) + " |",
        "|---|" + "---:|" * len(suites),
        *(f"| {p} | " + " | ".join(f"{by[(p, s)]['changed']} / {by[(p, s)]['ok']} / {by[(p, s)]['skipped']} / {by[(p, s)]['failed']}"
                                    for s in suites) + " |" for p in pass_names),
        "",
    ]
    if failed:
        lines += ["## Failures", "", "| model | pass | what broke |", "|---|---|---|",
                  *(f"| {m} | {p} | {o.detail.replace('|', '/')} |" for m, p, o in failed), ""]
    lines += ["## Why passes skipped (most common reasons)", "", "| pass | models | reason |", "|---|---:|---|"]
    for name in pass_names:
        reasons = Counter(o.detail for (_, p), o in cells.items() if p == name and o.status == "skipped")
        for reason, n in reasons.most_common(4):
            lines.append(f"| {name} | {n} | {reason.replace('|', '/')[:160]} |")
    lines += ["", "## Matrix", "", "ok = changed and checked; same = ran, nothing to change; skip = declined with a reason.", "",
              "| model | " + " | ".join(pass_names) + " |", "|---|" + "---|" * len(pass_names)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(mark(cells[(m, p)]) for p in pass_names) + " |")
    return "\n".join(lines) + "\n"


def from_json(path: Path) -> tuple[dict[tuple[str, str], Outcome], list[str], dict[str, str], float]:
    """The cells of an earlier run, to render its tables again without rerunning it."""
    data = json.loads(path.read_text())
    cells = {(model, name): Outcome(r["status"], r["detail"], r["seconds"], r.get("changed", False))
             for name, runs in data["runs"].items() for model, r in runs.items()}
    return cells, list(data["runs"]), data["environment"], data["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default=None, help="comma-separated pass names (default: every registered pass)")
    parser.add_argument("--suites", default=",".join(CORPUS_SUITES), help="comma-separated corpus suites")
    parser.add_argument("--from-json", type=Path, default=None, help="render the tables of an earlier corpus.json again")
    args = parser.parse_args()
    if args.from_json is not None:
        cells, pass_names, environment, seconds = from_json(args.from_json)
        suites = [s for s in CORPUS_SUITES if any(m.startswith(s + "/") for m, _ in cells)]
        (RESULTS / "corpus.md").write_text(to_markdown(cells, pass_names, summary_rows(cells, pass_names, suites), environment, seconds))
        return
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
