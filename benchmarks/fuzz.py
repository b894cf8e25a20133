"""The long fuzzing run: tests/test_fuzz.py's property with thousands of mutated models instead of CI's 50.

Every example is a small valid model mutated one way (truncated or flipped
bytes, dangling inputs, cycles, wrong dtypes, huge dimensions, duplicate
names, unknown domains and ops, broken subgraphs) and run through
``onnxopt apply``; the property holds when onnxopt refuses it with its own
one-line error (exit 2, no output, no temp file, input unchanged) or, for a
mutation that left a valid model, writes a valid output. A failing example
stops the run and is printed by hypothesis, shrunk.

Run by hand: ``python benchmarks/fuzz.py [--examples 5000] [--seed N]``;
writes benchmarks/results/fuzz.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import hypothesis
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="hypothesis examples")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="onnxopt-fuzz-log-") as folder:
        log = Path(folder) / "counts.json"
        env = {**os.environ, "ONNXOPT_FUZZ_EXAMPLES": str(args.examples), "ONNXOPT_FUZZ_LOG": str(log)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
                               "tests/test_fuzz.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        counts = json.loads(log.read_text()) if log.exists() else {"rows": []}
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    for row in counts["rows"]:
        by_kind[row["mutation"]][row["outcome"]] = row["examples"]
    outcomes = sorted({row["outcome"] for row in counts["rows"]})
    total = sum(row["examples"] for row in counts["rows"])
    passed = proc.returncode == 0
    environment = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "hypothesis": hypothesis.__version__,
                   "python": platform.python_version()}
    lines = [
        "# Fuzzing: mutated models through `onnxopt apply`",
        "",
        f"{total} examples (asked for {args.examples}; hypothesis stops early on a failure and skips duplicates), "
        f"seed {seed}, {seconds:.0f} s: **{'property held on every example' if passed else 'FAILED (see below)'}**. "
        + ", ".join(f"{k} {v}" for k, v in environment.items()) + ".",
        "",
        "Property: exit 2 with one line starting `error:` (no traceback, nothing from ONNX Runtime on the "
        "process's stderr), no output file, no temp file, the input unchanged; or, when the mutation left a "
        "valid model (a flipped weight byte, a huge but legal input dimension), exit 0 and a checker-valid, "
        "loadable output. The subprocess cases in tests/test_fuzz.py check the same on a real terminal.",
        "",
        "| mutation | " + " | ".join(outcomes) + " | examples |",
        "|---|" + "---:|" * (len(outcomes) + 1),
        *(f"| {kind} | " + " | ".join(str(by_kind[kind].get(o, 0)) for o in outcomes) + f" | {sum(by_kind[kind].values())} |"
          for kind in sorted(by_kind)),
        "| all | " + " | ".join(str(sum(by_kind[k].get(o, 0) for k in by_kind)) for o in outcomes) + f" | {total} |",
        "",
    ]
    if not passed:
        lines += ["## Failure", "", "```", proc.stdout[-3000:], "```", ""]
    markdown = "\n".join(lines)
    print(markdown)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz.md").write_text(markdown)
    (RESULTS / "fuzz.json").write_text(json.dumps({
        "examples": total, "asked": args.examples, "seed": seed, "seconds": round(seconds, 1), "passed": passed,
        "environment": environment, "rows": counts["rows"]}, indent=2) + "\n")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
