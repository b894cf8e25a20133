"""The tool's own cost: wall seconds and peak RSS of each pass per GB of weights (issue 16).

Models: onnx's light VGG19 and light ResNet50 (shipped in the onnx package,
weights are ConstantOfShape fills that load as initializers), run here; and
the 3 GiB transformer, read from benchmarks/results/large_model.json (run
benchmarks/large_model.py for it). Each pass runs as ``onnxopt apply MODEL
--pass P --no-validate -o OUT`` in its own subprocess under the measuring
wrapper of large_model.py (``ru_maxrss`` of that child, so file pages of
memory-mapped weights count). Static int8 gets 8 random calibration samples.
Single runs on a shared 2-CPU machine: indicative, not medians.

Usage: python benchmarks/tool_time.py [--models vgg19,resnet50] [--passes fold,lowrank,...]
Writes benchmarks/results/tool_time.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from large_model import PASSES, run_measured  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = {"vgg19": LIGHT / "light_vgg19.onnx", "resnet50": LIGHT / "light_resnet50.onnx"}
#: The passes timed on the light models (labels of large_model.PASSES).
CASES = ("fold", "quant int8 weights (dynamic)", "quant int4 block-wise weight-only", "quant int8 static (calibrated)",
         "cluster", "lowrank", "prune")


def _weights_gb(path: Path) -> float:
    from onnxopt.io import load_model, tensor_bytes

    return tensor_bytes(load_model(path)) / 1e9


def _calibration(path: Path, out: Path, samples: int = 8) -> Path:
    from onnxopt.data import input_specs
    from onnxopt.io import load_model

    feeds = {}
    rng = np.random.default_rng(0)
    for spec in input_specs(load_model(path)):
        shape = [samples if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(spec.dims or ())]
        feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    np.savez(out, **feeds)
    return out


def run(models: list[str], passes: set[str] | None) -> dict[str, Any]:
    rows = []
    cases = [c for c in PASSES if c.label in CASES and (passes is None or c.label.split()[0] in passes)]
    with tempfile.TemporaryDirectory(prefix="onnxopt-tooltime-") as tmp:
        for name in models:
            path = MODELS[name]
            gb = _weights_gb(path)
            calib = _calibration(path, Path(tmp) / f"{name}_calib.npz")
            for case in cases:
                out = Path(tmp) / f"{name}_out.onnx"
                cmd = [sys.executable, "-m", "onnxopt", "apply", str(path), *case.args, "--no-validate", "-q",
                       "-o", str(out), "--report", str(Path(tmp) / "report.json")]
                if case.data:
                    cmd += ["--data", str(calib)]
                print(f"{name}: {case.label} ...", flush=True)
                m = run_measured(cmd, env={**os.environ})
                summary = ""
                if m.returncode == 0 and (Path(tmp) / "report.json").exists():
                    summary = json.loads((Path(tmp) / "report.json").read_text())["passes"][0]["summary"]
                rows.append({"model": name, "pass": case.label, "ok": m.returncode == 0, "weights_gb": round(gb, 4),
                             "seconds": round(m.seconds, 1), "peak_rss": m.peak_rss,
                             "seconds_per_gb": round(m.seconds / gb, 1), "rss_gb_per_gb": round(m.peak_rss / 1e9 / gb, 2),
                             "summary": summary or m.stderr.strip().splitlines()[-1:]})
                for f in Path(tmp).glob(f"{name}_out.onnx*"):
                    f.unlink()
    previous = RESULTS / "tool_time.json"
    if previous.exists():  # light models not rerun keep their rows
        rows = [r for r in json.loads(previous.read_text())["rows"]
                if r["model"] in MODELS and r["model"] not in models] + rows
    large = RESULTS / "large_model.json"
    if large.exists():
        data = json.loads(large.read_text())
        gb = data["model"]["weight_bytes"] / 1e9
        for row in data["rows"]:
            if row.get("ok"):
                rows.append({"model": "3 GiB transformer (large_model.json)", "pass": row["pass"], "ok": True,
                             "weights_gb": round(gb, 3), "seconds": row["seconds"], "peak_rss": row["peak_rss"],
                             "seconds_per_gb": round(row["seconds"] / gb, 1),
                             "rss_gb_per_gb": round(row["peak_rss"] / 1e9 / gb, 2), "summary": row.get("summary", "")})
    return {"rows": rows, "machine": {"cpus": os.cpu_count()}}


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = ["# Tool time: each pass's wall seconds and peak RSS per GB of weights", "",
             "`onnxopt apply MODEL --pass P --no-validate` per pass in its own subprocess (benchmarks/tool_time.py); "
             "peak RSS is `ru_maxrss` (file pages of mapped weights included). Single runs on a 2-CPU machine shared "
             "with other jobs (load average 10-18 during these runs): indicative only. The 3 GiB rows are read from "
             "large_model.json (their own runs, also `--no-validate`; whatever code large_model.py last ran with, which for "
             "the committed rows predates issue 16's lowrank and quant changes).", "",
             "On the light models (0.1-0.6 GB) the fixed cost of starting Python, onnxruntime and loading dominates: "
             "read their per-GB figures with that in mind.", "",
             "| model | pass | weights GB | seconds | s per GB | peak RSS MiB | peak RSS GB per GB | result |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        summary = r["summary"] if isinstance(r["summary"], str) else " ".join(r["summary"])
        lines.append(f"| {r['model']} | {r['pass']} | {r['weights_gb']:.3f} | {r['seconds']:.1f} | {r['seconds_per_gb']:.1f} | "
                     f"{r['peak_rss'] / 2**20:,.0f} | "
                     f"{r['rss_gb_per_gb']:.2f} | {'' if r['ok'] else 'FAILED: '}{summary[:110]} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,resnet50", help="light models to run ('' for none: only re-read the 3 GiB rows)")
    parser.add_argument("--passes", default=None, help="first words of pass labels, e.g. fold,lowrank")
    args = parser.parse_args()
    result = run([m.strip() for m in args.models.split(",") if m.strip()], {p.strip() for p in args.passes.split(",")} if args.passes else None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tool_time.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(result, RESULTS / "tool_time.md")
    print(f"wrote {RESULTS / 'tool_time.md'}")


if __name__ == "__main__":
    main()
