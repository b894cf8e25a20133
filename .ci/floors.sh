#!/usr/bin/env bash
# CI at the lowest supported versions: a second venv with onnx, onnxruntime, onnx-ir, numpy, pluggy (and the
# ml_dtypes and protobuf they need) at the floors pyproject.toml declares, then a fast subset of the tests.
# The floors are read from pyproject.toml, so the two cannot drift apart. Takes about 2-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
venv=.venv-floors
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
constraints="$venv/floors.txt"
python3 - "$constraints" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
floored = ("onnx", "onnxruntime", "onnx-ir", "numpy", "pluggy", "ml_dtypes", "protobuf")
pins = []
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep)
    if m and m.group(1) in floored:
        pins.append(f"{m.group(1)}=={m.group(2)}")
missing = set(floored) - {p.split("==")[0] for p in pins}
if missing:
    sys.exit(f"pyproject.toml has no NAME>=FLOOR dependency for {sorted(missing)}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("floors:", " ".join(pins))
PY
# onnxscript (a test extra) needs newer onnx/onnx-ir than the floors: its tests skip here
pip install -q -c "$constraints" -e . pytest pytest-xdist hypothesis
pip install -q -c "$constraints" -e ./plugins/onnxopt-fp16-weights
pip check >/dev/null || { pip check; exit 1; }
python3 - "$constraints" <<'PY'
import importlib.metadata as md, sys
for line in open(sys.argv[1]).read().split():
    name, version = line.split("==")
    got = md.version(name)
    if tuple(map(int, got.split(".")[:3])) != tuple(map(int, (version.split(".") + ["0", "0"])[:3])):
        sys.exit(f"{name} {got} installed, floor {version} expected")
PY
python -m pytest -q -p no:cacheprovider -o addopts="" -n 2 -m "not slow" \
  tests/test_config_and_plugins.py tests/test_hooks.py tests/test_ir_bridge.py tests/test_layout.py \
  tests/test_fold.py tests/test_io.py tests/test_validation.py tests/test_quant.py tests/test_lowrank.py \
  tests/test_pass_declarations.py
