"""Benchmark of the lowrank pass on the digits examples (MLP, transformer, CNN).

Three tables:
1. equal rank (``ratio``): plain SVD, a diagonal activation scaling (ASVD-style,
   per-input RMS) and the pass's activation-aware SVD (full input covariance),
   fidelity on held-out eval data;
2. model-wide MACs targets and the accuracy budget (``--max-drop 0.01``):
   MACs, parameters, accuracy, ORT latency against the original at 1 and 2
   threads, batch 1 and batch 64 (interleaved medians, ratios from the same run);
3. energy thresholds.

Run by hand: ``python benchmarks/lowrank.py`` (a few minutes on 2 cores);
writes benchmarks/results/lowrank.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import PassContext
from onnxopt.data import Dataset
from onnxopt.io import load_model
from onnxopt.measure import count_macs, count_parameters
from onnxopt.sessions import SessionFactory
from onnxopt.timing import TimingConfig, compare_latency, format_ratio
from onnxopt_passes.lowrank import LowrankConfig, LowrankPass, factorize_layers
from onnxopt_passes.lowrank.factor import Factorization
from onnxopt_passes.lowrank.layers import find_layers
from onnxopt_passes.lowrank.ranks import rank_for_ratio
from onnxopt_passes.lowrank.rewrite import build_model
from onnxopt_passes.lowrank.stats import collect_moments
from common import pct, ratio, table

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mlp", "transformer", "cnn")
#: The 10-logit classifier heads, left out of the equal-rank table: at a share of rank 10 every method breaks them.
HEADS = {"mlp": "node_linear_2", "transformer": "node_linear_13", "cnn": "node_linear"}
ONE_SAMPLE = {"x": (1, 1, 8, 8)}


# -- measurement -------------------------------------------------------------------------------------------------


def outputs(sessions: SessionFactory, model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = sessions.create(model)
    return np.concatenate([session.run(None, {"x": x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def fidelity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Relative squared logits error, top-1 agreement with the original, accuracy against labels."""
    err = float(((candidate.astype(np.float64) - reference) ** 2).sum() / (reference.astype(np.float64) ** 2).sum())
    return {"rel_error": err, "agreement": float((candidate.argmax(1) == reference.argmax(1)).mean()),
            "accuracy": float((candidate.argmax(1) == labels).mean())}


def latency_ratio(reference: ir.Model, candidate: ir.Model, x: np.ndarray, threads: int, *, rounds: int = 11) -> dict[str, Any]:
    """candidate ÷ reference latency from onnxopt.timing (paired, interleaved, order alternated) with its interval.

    ``rounds`` sets the time cap: rounds x 0.5 s (the timing stops earlier once the ratio is known to ±3%).
    """
    factory = SessionFactory(threads=threads)
    result = compare_latency(factory.create(reference), factory.create(candidate), {"x": x},
                             TimingConfig(threads=threads, time_budget=max(1.0, rounds * 0.5)))
    return {"reference_ms": result.reference_ms, "candidate_ms": result.candidate_ms, "ratio": result.ratio,
            "interval": [result.low, result.high]}


# -- the three ways to factor at equal rank ------------------------------------------------------------------------


def equal_rank_models(model: ir.Model, calib: Dataset, sessions: SessionFactory, ratio: float,
                      exclude: tuple[str, ...]) -> dict[str, ir.Model]:
    """The same ranks (the pass's ``ratio`` rule and margin), factored three ways."""
    config = LowrankConfig(ratio=ratio)
    macs = count_macs(model, ONE_SAMPLE)
    layers, _ = find_layers(model, spatial=False, exclude=exclude, macs_by_node=macs.by_node)
    layers = [layer for layer in layers if rank_for_ratio(layer, ratio) <= layer.max_rank(config.margin)]
    moments = collect_moments(model, layers, calib, sessions, np.random.default_rng(0))
    plans: dict[str, list] = {"svd": [], "asvd-diag": [], "activation": []}
    for layer in layers:
        rank, m = rank_for_ratio(layer, ratio), moments[layer.index]
        diagonal = np.einsum("gkk->gk", m.second_moment(False))  # per-input mean square: ASVD-style scaling
        plans["svd"].append((layer, rank, Factorization.plain(layer.weight, layer.out_scale)))
        plans["asvd-diag"].append((layer, rank, Factorization.whitened(
            layer.weight, diagonal[:, :, None] * np.eye(layer.k), None, layer.out_scale)))
        centered = layer.can_shift_bias
        plans["activation"].append((layer, rank, Factorization.whitened(
            layer.weight, m.second_moment(centered), m.mean if centered else None, layer.out_scale)))
    return {name: build_model(model, plan) for name, plan in plans.items()}


# -- runs ----------------------------------------------------------------------------------------------------------


def figures(original: ir.Model, candidate: ir.Model) -> dict[str, float]:
    macs0, macs1 = count_macs(original, ONE_SAMPLE).total, count_macs(candidate, ONE_SAMPLE).total
    return {"macs_ratio": macs1 / macs0, "params_ratio": count_parameters(candidate) / count_parameters(original)}


def rank_one_floor(model: ir.Model) -> ir.Model:
    """Every factorable layer at rank 1 (margin ignored): the fastest any rank allocation can get."""
    layers, _ = find_layers(model, spatial=False, exclude=(), macs_by_node={})
    return factorize_layers(model, {layer.name: 1 for layer in layers})


def timing(original: ir.Model, candidate: ir.Model, x: np.ndarray) -> dict[str, float]:
    out = {}
    for threads in (1, 2):
        for batch in (1, 64):
            measured = latency_ratio(original, candidate, x[:batch], threads)
            out[f"t{threads}_b{batch}"] = measured["ratio"]
            out[f"interval_t{threads}_b{batch}"] = measured["interval"]
            out[f"t{threads}_b{batch}_text"] = format_ratio(measured["ratio"], *measured["interval"], prose=False)
            out[f"reference_ms_t{threads}_b{batch}"] = measured["reference_ms"]
    return out


def run(quick: bool) -> dict[str, Any]:
    calib_npz, eval_npz = np.load(DIGITS / "calib.npz"), np.load(DIGITS / "eval.npz")
    calib = Dataset("calib.npz", {"x": calib_npz["x"]}, labels=calib_npz["labels"])
    evaluation = Dataset("eval.npz", {"x": eval_npz["x"]}, labels=eval_npz["labels"])
    x, labels = eval_npz["x"], eval_npz["labels"]
    sessions = SessionFactory(threads=1)
    results: dict[str, Any] = {"equal_rank": [], "targets": [], "energy": []}
    ratios = (0.375, 0.25) if quick else (0.375, 0.25, 0.125)
    targets = (0.5,) if quick else (0.7, 0.5, 0.35, 0.25)
    for name in MODELS:
        model = load_model(DIGITS / f"{name}.onnx")
        reference = outputs(sessions, model, x)
        base = fidelity(reference, reference, labels)
        print(f"{name}: accuracy {base['accuracy']:.4f}", flush=True)
        floor = rank_one_floor(model)
        results.setdefault("floor", []).append({"model": name, **figures(model, floor), **timing(model, floor, x)})
        print("  floor", results["floor"][-1], flush=True)
        for ratio in ratios:
            for method, candidate in equal_rank_models(model, calib, sessions, ratio, (HEADS[name],)).items():
                row = {"model": name, "ratio": ratio, "method": method, **figures(model, candidate),
                       **fidelity(reference, outputs(sessions, candidate, x), labels)}
                results["equal_rank"].append(row)
                print("  equal rank", row, flush=True)

        def apply(config: LowrankConfig, max_drop: float | None = None, model: ir.Model = model) -> tuple[ir.Model, Any, float]:
            ctx = PassContext(sessions=sessions, calibration=calib, evaluation=evaluation, max_drop=max_drop)
            start = time.perf_counter()
            result = LowrankPass().apply(model, config, ctx)
            return result.model, result.report, time.perf_counter() - start

        cases: list[tuple[str, LowrankConfig, float | None]] = []
        for target in targets:
            cases.append((f"target_macs {target}", LowrankConfig(target_macs=target, method="activation"), None))
        cases.append(("target_macs 0.5 (plain svd)", LowrankConfig(target_macs=0.5, method="svd"), None))
        cases.append(("--max-drop 0.01", LowrankConfig(method="activation"), 0.01))
        for label, config, max_drop in cases:
            candidate, report, seconds = apply(config, max_drop)
            fid = fidelity(reference, outputs(sessions, candidate, x), labels)
            row = {"model": name, "case": label, "rule": report.figures.get("rule"), "seconds": seconds,
                   "layers": len(report.items), **figures(model, candidate), **fid,
                   "accuracy_drop": base["accuracy"] - fid["accuracy"], **timing(model, candidate, x)}
            results["targets"].append(row)
            print("  target", row, flush=True)
        for energy in (0.9, 0.99):
            for method in ("svd", "activation"):
                candidate, report, _ = apply(LowrankConfig(energy=energy, method=method))
                row = {"model": name, "energy": energy, "method": method, "layers": len(report.items),
                       **figures(model, candidate), **fidelity(reference, outputs(sessions, candidate, x), labels)}
                results["energy"].append(row)
                print("  energy", row, flush=True)
    results["environment"] = {"onnxruntime": ort.__version__, "numpy": np.__version__, "machine": platform.machine(),
                               "cpus": os.cpu_count(), "quick": quick}
    return results


# -- report --------------------------------------------------------------------------------------------------------


def _text(v: str | None) -> str:
    return v or ""


def num(v: Any) -> str:
    return "" if v is None else (f"{v:.2e}" if isinstance(v, float) and v < 0.01 else f"{v:.4g}" if isinstance(v, float) else str(v))


def _verdict(latency: float, target: float = 0.65, noise: float = 0.03) -> str:
    if abs(latency - target) <= noise:
        return "borderline (within timing noise of 0.65×)"
    return "met" if latency <= target else "missed"


def verdicts(results: dict[str, Any]) -> list[str]:
    """The issue's targets, checked against this run's rows."""
    lines = []
    for name in ("mlp", "transformer"):
        ok = [r for r in results["targets"] if r["model"] == name and r["macs_ratio"] <= 0.5 and r["accuracy_drop"] <= 0.01]
        floor = next(r for r in results["floor"] if r["model"] == name)
        if not ok:
            lines.append(f"- {name}: no case reached ≤ 0.5× MACs within 1 pt.")
            continue
        best = min(ok, key=lambda r: r["t1_b1"])
        fast = min(ok, key=lambda r: r["t1_b64"])
        lines.append(
            f"- {name}: ≤ 0.5× MACs at ≤ 1 pt: **met** ({best['case']}: {best['macs_ratio']:.3f}× MACs, drop "
            f"{100 * best['accuracy_drop']:.2f} pt). ≤ 0.65× latency (1 thread): batch 1 "
            f"**{_verdict(best['t1_b1'])}** (best {best['t1_b1']:.3f}×; rank 1 everywhere, a useless model, reaches "
            f"{floor['t1_b1']:.3f}×); batch 64 **{_verdict(fast['t1_b64'])}** ({fast['case']}: {fast['t1_b64']:.3f}×, "
            f"rank-1 floor {floor['t1_b64']:.3f}×).")
    wins = {}
    for row in results["equal_rank"]:
        wins.setdefault(row["model"], {}).setdefault(row["ratio"], {})[row["method"]] = row["rel_error"]
    for name, by_ratio in wins.items():
        beaten = sum(v["activation"] < v["svd"] for v in by_ratio.values())
        lines.append(f"- {name}: activation-aware beats plain SVD in logits error at {beaten} of {len(by_ratio)} equal ranks.")
    return lines


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    parts = [
        "# lowrank: SVD factorization on the digits examples",
        "",
        f"onnxruntime {env['onnxruntime']}, {env['machine']}, {env['cpus']} CPUs shared with other jobs; "
        "fidelity on eval.npz (540 samples), statistics on calib.npz (128). Ratios are candidate / original.",
        "",
        "## Targets (issue 5)",
        "",
        *verdicts(results),
        "",
        "The digits models are tiny: one batch-1 run of the original takes "
        + ", ".join(f"{r['reference_ms_t1_b1'] * 1e3:.0f} µs ({r['model']})" for r in results["floor"])
        + ", mostly ONNX Runtime's per-run and per-node cost and the ops lowrank does not touch (attention, LayerNorm, "
        "Softmax, reshapes). The floor table below measures that ceiling directly: even rank 1 everywhere does not "
        "reach 0.65× at batch 1.",
        "",
        "## Equal rank: plain SVD vs activation-aware",
        "",
        "Same layers, same ranks (`ratio` rule, margin 0.8). `asvd-diag` scales W's input rows by the inputs' RMS "
        "(ASVD-style diagonal); `activation` is the pass's `method=activation` (Cholesky whitening by the input "
        "covariance, bias correction, BatchNorm-aware). rel error = ‖y'-y‖²/‖y‖² of the logits.",
        "",
        table(results["equal_rank"], [("model", "model", str), ("ratio", "ratio", num), ("method", "method", str),
                                       ("MACs", "macs_ratio", ratio), ("params", "params_ratio", ratio),
                                       ("rel error", "rel_error", num), ("agreement", "agreement", pct),
                                       ("accuracy", "accuracy", pct)]),
        "",
        "## MACs targets and accuracy budget (method=activation unless said)",
        "",
        "Latency ratio `tT bB`: T ORT intra-op threads, batch B; candidate ÷ original from onnxopt.timing (paired, "
        "interleaved runs, order alternated; median ratio with its 95% interval). The machine's 2 cores were shared with other jobs: "
        "2-thread figures (ORT's spinning pool starves when a core is taken) and single outliers are noise.",
        "",
        table(results["targets"], [("model", "model", str), ("case", "case", str), ("layers", "layers", str),
                                    ("MACs", "macs_ratio", ratio), ("params", "params_ratio", ratio),
                                    ("accuracy", "accuracy", pct), ("drop", "accuracy_drop", pct),
                                    ("lat t1 b1", "t1_b1_text", _text), ("lat t1 b64", "t1_b64_text", _text),
                                    ("lat t2 b1", "t2_b1_text", _text), ("lat t2 b64", "t2_b64_text", _text),
                                    ("pass s", "seconds", lambda v: f"{v:.1f}")]),
        "",
        "## How far latency can go",
        "",
        "Every factorable layer at rank 1 (classifier included, margin ignored; the model is useless): the lowest "
        "latency any rank allocation can reach. What stays is the ops lowrank does not touch (attention, "
        "LayerNorm, Softmax, reshapes, BatchNorm-folded convs' overhead) and ONNX Runtime's per-node cost.",
        "",
        table(results["floor"], [("model", "model", str), ("MACs", "macs_ratio", ratio),
                                  ("lat t1 b1", "t1_b1_text", _text), ("lat t1 b64", "t1_b64_text", _text),
                                  ("lat t2 b1", "t2_b1_text", _text), ("lat t2 b64", "t2_b64_text", _text)]),
        "",
        "## Energy thresholds",
        "",
        "With `method=activation` the energy is the share of the layer's output energy on calibration data, a "
        "stricter measure than the weight's: the same threshold cuts deeper.",
        "",
        table(results["energy"], [("model", "model", str), ("energy", "energy", num), ("method", "method", str),
                                   ("layers", "layers", str), ("MACs", "macs_ratio", ratio),
                                   ("params", "params_ratio", ratio), ("rel error", "rel_error", num),
                                   ("accuracy", "accuracy", pct)]),
        "",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ranks and targets")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = run(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank.json").write_text(json.dumps(results, indent=2))
    (args.out / "lowrank.md").write_text(markdown(results))
    print((args.out / "lowrank.md").read_text())


if __name__ == "__main__":
    main()
