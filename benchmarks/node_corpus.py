"""onnx's node-test corpus through every pass: ok / refused / bad per pass, and how long it took.

Each case (``onnx.backend.test.case.node.collect_testcases()``, about 1,900
single-op models with their inputs and expected outputs) is written to a
folder and checked by ``onnxopt.node_corpus.run_case``: a child process that
runs the original on ONNX Runtime and every pass through the CLI in a child
process of its own (``onnxopt apply --pass P --no-validate``, the case's
inputs as ``--data``). ``--variants plain,weights`` adds, per case, the
variant whose tensor inputs past the first are initializers (so the lossy
passes meet weights). What ok / refused / bad mean: onnxopt/node_corpus.py.

Run by hand: ``python benchmarks/node_corpus.py [--every N] [--passes fold,quant] [--jobs 2] [--budget SECONDS]``.
The full sweep (``--every 1``, all passes, both variants) is about 26,000 CLI runs: hours on 2 cores.
``--budget`` stops starting new cases after that many seconds, and the tables say how many cases were covered.
Results are written after every case to benchmarks/results/node_corpus.{md,json}; ``--from-json`` renders again.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from onnxopt.node_corpus import NodeCase, NodeRun, node_cases, run_case, with_weights
from onnxopt.plugins import load_registry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def sample(every: int, offset: int, variants: list[str]) -> list[NodeCase]:
    """Every ``every``-th case (sorted by name) from ``offset``, each in the variants asked for that exist."""
    picked = []
    for case in node_cases(every=every, offset=offset):
        if "plain" in variants:
            picked.append(case)
        if "weights" in variants and (weighted := with_weights(case)) is not None:
            picked.append(weighted)
    return picked


def to_markdown(data: dict[str, Any]) -> str:
    runs = [NodeRun(**r) for r in data["runs"]]
    passes = data["passes"]
    cases = sorted({r.case for r in runs})
    lines = [
        "# Node-test corpus: every pass over onnx's single-op test models",
        "",
        f"{len(cases)} cases ({data['covered']} of the {data['planned']} sampled: every {data['every']}th of "
        f"{data['total_cases']} node tests from offset {data['offset']}, variants {', '.join(data['variants'])}) "
        f"x {len(passes)} passes = {len(runs)} CLI runs in {data['seconds']:.0f} s with {data['jobs']} jobs: "
        f"**{sum(r.status == 'bad' for r in runs)} bad**. "
        + ", ".join(f"{k} {v}" for k, v in data["environment"].items()) + ".",
        "",
        "Each run is `onnxopt apply CASE --pass P --no-validate --data CASE_DATA` in a child process. ok = exit 0 and a "
        "checker-valid output that ONNX Runtime loads and runs wherever it ran the original; fold's outputs must equal "
        "ORT on the original and, where ORT itself gives them, the case's expected outputs (rtol 1e-4, atol 1e-5; "
        "float16 outputs: one unit in the last place, which is how far ORT's own results move with its graph "
        "optimizations on); lossy passes keep the outputs' count, shapes and dtypes. refused = exit 2 with one "
        "`error:` line that the measurements do not contradict. bad = anything else. *changed*: the pass modified "
        "the model (its report). `[weights]` cases are the variant whose tensor inputs past the first are initializers.",
        "",
        "| pass | ok | of which changed | refused | bad | seconds (sum of runs) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in passes:
        mine = [r for r in runs if r.label == name]
        counts = Counter(r.status for r in mine)
        lines.append(f"| {name} | {counts['ok']} | {sum(r.changed for r in mine if r.status == 'ok')} | "
                     f"{counts['refused']} | {counts['bad']} | {sum(r.seconds for r in mine):.0f} |")
    bad = [r for r in runs if r.status == "bad"]
    if bad:
        lines += ["", "## Bad runs", "", "| case | pass | what broke |", "|---|---|---|",
                  *(f"| {r.case} | {r.label} | {r.detail.replace('|', '/')} |" for r in bad)]
    lines += ["", "## Why passes refused (most common reasons)", "", "| pass | runs | reason |", "|---|---:|---|"]
    for name in passes:
        reasons = Counter(r.detail[:140] for r in runs if r.label == name and r.status == "refused")
        for reason, n in reasons.most_common(3):
            lines.append(f"| {name} | {n} | {reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write(data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "node_corpus.json").write_text(json.dumps(data, indent=1))
    (RESULTS / "node_corpus.md").write_text(to_markdown(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="take every Nth case (sorted by name)")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--passes", default=None, help="comma-separated passes (default: every registered pass)")
    parser.add_argument("--variants", default="plain,weights")
    parser.add_argument("--jobs", type=int, default=1, help="cases checked at once")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no new case is started")
    parser.add_argument("--from-json", type=Path, default=None)
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        (RESULTS / "node_corpus.md").write_text(to_markdown(data))
        return
    passes = args.passes.split(",") if args.passes else list(load_registry().passes)
    variants = args.variants.split(",")
    cases = sample(args.every, args.offset, variants)
    data: dict[str, Any] = {
        "passes": passes, "every": args.every, "offset": args.offset, "variants": variants, "jobs": args.jobs,
        "total_cases": len(node_cases()), "planned": len(cases), "covered": 0, "seconds": 0.0, "runs": [],
        "environment": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxopt-nodes-") as work, ThreadPoolExecutor(args.jobs) as pool:

        def one(case: NodeCase) -> list[NodeRun]:
            if args.budget is not None and time.perf_counter() - start > args.budget:
                return []
            folder = Path(work) / str(abs(hash(case.name)))
            folder.mkdir()
            return run_case(case, passes, folder)

        for i, runs in enumerate(pool.map(one, cases), 1):
            if not runs:
                continue
            data["runs"] += [r.to_dict() for r in runs]
            data["covered"] += 1
            data["seconds"] = time.perf_counter() - start
            for r in runs:
                if r.status == "bad":
                    print(f"  BAD {r.label} on {r.case}: {r.detail}", flush=True)
            print(f"[{i}/{len(cases)}] {runs[0].case} {time.perf_counter() - start:.0f} s", flush=True)
            write(data)
    write(data)
    print((RESULTS / "node_corpus.md").read_text())


if __name__ == "__main__":
    main()
