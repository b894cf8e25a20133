"""A YOLOv8 detector nobody here trained on: each lossy pass under a budget, gated by its detections (issue 13).

NudeNet 3.4.2's ``320n.onnx`` (PyPI nudenet, AGPL-3.0; fetched by ``benchmarks/fetch_nudenet.sh``) is an
ultralytics YOLOv8n export: ``images [N, 3, H, W]`` -> ``output0 [N, 4 + 18, 2100]`` at 320 x 320, boxes in
pixels then 18 sigmoid class scores. No data of its domain is at hand: the inputs are 320 x 320 crops (random
square, resized, half mirrored) of scikit-image's sample pictures. ``calib.npz`` (64) and ``eval.npz`` (96,
split by apply into 48 selection and 48 confirmation samples) crop four pictures in five; the fresh inputs (64)
crop the fifth, pictures neither file contains.

Each row is one command as a user types it (validation on), in its own subprocess. The figures:
- selection / confirmation: from apply's ``--report`` (the drop the choice was made on, the drop the gate saw);
- fresh: this script's own, 1 - the F-score of the output's detections against the original's on the fresh
  inputs (``onnxopt.detection``: score > 0.25, class-wise NMS at IoU 0.45, matched at IoU >= 0.5, same class);
- size and latency: apply's report (latency: its paired timing on the confirmation part).
The "cosine" row gates the same quant command by ``--metric output0=cosine``, the automatic metric of this output
before the detection metric: its pass/fail against the fresh F-score is what the detection metric fixed.

Usage: python benchmarks/detector.py [--models DIR] (DIR holds nudenet/, default $ONNXOPT_REAL_MODELS or
/work/real-models); about 25 minutes on 2 shared cores. Writes benchmarks/results/detector.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from onnxopt.detection import detection_counts  # noqa: E402

SIZE = 320
#: (row, --max-drop, arguments after the model)
ROWS: list[tuple[str, float, list[str]]] = [
    ("quant", 0.02, ["--pass", "quant", "--data", "{calib}"]),
    ("quant, gated by cosine (the old automatic metric)", 0.02,
     ["--pass", "quant", "--data", "{calib}", "--metric", "output0=cosine"]),
    ("quant", 0.08, ["--pass", "quant", "--data", "{calib}"]),
    ("prune", 0.08, ["--pass", "prune", "--data", "{calib}"]),
    ("cluster", 0.02, ["--pass", "cluster"]),
    ("cluster", 0.08, ["--pass", "cluster"]),
]


def _crops(pictures: list[Any], n: int, seed: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        picture = pictures[int(rng.integers(len(pictures)))]
        w, h = picture.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = picture.crop((x, y, x + side, y + side)).resize((SIZE, SIZE))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop, np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out)


def _data(folder: Path, work: Path) -> dict[str, Path]:
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*")) if p.suffix in (".png", ".jpg")]
    pictures = [p for p in pictures if min(p.size) >= 200]
    fresh, seen = pictures[::5], [p for i, p in enumerate(pictures) if i % 5]
    paths = {"calib": work / "calib.npz", "eval": work / "eval.npz", "fresh": work / "fresh.npz"}
    np.savez(paths["calib"], images=_crops(seen, 64, 1))
    np.savez(paths["eval"], images=_crops(seen, 96, 2))
    np.savez(paths["fresh"], images=_crops(fresh, 64, 3))
    return paths


def _outputs(model: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": images[i:i + 8]})[0] for i in range(0, len(images), 8)])


def _fresh(reference: np.ndarray, model: Path, images: np.ndarray) -> dict[str, Any]:
    counts = detection_counts(reference, _outputs(model, images))
    assert counts is not None
    matched, in_reference, in_candidate = counts
    total = in_reference + in_candidate
    return {"fresh_drop": 0.0 if total == 0 else 1.0 - 2 * matched / total,
            "fresh_counts": f"{in_reference}/{in_candidate}/{matched}"}


def _row(name: str, limit: float, args: list[str], model: Path, data: dict[str, Path], reference: np.ndarray,
         fresh: np.ndarray, work: Path) -> dict[str, Any]:
    out = work / f"out{len(list(work.glob('out*.onnx')))}.onnx"
    report = out.with_suffix(".json")
    args = [a.replace("{calib}", str(data["calib"])) for a in args]
    command = [sys.executable, "-m", "onnxopt", "apply", str(model), *args, "--eval", str(data["eval"]),
               "--max-drop", str(limit), "-o", str(out), "--report", str(report)]
    print(" ".join(command[2:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    row: dict[str, Any] = {"row": name, "max_drop": limit, "command": "onnxopt " + " ".join(command[3:]),
                           "exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    if not report.exists():
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    run = json.loads(report.read_text())
    v = run.get("validation") or {}
    chosen = [f"{p['pass']}: {(p['figures'].get('budget') or {}).get('chosen') or 'nothing (rolled back)'}"
              for p in run["passes"]]
    row.update({"chosen": "; ".join(chosen), "drop_selection": run.get("drop_selection"),
                "drop_confirmation": run.get("drop_confirmation"), "gate_passed": run.get("gate_passed"),
                "written": run.get("written"), "size": (v.get("ratios") or {}).get("size_bytes"),
                "latency": (v.get("latency") or {}).get("text"), "metric": ", ".join(r["metric"] for r in v.get("drop_outputs", []))})
    if out.exists():
        row.update(_fresh(reference, out, fresh))
    return row


def _pt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} pt"


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        "## Detector under a budget: NudeNet's YOLOv8n (`benchmarks/detector.py`)",
        "",
        f"{data['date']}, {data['machine']}. Model: NudeNet 3.4.2 `320n.onnx` (YOLOv8n, output0 [N, 22, 2100]); "
        "inputs: 320 × 320 crops of scikit-image's sample pictures (calib 64, eval 96 split 48/48, fresh 64 from "
        "pictures neither file contains). Each row is the command as typed, validation on. **selection** is the "
        "drop the pass chose on, **confirmation** the one the gate saw (both from apply's report, by the output's "
        "metric), **fresh** this script's 1 − F-score of the written model's detections against the original's "
        "on the fresh inputs (counts: reference / candidate / matched). The cosine row gates the same quant run by "
        "cosine, the automatic metric of this output before `detection`. A rolled-back row wrote the input back "
        "(nothing within the budget; the report lists each setting tried): its drops are the unchanged model's. "
        "With these out-of-domain pictures the parts hold 13–22 detections, so one lost detection is 4–8 pt.",
        "",
        "| row | --max-drop | metric | chosen | selection | confirmation | gate | fresh | size | latency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['max_drop']} | - | error: {r['error']} | | | | | | |")
            continue
        gate = "passed" if r.get("gate_passed") else "refused (exit 3, nothing written)" if r.get("exit") == 3 else "-"
        fresh = "-" if "fresh_drop" not in r else f"{_pt(r['fresh_drop'])} ({r['fresh_counts']})"
        size = "-" if r.get("size") is None else f"{r['size']:.3f}×"
        lines.append(f"| {r['row']} | {r['max_drop']} | {r.get('metric', '-')} | {r.get('chosen', '-')} | "
                     f"{_pt(r.get('drop_selection'))} | {_pt(r.get('drop_confirmation'))} | {gate} | {fresh} | {size} | "
                     f"{r.get('latency') or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("ONNXOPT_REAL_MODELS", "/work/real-models")))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite detector.md from detector.json")
    args = parser.parse_args()
    if args.markdown_only:
        (RESULTS / "detector.md").write_text(_markdown(json.loads((RESULTS / "detector.json").read_text())))
        return
    folder = args.models / "nudenet"
    model = folder / "320n.onnx"
    if not model.exists():
        raise SystemExit(f"{model} not found: run bash benchmarks/fetch_nudenet.sh {args.models}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _data(folder / "pictures", work)
        fresh = np.load(data["fresh"])["images"]
        reference = _outputs(model, fresh)
        rows = [_row(name, limit, row_args, model, data, reference, fresh, work) for name, limit, row_args in ROWS]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    result = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, {cpu}", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detector.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "detector.md").write_text(_markdown(result))
    print(f"wrote {RESULTS / 'detector.md'}")


if __name__ == "__main__":
    main()
