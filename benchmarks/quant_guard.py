"""quant's speed guard: int8 compute vs float compute on int8-stored weights (quant.speed_fallback), and single regions.

For each model, static int8 with
- ``speed_fallback=off``: the guard returns slow region kinds to float and only warns when int8 is still slower;
- the default (``speed_fallback=int8_weights``): when int8 is still slower after the kinds, the model computes in
  float with its Conv/MatMul/Gemm weights stored int8 (decoded when ONNX Runtime loads it);
- optionally ``speed_islands=12`` (``--islands``).

The guard chooses on the calibration feed. The latency reported here is measured separately, after the pass, on a
held-out sample: onnxopt.timing's paired, interleaved ratio (batch 1) with its 95% interval, at 1 and 2 threads.
Calibration: the first 128 samples of calib.npz (digits; 8x8 upsampled to 32x32 for the MobileNetV3-style net),
fidelity on eval.npz (540 samples the pass never saw). PP-OCR cls/det (ONNXOPT_REAL_MODELS): rendered text
images, 32 to calibrate and 32 others to judge (as benchmarks/quant_vs_peers.py).

Run: ``python benchmarks/quant_guard.py [--islands] [model ...]`` (a few minutes on a busy 2-core machine);
writes benchmarks/results/quant_guard.{md,json}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import rendered, table  # noqa: E402

from onnxopt import PassContext  # noqa: E402
from onnxopt.data import Dataset  # noqa: E402
from onnxopt.io import load_model, serialize_model  # noqa: E402
from onnxopt.sessions import SessionFactory  # noqa: E402
from onnxopt.timing import TimingConfig, compare_latency  # noqa: E402
from onnxopt_passes.quant import QuantConfig, QuantPass  # noqa: E402

DIGITS = ROOT / "examples" / "digits"
REAL = Path(os.environ.get("ONNXOPT_REAL_MODELS", "/work/real-models"))
OUT = ROOT / "benchmarks" / "results"
MODELS = {"mnv3_digits": (ROOT / "tests" / "data" / "mnv3_digits.onnx", 4), "digits cnn": (DIGITS / "cnn.onnx", 1),
          "digits mlp": (DIGITS / "mlp.onnx", 1), "digits transformer": (DIGITS / "transformer.onnx", 1),
          "PP-OCR cls": (REAL / "ch_ppocr_mobile_v2.0_cls_infer.onnx", "cls"),
          "PP-OCR det": (REAL / "ch_PP-OCRv4_det_infer.onnx", "det")}
WORDS = ("invoice total amount date receipt 2024 ONNX runtime quantization model text detection shipping "
         "address customer order number payment").split()


def _inputs(up: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(up, str):  # PP-OCR: rendered text, different seeds for calibration and judging
        return rendered(up, 32, 1, WORDS), rendered(up, 32, 2, WORDS), None
    cal, ev = np.load(DIGITS / "calib.npz"), np.load(DIGITS / "eval.npz")
    grow = (lambda x: x.repeat(up, 2).repeat(up, 3)) if up > 1 else (lambda x: x)
    return grow(cal["x"]), grow(ev["x"]), ev["labels"]


def _run(session: Any, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def main() -> None:
    args = sys.argv[1:]
    islands = "--islands" in args
    only = [a for a in args if not a.startswith("--")] or [m for m in MODELS if MODELS[m][0].exists()]
    variants = [("int8 compute (speed_fallback=off)", {"speed_fallback": "off"}), ("default", {})]
    if islands:
        variants.append(("speed_islands=12", {"speed_islands": 12}))
    rows: list[dict[str, Any]] = []
    sessions = SessionFactory()
    for name in only:
        path, up = MODELS[name]
        calib, held, labels = _inputs(up)
        model = load_model(path)
        feed_name = model.graph.inputs[0].name
        ref = _run(sessions.create(model), held)
        fp32_bytes = len(serialize_model(model))
        for label, keys in variants:
            start = time.perf_counter()
            result = QuantPass().apply(model.clone(), QuantConfig(**keys),
                                       PassContext(calibration=Dataset("calib", {feed_name: calib}, batch_size=8)))
            seconds = time.perf_counter() - start
            blob = serialize_model(result.model)
            y = _run(sessions.create(result.model), held)
            a, b = ref.reshape(len(ref), -1), y.reshape(len(y), -1)
            cos = float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))
            row = {"model": name, "variant": label, "bytes": len(blob), "fp32_bytes": fp32_bytes, "cosine": cos,
                   "seconds": seconds, "warned": bool(result.report.warnings)}
            if ref.ndim == 2:
                row["agreement"] = float(np.mean(y.argmax(1) == ref.argmax(1)))
            if labels is not None:
                row["accuracy"], row["fp32_accuracy"] = float(np.mean(y.argmax(1) == labels)), float(np.mean(ref.argmax(1) == labels))
            for threads in (1, 2):
                s = SessionFactory(threads=threads)
                t = compare_latency(s.create(model), s.create(result.model), {feed_name: held[:1]},
                                    TimingConfig(repeat=20, time_budget=12, threads=threads))
                row[f"ratio{threads}"], row[f"low{threads}"], row[f"high{threads}"] = t.ratio, t.low, t.high
            speed = result.report.figures.get("speed", {})
            row["guard_ratio"] = speed.get("int8_over_fp32", {}).get("median")
            row["summary"] = result.report.summary.split(": ", 1)[-1]
            row["tried"] = [(t["kind"], t["nodes"], t["float_over_int8"]["median"], t["float_over_int8"]["high"],
                             t["returned_to_float"]) for t in speed.get("tried", [])]
            rows.append(row)
            print({k: v for k, v in row.items() if k != "tried"}, flush=True)
            for t in row["tried"]:
                print("   ", t, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    old = OUT / "quant_guard.json"  # rows of models not run this time stay (a run can take one model at a time)
    kept = [r for r in json.loads(old.read_text()) if r["model"] not in only and "variant" in r] if old.exists() else []
    rows = sorted(kept + rows, key=lambda r: list(MODELS).index(r["model"]))
    old.write_text(json.dumps(rows, indent=1))
    f2 = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    f4 = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        r["t1"] = f"{r['ratio1']:.2f} ({r['low1']:.2f}-{r['high1']:.2f})"
        r["t2"] = f"{r['ratio2']:.2f} ({r['low2']:.2f}-{r['high2']:.2f})"
        r["size"] = f"{r['fp32_bytes'] / r['bytes']:.2f}x ({r['bytes']:,} B)"
        r["one_minus_cos"] = f"{1 - r['cosine']:.2e}"
    body = table(rows, [("model", "model", str), ("variant", "variant", str),
                        ("int8 / fp32, 1 thread (95%)", "t1", str), ("2 threads (95%)", "t2", str),
                        ("guard's own ratio (calib feed)", "guard_ratio", f2), ("smaller than fp32", "size", str),
                        ("1 - cos (held out)", "one_minus_cos", str), ("top-1 agreement", "agreement", f4),
                        ("accuracy", "accuracy", f4), ("fp32 accuracy", "fp32_accuracy", f4),
                        ("pass s", "seconds", lambda v: f"{v:.1f}"), ("warned slower", "warned", str),
                        ("what ran", "summary", str)])
    (OUT / "quant_guard.md").write_text(
        "# quant: speed guard, int8 compute vs float compute on int8-stored weights (quant.speed_fallback)\n\n"
        + __doc__.split("\n\n", 1)[1].rsplit("\n\nRun:", 1)[0] + "\n\nShared, noisy 2-core machine: read the "
        "intervals, not the third digit.\n\n" + body + "\n")


if __name__ == "__main__":
    main()
