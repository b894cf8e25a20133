"""quant's GELU integer path: latency and fidelity with and without the rewrite, per way GELU is written.

Model: ``tests.graphs_quant.gelu_mlp`` (two transformer MLP blocks, 128 -> 512 -> 128, random weights) with GELU
as PyTorch's exported tanh chain, the opset-20 Gelu(approximate=tanh), com.microsoft FastGelu, and PyTorch's
exported erf chain. Calibration: 64 rows of N(0, 1); fidelity (1 - cosine against fp32) on 256 other rows;
latency: onnxopt.timing's paired ratio against fp32 (1 thread) on a 64-row feed (64 tokens), measured after the
pass. Variants: the speed guard off (what the integer kernels alone do) with ``quant.gelu`` float (the default)
and integer (and integer_erf for the erf chain), then with the guard on.

Run: ``python benchmarks/quant_gelu.py`` (about a minute); writes benchmarks/results/quant_gelu.{md,json}.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import table  # noqa: E402

from onnxopt import PassContext  # noqa: E402
from onnxopt.data import Dataset  # noqa: E402
from onnxopt.sessions import SessionFactory  # noqa: E402
from onnxopt.timing import TimingConfig, compare_latency  # noqa: E402
from onnxopt_passes.quant import QuantConfig, QuantPass  # noqa: E402
from tests.graphs_quant import gelu_mlp  # noqa: E402
from tests.helpers import to_ir  # noqa: E402
from tests.test_quant import _optimized_ops  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
VARIANTS = [("guard off, gelu=float (default)", {"speed_guard": "off"}),
            ("guard off, gelu=integer", {"speed_guard": "off", "gelu": "integer"}),
            ("guard off, gelu=integer_erf", {"speed_guard": "off", "gelu": "integer_erf"}),
            ("gelu=integer, guard on", {"gelu": "integer"}),
            ("defaults", {})]


def main() -> None:
    cal = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    held = np.random.default_rng(2).standard_normal((256, 128)).astype(np.float32)
    sessions = SessionFactory()
    rows = []
    for form in ("torch_tanh", "onnx_tanh", "fastgelu", "erf_chain"):
        proto = gelu_mlp(form, dim=128, hidden=512, layers=2)
        ref_session = sessions.create(to_ir(proto))
        ref = ref_session.run(None, {"x": held})[0].ravel()
        fp32_ops = Counter(_optimized_ops(to_ir(proto)))
        for label, keys in VARIANTS:
            if keys.get("gelu") == "integer_erf" and form != "erf_chain":
                continue
            result = QuantPass().apply(to_ir(proto), QuantConfig(**keys),
                                       PassContext(calibration=Dataset("calib", {"x": cal}, batch_size=64)))
            session = sessions.create(result.model)
            got = session.run(None, {"x": held})[0].ravel()
            timing = compare_latency(ref_session, session, {"x": held[:64]}, TimingConfig(repeat=20, time_budget=10, threads=1))
            ops = Counter(_optimized_ops(result.model))
            rows.append({"form": form, "variant": label, "ratio": timing.ratio, "low": timing.low, "high": timing.high,
                         "one_minus_cos": 1 - float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)),
                         "ort_ops": dict(ops), "fp32_ops": dict(fp32_ops)})
            print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quant_gelu.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        r["t"] = f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f})"
        r["err"] = f"{r['one_minus_cos']:.2e}"
        gelu = {k: v for k, v in r["ort_ops"].items() if k in ("QLinearSigmoid", "FastGelu", "Gelu", "Tanh", "Erf", "QLinearMul", "QLinearMatMul")}
        r["ops"] = ", ".join(f"{k} {v}" for k, v in sorted(gelu.items()))
        r["fp32"] = ", ".join(f"{k} {v}" for k, v in sorted(r["fp32_ops"].items()))
    body = table(rows, [("GELU written as", "form", str), ("variant", "variant", str),
                        ("int8 / fp32, 1 thread (95%)", "t", str), ("1 - cos (held out)", "err", str),
                        ("ORT runs (GELU-related and MatMul kernels)", "ops", str), ("fp32 ORT runs", "fp32", str)])
    (OUT / "quant_gelu.md").write_text("# quant: GELU's integer path\n\n" + __doc__.split("\n\n", 1)[1].rsplit("\n\nRun:", 1)[0]
                                       + "\n\nShared, noisy 2-core machine: read the intervals.\n\n" + body + "\n")


if __name__ == "__main__":
    main()
