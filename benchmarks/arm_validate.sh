#!/usr/bin/env bash
# int8 digits models on ONNX Runtime's aarch64 build (qemu-user emulation) against the x86 run.
#
#   bash benchmarks/arm_validate.sh            (sets the arm64 environment up first if it is missing)
#
# For the digits cnn and mlp, quantized by onnxopt with uint8 activations (U8S8 kernels) and int8 activations
# (S8S8), runs `onnxopt validate fp32.onnx int8.onnx --eval eval.npz --target arm64` on two emulated CPUs:
# neoverse-n1 (Armv8.2, dot product) and max (adds i8mm matrix-multiply instructions: other int8 kernels).
# Writes benchmarks/results/arm.md and arm.json. Emulated time is not device latency and is not reported.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
DIGITS="$ROOT/examples/digits"
OUT="$ROOT/benchmarks/results"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

if ! "$PY" -c 'from onnxopt.arm import find_runtime; find_runtime()' 2>/dev/null; then
  PYTHON="$(command -v "$PY")" bash "$ROOT/scripts/setup_arm64.sh"
fi

for model in cnn mlp; do
  for act in uint8 int8; do
    "$PY" -m onnxopt apply "$DIGITS/$model.onnx" --pass fold,quant --set quant.activation_type=$act \
      --data "$DIGITS/calib.npz" --no-validate -o "$TMP/${model}_$act.onnx" -q >/dev/null
    for cpu in neoverse-n1 max; do
      echo "[arm_validate] $model int8 ($act activations) on $cpu" >&2
      QEMU_CPU=$cpu "$PY" -m onnxopt validate "$DIGITS/$model.onnx" "$TMP/${model}_$act.onnx" --eval "$DIGITS/eval.npz" \
        --target arm64 --report "$TMP/${model}_${act}_${cpu}.json" -q >/dev/null
    done
  done
done

"$PY" - "$TMP" "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from onnxopt.report import environment
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for path in sorted(tmp.glob("*_*_*.json")):
    model, act, cpu = path.stem.split("_", 2)
    doc = json.loads(path.read_text())
    t, v = doc["target"], doc["validation"]
    c, r = t["runs"]["candidate"], t["runs"]["reference"]
    rows.append({"model": model, "activations": act, "qemu_cpu": cpu, "onnxruntime_arm": t["onnxruntime"],
                 "fp32_x86": r["accuracy_x86"], "fp32_arm": r["accuracy_arm"], "fp32_max_abs_diff": r["max_abs_diff"],
                 "int8_x86": c["accuracy_x86"], "int8_arm": c["accuracy_arm"], "int8_agreement": c["top1_agreement"],
                 "int8_max_abs_diff": c["max_abs_diff"], "arm_minus_x86_pt": (c["accuracy_arm"] - c["accuracy_x86"]) * 100,
                 "drop_arm_pt": t["drop"] * 100, "drop_x86_pt": v["drop"] * 100, "samples": v["samples"]})
lines = ["# arm64 validation (ONNX Runtime aarch64 under qemu-user)", "",
         "`bash benchmarks/arm_validate.sh`: onnxopt int8 models (fold,quant; per-channel int8 weights) run by the aarch64",
         "onnxruntime wheel from PyPI in an emulated aarch64 Debian sysroot (`scripts/setup_arm64.sh`), against the same",
         "models on this x86 machine, over all eval samples. Accuracy and outputs only: emulated time is no device latency.", "",
         "| model | activations | emulated CPU | fp32 x86 | fp32 arm64 | int8 x86 | int8 arm64 | arm64 - x86 pt | int8 top-1 agreement arm/x86 | int8 max abs diff | drop x86 pt | drop arm64 pt |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    lines.append(f"| {r['model']} | {r['activations']} | {r['qemu_cpu']} | {r['fp32_x86']*100:.2f}% | {r['fp32_arm']*100:.2f}% | "
                 f"{r['int8_x86']*100:.2f}% | {r['int8_arm']*100:.2f}% | {r['arm_minus_x86_pt']:+.2f} | {r['int8_agreement']*100:.2f}% | "
                 f"{r['int8_max_abs_diff']:.3g} | {r['drop_x86_pt']:.2f} | {r['drop_arm_pt']:.2f} |")
worst = max(abs(r["arm_minus_x86_pt"]) for r in rows)
lines += ["", f"Largest |arm64 - x86| accuracy difference of an int8 model: {worst:.2f} pt (target: within 0.2 pt).",
          f"aarch64 onnxruntime {rows[0]['onnxruntime_arm']}; " + ", ".join(f"{k} {v}" for k, v in environment().items()), ""]
(out / "arm.md").write_text("\n".join(lines))
(out / "arm.json").write_text(json.dumps({"rows": rows, "environment": environment()}, indent=2) + "\n")
print("\n".join(lines))
PYEOF
