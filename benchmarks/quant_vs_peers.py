"""onnxopt quant against the strongest setups a user could get, per output part, with interleaved latency.

Peers (each on the same 32 calibration samples; figures on 32 *different* test samples):

- ``ort``: onnxruntime ``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights, MinMax) on the
  model as shipped;
- ``ort+slim``: the same after ``onnxslim``;
- ``ort+pre``: the same after ``onnxruntime.quantization.quant_pre_process``;
- ``nncf``: NNCF's ONNX backend (``nncf.quantize``, default PERFORMANCE preset, subset 32);
- ``onnxopt``: ``onnxopt apply --pass quant`` with default settings (speed guard on).

onnxslim and nncf are benchmark dependencies only: install them in a separate environment
(``python -m venv .venv-bench && .venv-bench/bin/pip install -e . onnxslim nncf pillow``) and run this script
with it. A tool that fails on a model is recorded with its error, not hidden.

Models: the digits CNN (labels), PP-OCRv4 det and PP-OCR mobile v2 cls (rendered text images, as in
quant_vs_ort.py), a hand-built MobileNetV3-style net (HardSwish, squeeze-excite; random weights) and a
hand-built YOLO-style head (one output = Concat of [N, 4, A] boxes in pixels and [N, 80, A] sigmoid scores),
whose box rows and score rows are judged separately.

Latency: 1 thread, batch 1, every variant of a model timed in each round in a shuffled order (median of a
few runs per round); the ratio to fp32 is taken per round, and its median and IQR over rounds reported.
Keep runs short: ``--rounds 5`` is the default.

Usage: .venv-bench/bin/python benchmarks/quant_vs_peers.py [--models cnn,cls,det,mbv3,yolo] [--rounds 5]
Writes benchmarks/results/quant_vs_peers.md and .json after every model; rows of models not named in --models
are kept from the committed .json, and every row says when, on which commit and at which load average it was
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DIGITS = ROOT / "examples" / "digits"
REAL = Path(os.environ.get("ONNXOPT_REAL_MODELS", "/work/real-models"))
RESULTS = ROOT / "benchmarks" / "results"
N_CAL = N_TEST = 32


# ---------------------------------------------------------------------------- models, data, output parts


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _class_parts(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, dict[str, float]]:
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    part = {"cosine": _cos(r, o), "top1_agreement": float(np.mean(r.argmax(1) == o.argmax(1)))}
    if labels is not None:
        part["top1_accuracy"] = float(np.mean(o.argmax(1) == labels))
        part["top1_accuracy_fp32"] = float(np.mean(r.argmax(1) == labels))
    return {"logits": part}


def _det_parts(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, dict[str, float]]:
    rm, om = ref > 0.3, out > 0.3  # PP-OCR's binarization threshold
    iou = float((rm & om).sum() / max((rm | om).sum(), 1))
    return {"probability map": {"cosine": _cos(ref, out), "text_mask_iou@0.3": iou,
                                "max_abs_error": float(np.abs(ref - out).max())}}


def _yolo_parts(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, dict[str, float]]:
    return {"box rows (pixels)": {"cosine": _cos(ref[:, :4], out[:, :4]),
                                  "mean_abs_error_px": float(np.abs(ref[:, :4] - out[:, :4]).mean())},
            "class-score rows": {"cosine": _cos(ref[:, 4:], out[:, 4:]),
                                 "top1_class_agreement": float(np.mean(ref[:, 4:].argmax(1) == out[:, 4:].argmax(1))),
                                 "max_abs_error": float(np.abs(ref[:, 4:] - out[:, 4:]).max())}}


def _setup(name: str, tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    if name == "cnn":
        cal, ev = np.load(DIGITS / "calib.npz"), np.load(DIGITS / "eval.npz")
        return {"path": DIGITS / "cnn.onnx", "cal": cal["x"][:N_CAL], "test": ev["x"][:N_TEST],
                "labels": ev["labels"][:N_TEST] if "labels" in ev else None, "parts": _class_parts}
    if name in ("det", "cls"):
        from quant_vs_ort import _rendered

        file = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}[name]
        return {"path": REAL / file, "cal": _rendered(name, N_CAL, 1), "test": _rendered(name, N_TEST, 2),
                "labels": None, "parts": _det_parts if name == "det" else _class_parts}
    from tests.graphs_quant import mbv3_net, yolo_head

    if name == "mbv3":
        proto, shape, parts = mbv3_net(width=24, blocks=5, size=112, classes=4, seed=0), (3, 112, 112), _class_parts
    else:
        proto, shape, parts = yolo_head(classes=80, anchors_hw=20), (3, 20, 20), _yolo_parts
    path = tmp / f"{name}.onnx"
    onnx.save(proto, str(path))
    x = rng.standard_normal((N_CAL + N_TEST, *shape)).astype(np.float32)
    return {"path": path, "cal": x[:N_CAL], "test": x[N_CAL:], "labels": None, "parts": parts}


# ---------------------------------------------------------------------------- the tools


class _Reader:
    def __init__(self, name: str, x: np.ndarray, batch: int = 1) -> None:
        self._feeds = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _ort(source: Path, out: Path, cal: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(source), str(out), _Reader(_input_name(source), cal), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def _slim(source: Path, out: Path) -> Path:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(source))), str(out))
    return out


def _pre(source: Path, out: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(out))
    return out


def _nncf(source: Path, out: Path, cal: np.ndarray) -> None:
    import nncf

    name = _input_name(source)
    dataset = nncf.Dataset([cal[i:i + 1] for i in range(len(cal))], lambda x: {name: x})
    onnx.save(nncf.quantize(onnx.load(str(source)), dataset, subset_size=len(cal)), str(out))


def _onnxopt(source: Path, out: Path, cal: np.ndarray, tmp: Path) -> dict[str, Any]:
    import onnxopt

    calib = tmp / f"{out.stem}_calib.npz"
    np.savez(calib, **{_input_name(source): cal})
    run = onnxopt.apply(source, ["quant"], out, data=calib, force=True, validate_result=False)
    report = run.passes[0]
    return {"summary": report.summary, "warnings": report.warnings, "speed": report.figures.get("speed"),
            "saturation_layers": len(report.figures.get("saturation", [])),
            "kernels": report.figures.get("ort_kernel_types"), "conversions": report.figures.get("ort_conversions")}


# ---------------------------------------------------------------------------- measuring


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    s = _session(path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _latency(paths: dict[str, Path], x1: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    sessions = {k: _session(p) for k, p in paths.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {name: x1})
    t0 = time.perf_counter()
    sessions["fp32"].run(None, {name: x1})
    runs = int(np.clip(0.15 / max(time.perf_counter() - t0, 1e-6), 3, 50))
    per: dict[str, list[float]] = {k: [] for k in sessions}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for k in rng.permutation(list(sessions)):
            s, times = sessions[k], []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, {name: x1})
                times.append(time.perf_counter() - t)
            per[str(k)].append(float(np.median(times)) * 1e3)
    out = {}
    for k, ms in per.items():
        ratios = np.array(ms) / np.array(per["fp32"])
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        out[k] = {"ms": float(np.median(ms)), "ratio": float(med), "ratio_q1": float(q1), "ratio_q3": float(q3)}
    return out


def bench(name: str, tmp: Path, rounds: int) -> dict[str, Any]:
    spec = _setup(name, tmp)
    src: Path = spec["path"]
    variants: dict[str, Path] = {"fp32": src}
    row: dict[str, Any] = {"model": name, "errors": {}, "info": {}}
    steps: dict[str, Callable[[Path], Any]] = {
        "ort": lambda out: _ort(src, out, spec["cal"]),
        "ort+slim": lambda out: _ort(_slim(src, tmp / f"{name}_slim.onnx"), out, spec["cal"]),
        "ort+pre": lambda out: _ort(_pre(src, tmp / f"{name}_pre.onnx"), out, spec["cal"]),
        "nncf": lambda out: _nncf(src, out, spec["cal"]),
        "onnxopt": lambda out: _onnxopt(src, out, spec["cal"], tmp),
    }
    for label, step in steps.items():
        out = tmp / f"{name}_{label.replace('+', '_')}.onnx"
        start = time.perf_counter()
        try:
            info = step(out)
            variants[label] = out
            row["info"][label] = {"seconds": round(time.perf_counter() - start, 1), **(info or {})}
        except Exception as err:  # recorded, not hidden
            row["errors"][label] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
            traceback.print_exc(limit=2)
        print(f"{name}: {label} {'ok' if label in variants else 'FAILED'} ({time.perf_counter() - start:.1f}s)", flush=True)
    ref = _run(src, spec["test"])
    row["fidelity"] = {}
    for label, path in variants.items():
        if label == "fp32":
            continue
        try:
            row["fidelity"][label] = spec["parts"](ref, _run(path, spec["test"]), spec["labels"])
        except Exception as err:
            row["errors"][label] = f"running: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    row["latency"] = _latency({k: v for k, v in variants.items() if k == "fp32" or k in row["fidelity"]},
                              spec["test"][:1], rounds)
    row["size_bytes"] = {k: os.path.getsize(v) for k, v in variants.items()}
    return row


# ---------------------------------------------------------------------------- report


def write_markdown(rows: list[dict[str, Any]], rounds: int, path: Path) -> None:
    lines = ["# quant vs peers", "",
             f"32 calibration samples, a different 32 test samples; latency 1 thread, batch 1, interleaved "
             "rounds (ratio to fp32 per round: median [IQR]). PP-OCR inputs are rendered text images; the "
             "MobileNetV3-style net and the YOLO-style head are hand-built with random weights (fidelity is "
             "agreement with their own fp32 outputs). The 2-core machine was shared with other jobs during the run: "
             "single rounds can be far off (see the IQR), so read ratios, not milliseconds. onnxopt's own warning "
             "line comes from its speed guard's separate timing inside the pass. Written by "
             "benchmarks/quant_vs_peers.py.", ""]
    for row in rows:
        lines += [f"## {row['model']}", ""]
        m = row.get("measured")
        if m:
            lines += [f"Measured {m['utc']} UTC on commit {m['commit']}"
                      f"{' (library modified)' if m.get('dirty') else ''}, load average "
                      f"{'/'.join(str(x) for x in m['loadavg_1_5_15'])} (1/5/15 min) at the end of the row, "
                      f"{row.get('rounds', rounds)} rounds.", ""]
        else:
            lines += ["Measured before rows were stamped (results of commit 4a4dc61, wave 2), "
                      f"{row.get('rounds', rounds)} rounds.", ""]
        parts = sorted({p for f in row["fidelity"].values() for p in f})
        lines.append("| variant | latency ms | x fp32 [IQR] | size | " + " | ".join(parts) + " |")
        lines.append("|---|---|---|---|" + "---|" * len(parts))
        for label in ["fp32", *row["fidelity"]]:
            lat = row["latency"].get(label, {})
            cells = []
            for p in parts:
                figs = row["fidelity"].get(label, {}).get(p)
                cells.append("-" if figs is None else ", ".join(f"{k} {v:.4f}" for k, v in figs.items()))
            lines.append(f"| {label} | {lat.get('ms', float('nan')):.2f} | {lat.get('ratio', float('nan')):.2f} "
                         f"[{lat.get('ratio_q1', float('nan')):.2f}-{lat.get('ratio_q3', float('nan')):.2f}] | "
                         f"{row['size_bytes'].get(label, 0) / 1e6:.2f} MB | " + " | ".join(cells) + " |")
        for label, err in row["errors"].items():
            lines.append(f"\n{label} failed: `{err}`")
        oo = row["info"].get("onnxopt")
        if oo:
            lines.append(f"\nonnxopt: {oo.get('summary')}")
            for w in oo.get("warnings") or []:
                lines.append(f"\n**onnxopt warning:** {w}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,cls,det,mbv3,yolo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the last .json")
    args = parser.parse_args()
    saved_path = RESULTS / "quant_vs_peers.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {"rounds": args.rounds, "rows": []}
    if args.markdown_only:
        write_markdown(saved["rows"], saved["rounds"], RESULTS / "quant_vs_peers.md")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Rows of models not named in --models are kept as they were (each carries the date/commit it was measured
    # on), and the file is rewritten after every model, so a run cut short loses nothing already measured.
    order = ["cnn", "cls", "det", "mbv3", "yolo"]
    rows = {r["model"]: r for r in saved["rows"]}
    for r in rows.values():
        r.setdefault("rounds", saved.get("rounds"))
    with tempfile.TemporaryDirectory(prefix="quant-peers-") as tmp:
        for name in args.models.split(","):
            row = bench(name, Path(tmp), args.rounds)
            row.update(rounds=args.rounds, measured=_stamp())
            rows[name] = row
            print(json.dumps({k: row[k] for k in ("model", "latency", "fidelity", "errors")}, indent=1), flush=True)
            ordered = sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else 99)
            saved_path.write_text(json.dumps({"rounds": args.rounds, "rows": ordered, "versions": _versions()},
                                             indent=2, default=str) + "\n")
            write_markdown(ordered, args.rounds, RESULTS / "quant_vs_peers.md")


def _stamp() -> dict[str, Any]:
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return "unknown"

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "onnxopt")),
            "loadavg_1_5_15": [round(x, 2) for x in load]}


def _versions() -> dict[str, str]:
    out = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    for mod in ("nncf", "onnxslim"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:
            out[mod] = f"not installed ({type(err).__name__})"
    return out


if __name__ == "__main__":
    main()
