"""What loading a model in a plain ONNX Runtime session costs, as a user deploying onnxopt's output would load it.

A packed cluster output stores k-means indices and decodes them in the graph
(BitShift -> Reshape -> Cast -> Gather); ORT's constant folding turns that
back into float weights when it creates a session. This measures, on the
3 GiB transformer of benchmarks/make_large_model.py (generated when missing)
and its default cluster output (``onnxopt apply --pass cluster --no-validate``,
generated when missing): peak RSS of creating a default CPU session (1 thread)
and running one sample, and the RSS after, for the original, for the clustered
model, and for the clustered model with ConstantFolding disabled (each run
then decodes). Each case runs in its own process under the measuring wrapper
of large_model.py. Single runs; the load average is recorded.

Usage: python benchmarks/load_memory.py [--large-dir DIR]
Writes benchmarks/results/load_memory.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from large_model import run_measured  # noqa: E402
from tool_time import _large  # noqa: E402

#: Creates the session, runs the first sample of inputs.npz once, prints RSS after (bytes) as JSON.
_LOAD = """
import json, sys
import numpy as np, onnxruntime as ort
path, inputs, folding = sys.argv[1], sys.argv[2], sys.argv[3] == "on"
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                               **({} if folding else {"disabled_optimizers": ["ConstantFolding"]}))
with np.load(inputs) as f:
    feed = {i.name: f[i.name][:1] for i in session.get_inputs()}
session.run(None, feed)
with open("/proc/self/status") as f:
    rss = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:")][0]
print(json.dumps({"rss_after": rss}))
"""


def run(large_dir: Path) -> dict[str, Any]:
    from onnxopt.io import load_model, tensor_bytes

    model, evals, _ = _large(large_dir)
    clustered = large_dir / "cluster.onnx"
    if not clustered.exists():
        subprocess.run([sys.executable, "-m", "onnxopt", "apply", str(model), "--pass", "cluster", "--no-validate", "-q",
                        "-o", str(clustered)], check=True)
    weights = tensor_bytes(load_model(model))
    rows = []
    for label, path, folding in (("original", model, "on"), ("cluster k=16 packed, default session", clustered, "on"),
                                 ("cluster k=16 packed, ConstantFolding off", clustered, "off")):
        load = os.getloadavg()[0]
        print(f"{label} (load {load:.1f}) ...", flush=True)
        m = run_measured([sys.executable, "-c", _LOAD, str(path), str(evals), folding])
        after = json.loads(m.stdout.strip().splitlines()[-1])["rss_after"] if m.returncode == 0 else None
        peak = max(m.peak_rss, m.peak_tree)
        rows.append({"model": label, "ok": m.returncode == 0, "seconds": round(m.seconds, 1), "peak_rss": peak,
                     "peak_x": round(peak / weights, 2), "rss_after": after,
                     "after_x": None if after is None else round(after / weights, 2), "load": round(load, 1),
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     "error": "" if m.returncode == 0 else m.stderr.strip()[-300:]})
        print(f"  peak {rows[-1]['peak_x']}x, after {rows[-1]['after_x']}x, {rows[-1]['seconds']} s", flush=True)
    return {"weights": weights, "rows": rows}


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = ["# Loading onnxopt's output in a plain ONNX Runtime session: peak memory", "",
             "A default CPU session (1 thread) is created and runs one sample, in its own process "
             "(benchmarks/load_memory.py); peak RSS is the larger of `ru_maxrss` and the summed RSS of the process "
             "tree sampled at 20 Hz, as a multiple of the original model's weights "
             f"({result['weights'] / 1e9:.3f} GB). The packed cluster output is ~0.13x the size on disk, but ORT's "
             "constant folding decodes it back to float weights at load, with every intermediate of the decode "
             "alive at once. `onnxopt apply` warns about this when it writes such a model. Single runs.", "",
             "| model | peak RSS × weights | RSS after × weights | seconds | load | date (UTC) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        after = "-" if r["after_x"] is None else f"{r['after_x']:.2f}"
        lines.append(f"| {r['model']} | {r['peak_x']:.2f} | {after} | {r['seconds']:.1f} | {r['load']:.1f} | {r['date']} |"
                     + (f" FAILED: {r['error']}" if not r["ok"] else ""))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-dir", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-large",
                        help="where the 3 GiB model is (or is generated), and its cluster output")
    args = parser.parse_args()
    result = run(args.large_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "load_memory.md")
    print(f"wrote {RESULTS / 'load_memory.md'}")


if __name__ == "__main__":
    main()
