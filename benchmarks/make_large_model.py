"""A transformer-shaped ONNX model with its weights in external data, written one tensor at a time.

The graph is a pre-LayerNorm encoder stack as exporters write it: per layer
LayerNorm -> Q/K/V MatMul+Add -> Reshape/Transpose into heads -> scaled
Q.K^T -> Softmax -> .V -> Transpose/Reshape -> output MatMul+Add ->
residual Add -> LayerNorm -> FFN MatMul+Add -> GELU (tanh-free: x*sigmoid(1.702x))
-> MatMul+Add -> residual Add; then a final LayerNorm and an LM-head MatMul to
``vocab`` logits. Input ``x`` is float32 [batch, seq, hidden] (hidden
states, so the model needs no token ids), output ``logits`` is
[batch, seq, vocab].

Weights are random but not white noise: each MatMul weight is a low-rank
product plus noise (rank hidden/4 holds most of the energy), the way trained
weights concentrate their spectrum, so low-rank factorization has something
to find. Each tensor is generated, appended to the ``.data`` file and
dropped before the next one: memory holds one tensor at a time, never the
model.

Presets: ``large`` (>= 3 GiB of fp32 weights, 28 layers of hidden 1536,
FFN 6144) and ``ci`` (the same shape at about 300 MB: 24 layers of hidden
512, FFN 2048). ``chain`` is another graph: issue 16's plain chain of 24
2-D MatMuls alternating 4096x6144 and 6144x4096 (2.4 GB), input ``x``
[batch, 4096], nothing between them (no activation, no bias): a graph where
every edge of the int8 model is a Q/DQ pair.

Usage: python benchmarks/make_large_model.py OUT.onnx [--preset large|ci|chain] [--calib N]
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["CHAIN", "LargeModelSpec", "PRESETS", "make_large_model", "make_matmul_chain", "write_chain_inputs",
           "write_inputs"]

OPSET = 18


@dataclass(frozen=True)
class LargeModelSpec:
    """Shape of the generated transformer."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    seq: int = 32
    #: rank of the structured part of each MatMul weight, as a share of its smaller side
    rank_share: float = 0.25
    #: standard deviation of the unstructured part, relative to the structured part's
    noise: float = 0.1

    def weight_bytes(self) -> int:
        """Bytes of fp32 weights the model holds."""
        h, f = self.hidden, self.ffn
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # QKVO + biases, FFN + biases, 2 LayerNorms
        return 4 * (self.layers * per_layer + 2 * h + h * self.vocab)


PRESETS = {
    "large": LargeModelSpec(layers=28, hidden=1536, ffn=6144, heads=12, vocab=8192),
    "ci": LargeModelSpec(layers=24, hidden=512, ffn=2048, heads=8, vocab=4096),
    "tiny": LargeModelSpec(layers=2, hidden=64, ffn=256, heads=4, vocab=128, seq=8),
}


#: issue 16's chain: (MatMuls, the two widths it alternates between)
CHAIN = (24, 4096, 6144)


class _ExternalWriter:
    """Appends tensors to one data file and returns TensorProtos that point at them."""

    def __init__(self, data_path: Path) -> None:
        self.location = data_path.name
        self.file = open(data_path, "wb")  # noqa: SIM115 - closed by close()
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array, dtype=np.float32)
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        length = array.nbytes
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        array.tofile(self.file)
        self.offset += length
        return tensor

    def close(self) -> None:
        self.file.close()


def _structured(rng: np.random.Generator, rows: int, cols: int, spec: LargeModelSpec) -> np.ndarray:
    """A [rows, cols] weight: low-rank product plus noise, scaled so activations keep unit size."""
    rank = max(1, int(min(rows, cols) * spec.rank_share))
    a = rng.standard_normal((rows, rank), dtype=np.float32)
    b = rng.standard_normal((rank, cols), dtype=np.float32)
    w = a @ b
    w *= 1.0 / math.sqrt(rank)
    w += rng.standard_normal((rows, cols), dtype=np.float32) * spec.noise
    w *= 1.0 / math.sqrt(rows * (1.0 + spec.noise**2))
    return w


def make_large_model(path: str | os.PathLike[str], spec: LargeModelSpec, *, seed: int = 0) -> Path:
    """Write the model to ``path`` and its weights to ``<name>.data`` beside it; return the model path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    rng = np.random.default_rng(seed)
    h, heads = spec.hidden, spec.heads
    if h % heads:
        raise ValueError(f"hidden {h} is not a multiple of heads {heads}")
    head_dim = h // heads
    writer = _ExternalWriter(data_path)
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, array: np.ndarray) -> str:
        initializers.append(writer.add(name, array))
        return name

    def small(name: str, array: np.ndarray) -> str:  # shapes and scalars stay inline
        initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def linear(x: str, prefix: str, rows: int, cols: int) -> str:
        w = weight(f"{prefix}.weight", _structured(rng, rows, cols, spec))
        b = weight(f"{prefix}.bias", rng.standard_normal(cols, dtype=np.float32) * 0.02)
        return node("Add", [node("MatMul", [x, w], f"{prefix}/MatMul"), b], f"{prefix}/Add")

    def layer_norm(x: str, prefix: str) -> str:
        scale = weight(f"{prefix}.weight", 1.0 + rng.standard_normal(h, dtype=np.float32) * 0.05)
        bias = weight(f"{prefix}.bias", rng.standard_normal(h, dtype=np.float32) * 0.02)
        return node("LayerNormalization", [x, scale, bias], f"{prefix}/LayerNormalization", axis=-1, epsilon=1e-5)

    try:
        heads_shape = small("shape.heads", np.array([0, 0, heads, head_dim], np.int64))
        merged_shape = small("shape.merged", np.array([0, 0, h], np.int64))
        attn_scale = small("attention.scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
        gelu_k = small("gelu.k", np.array(1.702, np.float32))
        x = "x"
        for i in range(spec.layers):
            p = f"layers.{i}"
            ln = layer_norm(x, f"{p}.ln1")
            q = linear(ln, f"{p}.attn.q", h, h)
            k = linear(ln, f"{p}.attn.k", h, h)
            v = linear(ln, f"{p}.attn.v", h, h)
            q = node("Transpose", [node("Reshape", [q, heads_shape], f"{p}.attn.q/Reshape")], f"{p}.attn.q/Transpose", perm=[0, 2, 1, 3])
            k = node("Transpose", [node("Reshape", [k, heads_shape], f"{p}.attn.k/Reshape")], f"{p}.attn.k/Transpose", perm=[0, 2, 3, 1])
            v = node("Transpose", [node("Reshape", [v, heads_shape], f"{p}.attn.v/Reshape")], f"{p}.attn.v/Transpose", perm=[0, 2, 1, 3])
            scores = node("Mul", [node("MatMul", [q, k], f"{p}.attn/scores"), attn_scale], f"{p}.attn/scaled")
            probs = node("Softmax", [scores], f"{p}.attn/Softmax", axis=-1)
            ctx = node("MatMul", [probs, v], f"{p}.attn/context")
            ctx = node("Reshape", [node("Transpose", [ctx], f"{p}.attn/merge_Transpose", perm=[0, 2, 1, 3]), merged_shape],
                       f"{p}.attn/merge_Reshape")
            x = node("Add", [x, linear(ctx, f"{p}.attn.o", h, h)], f"{p}/residual1")
            ln = layer_norm(x, f"{p}.ln2")
            up = linear(ln, f"{p}.ffn.up", h, spec.ffn)
            act = node("Mul", [up, node("Sigmoid", [node("Mul", [up, gelu_k], f"{p}.ffn/gelu_scale")], f"{p}.ffn/gelu_sigmoid")],
                       f"{p}.ffn/gelu")
            x = node("Add", [x, linear(act, f"{p}.ffn.down", spec.ffn, h)], f"{p}/residual2")
        x = layer_norm(x, "final_ln")
        head = weight("lm_head.weight", _structured(rng, h, spec.vocab, spec))
        node("MatMul", [x, head], "logits")
    finally:
        writer.close()

    graph = helper.make_graph(
        nodes, "large_transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", spec.seq, h])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", spec.seq, spec.vocab])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxopt-make-large-model")
    model.ir_version = 10
    onnx.save_model(model, str(path))  # the proto holds no weight data: a few hundred KB
    onnx.checker.check_model(str(path))
    return path


def make_matmul_chain(path: str | os.PathLike[str], layers: int = CHAIN[0], widths: tuple[int, int] = CHAIN[1:],
                      *, seed: int = 0) -> Path:
    """Write the plain MatMul chain to ``path`` (weights in ``<name>.data``, one tensor in memory at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spec = LargeModelSpec(layers=layers, hidden=widths[0], ffn=widths[1], heads=1, vocab=1)
    writer = _ExternalWriter(path.with_name(path.name + ".data"))
    nodes, initializers, x = [], [], "x"
    try:
        for i in range(layers):
            rows, cols = (widths[0], widths[1]) if i % 2 == 0 else (widths[1], widths[0])
            initializers.append(writer.add(f"chain.{i}.weight", _structured(rng, rows, cols, spec)))
            out = "y" if i == layers - 1 else f"chain.{i}"
            nodes.append(helper.make_node("MatMul", [x, f"chain.{i}.weight"], [out], name=f"chain.{i}/MatMul"))
            x = out
    finally:
        writer.close()
    last = widths[1] if layers % 2 else widths[0]
    graph = helper.make_graph(nodes, "matmul_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", last])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxopt-make-large-model")
    model.ir_version = 10
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def write_chain_inputs(path: str | os.PathLike[str], samples: int, width: int = CHAIN[1], *, seed: int = 1) -> Path:
    """Random ``x`` [samples, width] for the chain, as an .npz for --data / --eval."""
    np.savez(path, x=np.random.default_rng(seed).standard_normal((samples, width), dtype=np.float32))
    return Path(path)


def write_inputs(path: str | os.PathLike[str], spec: LargeModelSpec, samples: int, *, seed: int = 1) -> Path:
    """Random hidden states ``x`` [samples, seq, hidden] as an .npz for --data / --eval."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, spec.seq, spec.hidden), dtype=np.float32)
    np.savez(path, x=x)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="model path; weights go to OUTPUT.data beside it")
    parser.add_argument("--preset", choices=[*sorted(PRESETS), "chain"], default="large")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=0, help="also write OUTPUT-stem.calib.npz with this many samples")
    args = parser.parse_args()
    if args.preset == "chain":
        make_matmul_chain(args.output, args.layers or CHAIN[0], seed=args.seed)
        print(f"{args.output}: MatMul chain, weights in {args.output.name}.data")
        if args.calib:
            print(write_chain_inputs(args.output.with_suffix(".calib.npz"), args.calib))
        return
    spec = PRESETS[args.preset]
    if args.layers is not None:
        spec = LargeModelSpec(**{**spec.__dict__, "layers": args.layers})
    make_large_model(args.output, spec, seed=args.seed)
    print(f"{args.output}: {spec.weight_bytes() / 2**30:.2f} GiB of fp32 weights in {args.output.name}.data")
    if args.calib:
        out = write_inputs(args.output.with_suffix(".calib.npz"), spec, args.calib)
        print(f"{out}: {args.calib} samples")


if __name__ == "__main__":
    main()
