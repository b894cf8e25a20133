"""onnx's node-test corpus through every pass: ok / refused / bad per pass, and how long it took.

Each case (``onnx.backend.test.case.node.collect_testcases()``, about 1,900
single-op models with their inputs and expected outputs) is written to a
folder and checked by ``onnxopt.node_corpus.run_cases``: this process imports
everything once and never creates an ONNX Runtime session; ``--jobs`` workers
are forked from it, and each run (the original on ORT, every pass through the
CLI entry point, the checks of each output) is a child forked from a worker,
so a crash or a hang costs one run. ``--variants plain,weights`` adds, per
case, the variant whose tensor inputs past the first are initializers (so the
lossy passes meet weights); on that variant each pass also runs with the
settings it declares to push it past its defaults (``corpus_variants``, rows
``pass[key=value]``; ``--no-pushed`` leaves them out). What ok / refused / bad
mean: onnxopt/node_corpus.py.

Run by hand: ``python benchmarks/node_corpus.py [--every N] [--offset K] [--passes fold,quant] [--jobs 2]
[--budget SECONDS] [--resume] [--redo CASE,...]``. Cases run in a strided order (every 10th first, then
the next tenth, ...), so a sweep stopped by ``--budget`` or by hand covers an even sample. ``--resume``
keeps the runs already in benchmarks/results/node_corpus.json and runs only the missing ones (also after
``--every``/``--offset`` shards); ``--redo`` drops a case's runs first (after a fix).
Results are written every 30 s and at the end to benchmarks/results/node_corpus.{md,json}; ``--from-json``
renders again.
"""

from __future__ import annotations

import os

# before numpy is imported: OpenBLAS's worker threads would not survive the forks (onnxopt.forked)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxopt.node_corpus import NodeCase, NodeRun, node_cases, pushed_labels, run_cases, with_weights  # noqa: E402
from onnxopt.plugins import load_registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: cases run every STRIDE-th first, so that a partial sweep is an even sample
STRIDE = 10


def sample(every: int, offset: int, variants: list[str]) -> list[NodeCase]:
    """Every ``every``-th case (sorted by name) from ``offset``, each in the variants asked for that exist."""
    picked = []
    for case in node_cases(every=every, offset=offset):
        if "plain" in variants:
            picked.append(case)
        if "weights" in variants and (weighted := with_weights(case)) is not None:
            picked.append(weighted)
    return picked


def strided(cases: list[NodeCase]) -> list[NodeCase]:
    """Every STRIDE-th case first, then the next ones: cases 0, 10, 20, ..., 1, 11, ..."""
    return [cases[i] for i in sorted(range(len(cases)), key=lambda i: (i % STRIDE, i))]


def to_markdown(data: dict[str, Any]) -> str:
    runs = [NodeRun(**r) for r in data["runs"]]
    labels = data.get("labels") or data["passes"]
    cases = sorted({r.case for r in runs})
    weighted = sum(c.endswith("[weights]") for c in cases)
    covered = f"all {data['planned']}" if len(cases) >= data["planned"] else f"{len(cases)} of the {data['planned']}"
    seconds = data["seconds"]
    lines = [
        "# Node-test corpus: every pass over onnx's single-op test models",
        "",
        f"{len(cases)} cases ({covered} planned: "
        + (f"all {data['total_cases']} node tests" if data["every"] == 1 else
           f"every {data['every']}th of {data['total_cases']} node tests from offset {data['offset']}")
        + f" and their `[weights]` variants; covered: {len(cases) - weighted} plain and {weighted} `[weights]` variants) = {len(runs)} "
        f"runs in {seconds:.0f} s ({seconds / 60:.0f} min) of wall time with {data['jobs']} jobs "
        f"({seconds * data['jobs'] / max(len(runs), 1):.2f} s per run and job, ORT checks included): "
        f"**{sum(r.status == 'bad' for r in runs)} bad**. "
        + ", ".join(f"{k} {v}" for k, v in data["environment"].items()) + ".",
        "",
        *([] if len(cases) >= data["planned"] else [
            f"**The sweep is not complete**: {len(cases)} of {data['planned']} cases. Cases run in a strided order "
            f"(sorted by name, plain and `[weights]` variants interleaved; every {STRIDE}th first: 0, {STRIDE}, "
            f"{2 * STRIDE}, ..., then 1, {STRIDE + 1}, ...), so the covered cases are an even sample of the corpus. "
            "`python benchmarks/node_corpus.py --jobs 2 --resume` runs the rest and adds it here.", ""]),
        "Each run is `onnxopt apply CASE --pass P --no-validate --data CASE_DATA` in a child process, forked from a "
        "process that has imported onnxopt and never created an ORT session (so a run costs its work, not the "
        "imports; a crash or a hang still costs only that run); ORT's runs of the original and of each output are "
        "forked children too. ok = exit 0 and a checker-valid output that ONNX Runtime loads and runs wherever it "
        "ran the original; fold's outputs must equal ORT on the original and, where ORT itself gives them, the "
        "case's expected outputs (rtol 1e-4, atol 1e-5; float16 outputs: one unit in the last place, which is how "
        "far ORT's own results move with its graph optimizations on); lossy passes keep the outputs' count, shapes "
        "and dtypes. refused = exit 2 with one `error:` line that the measurements do not contradict. bad = "
        "anything else. *changed*: the pass modified the model (its report). `[weights]` cases are the variant "
        "whose tensor inputs past the first are initializers; `pass[key=value]` rows run on those only, with the "
        "settings the pass declares to push it past its defaults (`corpus_variants`).",
        "",
        "| run | cases | ok | changed | changed, `[weights]` cases | refused | bad | seconds (sum of runs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        mine = [r for r in runs if r.label == label]
        if not mine:
            continue
        counts = Counter(r.status for r in mine)
        changed = sum(r.changed for r in mine if r.status == "ok")
        mine_w = [r for r in mine if r.case.endswith("[weights]")]
        changed_w = sum(r.changed for r in mine_w if r.status == "ok")
        lines.append(f"| {label} | {len(mine)} | {counts['ok']} | {changed} ({100 * changed / len(mine):.0f} %) | "
                     f"{changed_w} of {len(mine_w)} | {counts['refused']} | {counts['bad']} | "
                     f"{sum(r.seconds for r in mine):.0f} |")
    bad = [r for r in runs if r.status == "bad"]
    if bad:
        lines += ["", "## Bad runs", "", "| case | run | what broke |", "|---|---|---|",
                  *(f"| {r.case} | {r.label} | {r.detail.replace('|', '/')} |" for r in bad)]
    if data.get("notes"):
        lines += ["", *data["notes"]]
    lines += ["", "## Why passes refused (most common reasons)", "", "| run | runs | reason |", "|---|---:|---|"]
    for label in labels:
        reasons = Counter(r.detail[:140] for r in runs if r.label == label and r.status == "refused")
        for reason, n in reasons.most_common(3):
            lines.append(f"| {label} | {n} | {reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write(data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "node_corpus.json.tmp"
    head = json.dumps({k: v for k, v in data.items() if k != "runs"}, indent=1)[:-2]
    runs = ",\n".join(json.dumps(r) for r in data["runs"])  # one run a line: small diffs, small file
    tmp.write_text(f'{head},\n "runs": [\n{runs}\n]\n}}\n')
    tmp.replace(RESULTS / "node_corpus.json")
    (RESULTS / "node_corpus.md").write_text(to_markdown(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="take every Nth case (sorted by name)")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--passes", default=None, help="comma-separated passes (default: every registered pass)")
    parser.add_argument("--variants", default="plain,weights")
    parser.add_argument("--no-pushed", action="store_true", help="no pass[key=value] runs on the weights variant")
    parser.add_argument("--jobs", type=int, default=1, help="cases checked at once")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no new case is started")
    parser.add_argument("--resume", action="store_true", help="keep the runs in node_corpus.json, run the rest")
    parser.add_argument("--redo", default="", help="comma-separated cases whose runs are dropped and run again")
    parser.add_argument("--from-json", type=Path, default=None)
    args = parser.parse_args()
    if args.from_json:
        write(json.loads(args.from_json.read_text()))
        return
    passes = args.passes.split(",") if args.passes else list(load_registry().passes)
    pushed = [] if args.no_pushed else pushed_labels(passes)
    variants = args.variants.split(",")
    cases = strided(sample(args.every, args.offset, variants))
    data: dict[str, Any] = {
        "passes": passes, "labels": passes + pushed, "every": args.every, "offset": args.offset,
        "variants": variants, "jobs": args.jobs, "total_cases": len(node_cases()), "planned": len(cases),
        "seconds": 0.0, "runs": [], "sessions": [],
        "environment": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }
    if args.resume and (RESULTS / "node_corpus.json").exists():
        old = json.loads((RESULTS / "node_corpus.json").read_text())
        redo = {c for c in args.redo.split(",") if c}
        data["runs"] = [r for r in old["runs"] if r["case"] not in redo]
        data["seconds"] = old.get("seconds", 0.0)
        data["sessions"] = old.get("sessions", [])
        data["notes"] = old.get("notes", [])
        if old.get("every") != args.every or old.get("offset") != args.offset:  # a shard joins the sweep
            data["every"], data["offset"] = min(old.get("every", 1), args.every), 0
            data["planned"] = max(old.get("planned", 0), data["planned"])
    done = {(r["case"], r["label"]) for r in data["runs"]}

    def wanted(case: NodeCase) -> list[str]:
        labels = passes + (pushed if case.name.endswith("[weights]") else [])
        return [label for label in labels if (case.name, label) not in done]

    todo = [case for case in cases if wanted(case)]
    print(f"{len(cases)} cases planned, {len(cases) - len(todo)} already done, {len(todo)} to run", flush=True)
    start = time.perf_counter()
    base = data["seconds"]
    written = 0.0
    with tempfile.TemporaryDirectory(prefix="onnxopt-nodes-") as work:
        for i, runs in enumerate(run_cases(todo, wanted, Path(work), jobs=args.jobs), 1):
            data["runs"] += [r.to_dict() for r in runs]
            data["seconds"] = base + time.perf_counter() - start
            for r in runs:
                if r.status == "bad":
                    print(f"  BAD {r.label} on {r.case}: {r.detail}", flush=True)
            if runs:
                print(f"[{i}/{len(todo)}] {runs[0].case} {time.perf_counter() - start:.0f} s", flush=True)
            if time.perf_counter() - written > 30:
                write(data)
                written = time.perf_counter()
            if args.budget is not None and time.perf_counter() - start > args.budget:
                print(f"budget of {args.budget:.0f} s spent: stopping (resume with --resume)", flush=True)
                break
    data["sessions"].append({"every": args.every, "offset": args.offset, "jobs": args.jobs, "cases_run": i if todo else 0,
                             "seconds": round(time.perf_counter() - start, 1)})
    write(data)
    print((RESULTS / "node_corpus.md").read_text())


if __name__ == "__main__":
    main()
