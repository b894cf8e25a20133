"""`onnxopt search` on the digits models: what it finds within a 1 pt budget, checked independently.

For each model: run the search (default passes prune,lowrank,cluster,quant, the ones
installed), then, outside the search, re-apply the best candidate's recipe from the JSON
(same accuracy and size?), and time fp32, the pick, onnxopt quant alone and ONNX Runtime's
quantize_static (QDQ, per-channel, MinMax: the peer baseline) in one interleaved run:
medians at batch 1 and batch 64, 1 thread, sizes on disk, accuracy on eval.npz.

Usage: python benchmarks/search.py [--runs cnn:size,cnn:latency,cnn:latency:64,mlp:size] [--passes ...] [--max-drop 0.01]
       [--workers 2] [--rounds 7]
Writes benchmarks/results/search.md, search.json and search_<model>_<objective>[_b<batch>].png (the Pareto plots).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxopt.timing import TimingConfig, compare_latency, format_ratio

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RESULTS = ROOT / "benchmarks" / "results"
ort.set_default_logger_severity(4)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _accuracy(session: ort.InferenceSession, x: np.ndarray, labels: np.ndarray) -> float:
    logits = np.concatenate([session.run(None, {"x": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float((logits.argmax(1) == labels).mean())


def _latencies(sessions: dict[str, ort.InferenceSession], feed: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    """Each session against the first (fp32) on onnxopt.timing: ms per run, ratio ÷ fp32 and its interval."""
    keys = list(sessions)
    config = TimingConfig(time_budget=max(1.0, rounds * 0.5))
    out: dict[str, dict[str, float]] = {}
    refs = []
    for k in keys[1:]:
        result = compare_latency(sessions[keys[0]], sessions[k], {"x": feed}, config)
        refs.append(result.reference_ms)
        out[k] = {"ms": result.candidate_ms, "ratio": result.ratio, "low": result.low, "high": result.high}
    out[keys[0]] = {"ms": float(np.median(refs)), "ratio": 1.0, "low": 1.0, "high": 1.0}
    return out


def _ort_static(model: Path, out: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    calib = np.load(DIGITS / "calib.npz")["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)  # its pre-processing advice, not a result
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def bench_model(name: str, objective: str, batch: int, passes: str, max_drop: float, workers: int, rounds: int,
                tmp: Path) -> dict[str, Any]:
    from onnxopt.api import apply, load_data
    from onnxopt.io import load_model, serialize_model
    from onnxopt.plugins import load_registry
    from onnxopt.search import apply_recipe, recipe_from_json, search
    from onnxopt.sessions import SessionFactory

    registry = load_registry()
    wanted = [p for p in passes.split(",") if p]
    present = [p for p in wanted if p in registry.passes]
    model = DIGITS / f"{name}.onnx"
    tag = f"{name}_{objective}" + (f"_b{batch}" if batch != 1 else "")
    report, best_path = tmp / f"{tag}.search.json", tmp / f"{tag}.best.onnx"
    start = time.perf_counter()
    search(model, eval_data=DIGITS / "eval.npz", data=DIGITS / "calib.npz", max_drop=max_drop, passes=present,
                    output=best_path, report=report, plot=RESULTS / f"search_{tag}.png", workers=workers, restart=True,
           objective=objective, latency_batch=batch)
    seconds = time.perf_counter() - start
    doc = json.loads(report.read_text())
    best = next(c for c in doc["candidates"] if c["id"] == doc["best"])

    # the JSON reproduces the pick: its recipe re-applied from scratch, measured here
    ref_model = load_model(model)
    rebuilt, _ = apply_recipe(ref_model, recipe_from_json(best["recipe"]), registry=registry, sessions=SessionFactory(),
                              calibration=load_data(ref_model, DIGITS / "calib.npz"),
                              evaluation=load_data(ref_model, DIGITS / "eval.npz"), seed=doc["settings"]["seed"])
    rebuilt_path = tmp / f"{tag}.rebuilt.onnx"
    rebuilt_path.write_bytes(serialize_model(rebuilt))

    variants = {"fp32": model, "search pick": best_path, "rebuilt from JSON": rebuilt_path,
                "onnxopt quant": tmp / f"{name}.quant.onnx", "ORT quantize_static": tmp / f"{name}.ortq.onnx"}
    apply(model, "fold,quant", variants["onnxopt quant"], data=DIGITS / "calib.npz", validate_result=False)
    _ort_static(model, variants["ORT quantize_static"])
    ev = np.load(DIGITS / "eval.npz")
    sessions = {k: _session(p) for k, p in variants.items()}
    b1 = _latencies(sessions, ev["x"][:1], rounds)
    b64 = _latencies(sessions, ev["x"][:64], rounds)
    rows = []
    for k, p in variants.items():
        acc = _accuracy(sessions[k], ev["x"], ev["labels"])
        rows.append({"variant": k, "size_bytes": p.stat().st_size, "accuracy": acc,
                     "latency_b1_ms": b1[k]["ms"], "latency_ratio_b1": b1[k]["ratio"], "latency_interval_b1": [b1[k]["low"], b1[k]["high"]],
                     "latency_b64_ms": b64[k]["ms"], "latency_ratio_b64": b64[k]["ratio"],
                     "latency_interval_b64": [b64[k]["low"], b64[k]["high"]]})
    fp = rows[0]
    for r in rows:  # candidate ÷ fp32, as everywhere in onnxopt
        r["size_ratio"] = r["size_bytes"] / fp["size_bytes"]
        r["drop_pt"] = (fp["accuracy"] - r["accuracy"]) * 100
    import onnx

    proto = onnx.load(str(best_path))
    breakdown = {"total": best_path.stat().st_size,
                 "nodes": sum(len(n.SerializeToString()) for n in proto.graph.node),
                 "value_info": sum(len(v.SerializeToString()) for v in proto.graph.value_info),
                 "initializers": sum(len(t.SerializeToString()) for t in proto.graph.initializer)}
    stages: dict[str, int] = {}
    for c in doc["candidates"]:
        stages[c["stage"]] = stages.get(c["stage"], 0) + 1
    return {"model": name, "objective": objective, "latency_batch": batch, "passes": present, "missing_passes": [p for p in wanted if p not in present],
            "max_drop": max_drop, "workers": workers, "search_seconds": seconds, "candidates": len(doc["candidates"]),
            "stages": stages, "statuses": {s: sum(c["status"] == s for c in doc["candidates"]) for s in ("ok", "rejected", "failed")},
            "front_latency": sum(c.get("front", {}).get("latency", False) for c in doc["candidates"]),
            "front_size": sum(c.get("front", {}).get("size", False) for c in doc["candidates"]),
            "best": {"id": best["id"], "label": best.get("label"), "recipe": best["recipe"], "drop": best["drop"],
                     "size_bytes": best["size_bytes"], "size_ratio": best.get("size_ratio"),
                     "latency_ratio": best.get("latency_ratio"), "latency_low": best.get("latency_low"),
                     "latency_high": best.get("latency_high")},
            "rebuilt_matches": {"accuracy": rows[2]["accuracy"] == rows[1]["accuracy"],
                                "size_bytes": abs(rows[2]["size_bytes"] - rows[1]["size_bytes"]) / rows[1]["size_bytes"] < 0.01},
            "rows": rows, "plot": f"search_{tag}.png", "pick_bytes": breakdown,
            "search": doc,  # the search's own JSON: every candidate, its recipe and figures (plot_search redraws it)
            "front": [{k: c.get(k) for k in ("id", "label", "drop", "size_bytes", "latency_ms", "size_ratio", "latency_ratio",
                                        "latency_low", "latency_high", "front")}
                      for c in doc["candidates"] if c.get("front", {}).get("latency") or c.get("front", {}).get("size")]}


def _lat(row: dict[str, Any], batch: str) -> str:
    return format_ratio(row[f"latency_ratio_{batch}"], *row[f"latency_interval_{batch}"])


def _markdown(results: list[dict[str, Any]], env: dict[str, str]) -> str:
    lines = ["# onnxopt search", "",
             "`onnxopt search MODEL --eval eval.npz --data calib.npz --max-drop 0.01 --passes prune,lowrank,cluster,quant"
             " --objective size|latency` on the digits models; the pick is the smallest model within the budget (then"
             " the fastest), or the fastest (then the smallest). The figures"
             " below are measured again outside the search (ORT CPU, 1 thread, each variant paired with fp32 by"
             " onnxopt.timing: candidate ÷ fp32 with its 95% interval; batch 1 = per-sample latency, where the digits"
             " models are dominated by per-op overhead).", ""]
    for r in results:
        b = r["best"]
        lines += [f"## {r['model']}, objective {r['objective']} (latency timed at batch {r['latency_batch']})", "",
                  f"- passes searched: {', '.join(r['passes'])}" + (f" (not installed: {', '.join(r['missing_passes'])})" if r["missing_passes"] else ""),
                  f"- {r['candidates']} candidates in {r['search_seconds']:.0f} s with {r['workers']} workers "
                  f"(stages: {', '.join(f'{k} {v}' for k, v in r['stages'].items())}; "
                  f"{r['statuses']['rejected']} rejected early, {r['statuses']['failed']} failed); "
                  f"fronts: {r['front_latency']} points (latency), {r['front_size']} (size); plot: `{r['plot']}`",
                  f"- pick: #{b['id']} `{b['label']}`",
                  f"- the JSON reproduces it: recipe re-applied from scratch gives the same accuracy "
                  f"({'yes' if r['rebuilt_matches']['accuracy'] else 'NO'}) and size within 1% "
                  f"({'yes' if r['rebuilt_matches']['size_bytes'] else 'NO'})", "",
                  "| variant | size | size ÷ fp32 | accuracy | drop pt | batch 1 ms | ÷ fp32 | batch 64 ms | ÷ fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['variant']} | {row['size_bytes'] / 1024:.1f} KB | {row['size_ratio']:.3f}× | "
                         f"{row['accuracy'] * 100:.2f}% | {row['drop_pt']:.2f} | {row['latency_b1_ms']:.4f} | "
                         f"{_lat(row, 'b1')} | {row['latency_b64_ms']:.3f} | {_lat(row, 'b64')} |")
        lines += ["", "Pareto front members (drop, size, latency as the search measured them):", "",
                  "| # | front | chain | drop pt | size | size ÷ reference | latency ÷ reference |", "|---|---|---|---:|---:|---:|---:|"]
        for c in sorted(r["front"], key=lambda c: c["drop"]):
            marks = ("L" if c["front"]["latency"] else "") + ("S" if c["front"]["size"] else "")
            lines.append(f"| {c['id']} | {marks} | `{c['label']}` | {c['drop'] * 100:.2f} | {c['size_bytes'] / 1024:.1f} KB | "
                         f"{c['size_ratio']:.3f}× | {format_ratio(c.get('latency_ratio'), c.get('latency_low'), c.get('latency_high'))} |")
        lines.append("")
    cnn = [r for r in results if r["model"] == "cnn"]
    if cnn:
        def run_name(r: dict[str, Any]) -> str:
            return f"--objective {r['objective']} --latency-batch {r['latency_batch']}"

        size = min(cnn, key=lambda r: r["rows"][1]["size_ratio"])
        b1 = min(cnn, key=lambda r: r["rows"][1]["latency_ratio_b1"])
        b64 = min(cnn, key=lambda r: r["rows"][1]["latency_ratio_b64"])
        lines += ["## Against the targets (digits cnn, --max-drop 0.01)", "",
                  f"- >= 20x smaller (size ÷ fp32 <= 0.05): {size['rows'][1]['size_ratio']:.3f}× (pick of {run_name(size)}): "
                  + ("met" if size["rows"][1]["size_ratio"] <= 1 / 20 else "missed"),
                  # met only when the whole interval is at or below 1/3
                  f"- >= 3x faster at batch 1 (latency ÷ fp32 <= 0.33): {_lat(b1['rows'][1], 'b1')} (pick of {run_name(b1)}): "
                  + ("met" if b1["rows"][1]["latency_interval_b1"][1] <= 1 / 3 else "missed"),
                  f"- >= 3x faster at batch 64 (latency ÷ fp32 <= 0.33): {_lat(b64['rows'][1], 'b64')} (pick of {run_name(b64)}, "
                  f"size {b64['rows'][1]['size_ratio']:.3f}×): " + ("met" if b64["rows"][1]["latency_interval_b64"][1] <= 1 / 3 else "missed"),
                  "- no single pick meets both: see the notes below", ""]
        pb = size.get("pick_bytes")
        if pb:
            lines += ["Notes:", "",
                      f"- Size: the size pick's {pb['total'] / 1024:.1f} KB file holds {pb['initializers'] / 1024:.1f} KB of "
                      f"weights (packed 4-bit indices, codebooks, float biases) and {pb['nodes'] / 1024:.1f} KB of nodes "
                      f"(the in-graph decoders of the packed weights add nodes) plus {pb['value_info'] / 1024:.1f} KB of shape "
                      "annotations: on a 300 KB model the graph itself is a large share of a 20x budget (15 KB). Within "
                      "1 pt, pruning past ~35% of the parameters and 4-bit clustering do not stack on this CNN (the "
                      "front's next point, ~15x, costs ~2 pt), and int8 quantization after clustering stores int8 weights "
                      "again (larger than the 4-bit indices), so prune+cluster+quant is not smaller than prune+cluster here.",
                      "- Latency: at batch 1 the digits CNN runs in ~0.03 ms, mostly per-op overhead: fewer channels and "
                      "int8 kernels shorten it by ~1.6x at most; at batch 64, where the arithmetic dominates, the latency "
                      "pick is 3.3x faster. The search times latency at the batch given by --latency-batch.", ""]
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="cnn:size,cnn:latency,cnn:latency:64,mlp:size",
                        help="MODEL:OBJECTIVE[:LATENCY_BATCH],...")
    parser.add_argument("--passes", default="prune,lowrank,cluster,quant")
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    from onnxopt.report import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-search-") as tmp:
        for run in args.runs.split(","):
            parts = run.split(":")
            name, objective, batch = parts[0], parts[1] if len(parts) > 1 else "size", parts[2] if len(parts) > 2 else "1"
            print(f"searching {name} for {objective} (batch {batch}) ...", file=sys.stderr)
            results.append(bench_model(name, objective, int(batch), args.passes, args.max_drop, args.workers,
                                       args.rounds, Path(tmp)))
    env = environment()
    (RESULTS / "search.json").write_text(json.dumps({"results": results, "environment": env}, indent=2) + "\n")
    (RESULTS / "search.md").write_text(_markdown(results, env))
    print((RESULTS / "search.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
