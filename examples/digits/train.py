"""Train the three example classifiers on scikit-learn's digits and export them to ONNX.

The committed ``*.onnx``, ``*.npz`` and ``metrics.json`` files next to this script
are its output. It is run by hand, never in CI, because it needs torch::

    pip install torch==2.13.0 scikit-learn onnxscript
    python examples/digits/train.py

It writes, into the directory that holds this file:

* ``cnn.onnx``, ``mlp.onnx``, ``transformer.onnx`` -- one input ``x`` float32
  ``[batch, 1, 8, 8]``, one output ``logits`` float32 ``[batch, 10]``;
* ``train.npz``, ``calib.npz`` (128 samples), ``eval.npz`` -- keys ``x`` and ``labels``;
* ``metrics.json`` -- eval accuracy (torch and onnxruntime), parameter count and
  op histogram of each exported graph.

Everything is seeded; reruns with the same package versions reproduce the files
byte for byte. The whole run takes about 30 s on two CPU cores.

Export uses torch's dynamo exporter with its optimiser off, then a copy of that
optimiser without the BatchNormalization-into-Conv fusion, built from onnxscript
internals (``rewriter._DEFAULT_REWRITE_RULES``, ``optimizer._constant_folding``).
Last run with torch 2.13.0, onnxscript 0.7.2, onnx 1.23.2, onnxruntime 1.32.0.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import onnxscript
import torch
import torch.nn.functional as F
from onnxscript import opset18 as op18
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
# 18 is the lowest opset the torch 2.13 exporter implements natively; asking
# for 17 goes through a version converter that fails on ReduceMean's axes input.
OPSET = 18
N_CALIB = 128
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- data


def make_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train"|"calib"|"eval": (x [N,1,8,8] float32, labels [N] int64)}``."""
    digits = load_digits()
    # Raw pixels are integers 0..16; scale to [0, 1] so every consumer of the
    # .npz files (calibration, eval) sees exactly what the models were trained on.
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_rest, x_eval, y_rest, y_eval = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=SEED
    )
    # Calibration samples come out of the non-test part and are held out of
    # training too, so a calibration-driven pass never sees eval data and the
    # calibration set is not memorised by the model.
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=N_CALIB, stratify=y_rest, random_state=SEED
    )
    return {
        "train": (np.ascontiguousarray(x_train), y_train),
        "calib": (np.ascontiguousarray(x_calib), y_calib),
        "eval": (np.ascontiguousarray(x_eval), y_eval),
    }


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in each direction, filling with zeros.

    The digits are roughly centred but not exactly; small shifts are the cheapest
    augmentation that helps the CNN over the 97% bar on ~1100 training images.
    """
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


# ------------------------------------------------------------------------- models


class ConvBNReLU(nn.Sequential):
    def __init__(
        self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            # No conv bias: BN follows, and a bias there would only be folded away.
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class DigitsCNN(nn.Module):
    """Small CNN that exercises the graph patterns onnxopt's passes must handle.

    Residual Add, channel Concat of two branches, a depthwise conv and BN after
    every conv are all here on purpose, not because the task needs them.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = ConvBNReLU(1, w)
        # Residual block with an identity arm: pruning must keep both Add inputs
        # at the same channel count.
        self.res_a = ConvBNReLU(w, w)
        self.res_b = ConvBNReLU(w, w, relu=False)
        # Two branches concatenated on channels: pruning one branch shifts the
        # channel offsets the consumer of the Concat sees.
        self.branch_1x1 = ConvBNReLU(w, w, k=1)
        self.branch_3x3 = ConvBNReLU(w, w, k=3)
        self.down = ConvBNReLU(2 * w, 2 * w, stride=2)
        # Depthwise (groups == channels) then pointwise, with a residual around
        # both: a depthwise conv's output channels are tied to its input channels.
        self.dw = ConvBNReLU(2 * w, 2 * w, groups=2 * w)
        self.pw = ConvBNReLU(2 * w, 2 * w, k=1, relu=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.res_b(self.res_a(x)))
        x = torch.cat([self.branch_1x1(x), self.branch_3x3(x)], dim=1)
        x = self.down(x)
        x = F.relu(x + self.pw(self.dw(x)))
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        # Wider than 64 pixels need, so low-rank factorisation and pruning have
        # redundancy to remove.
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Hand-written multi-head attention.

    nn.MultiheadAttention / scaled_dot_product_attention may export as a fused
    op; spelling it out guarantees plain MatMul/Add/Softmax nodes in ONNX, which
    is what onnxopt's passes look for.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, s, _ = t.shape
        return t.reshape(n, s, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (self.d_head**-0.5)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(n, s, d))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        # Pre-norm: trains stably from scratch in few epochs without warm-up.
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff2(F.relu(self.ff1(self.ln2(x))))


class DigitsTransformer(nn.Module):
    """Each of the 8 image rows is a token of 8 pixel features."""

    def __init__(
        self, d_model: int = 64, n_heads: int = 4, d_ff: int = 256, n_layers: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.zeros(1, 8, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The model keeps the common [N,1,8,8] input so all three examples share
        # one data file format.
        x = x.reshape(x.shape[0], 8, 8)
        x = self.embed(x) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x).mean(dim=1))


# ----------------------------------------------------------------------- training


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    augment: bool,
    batch_size: int = 64,
) -> None:
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = xt[idx], yt[idx]
            if augment:
                xb = random_shift(xb, gen)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------------- export


def _gap(x: Any, output_size: Any) -> Any:
    # Only ever called for AdaptiveAvgPool2d(1): the exporter would otherwise
    # decompose it to ReduceMean, and GlobalAveragePool is the op a channel
    # pruner expects to pass straight through.
    return op18.GlobalAveragePool(x)


def _optimize(model: ir.Model) -> None:
    """Constant-fold and tidy the graph like ``optimize=True`` does, minus BN fusion.

    torch's built-in optimisation runs onnxscript's default rewrite rules, which
    fold BatchNormalization into Conv/Gemm; onnxopt's `fold` pass is what should
    do that, so those rules (and Flatten->Reshape) are filtered out. Initializer
    deduplication is left out too: it would make two layers that happen to hold
    equal tensors share one initializer, and a pass editing one would edit both.
    """
    skip = ("FuseBatchNorm", "Flatten2Reshape")
    rules = [
        r
        for r in rewriter._DEFAULT_REWRITE_RULES
        if not str(getattr(r, "name", "")).startswith(skip)
    ]
    ir.passes.Sequential(
        ir.passes.PassManager(
            [
                # Limits raised so every transposed Linear weight is folded
                # (the largest is 256x64); these models are tiny anyway.
                _constant_folding.FoldConstantsPass(
                    shape_inference=True, input_size_limit=1 << 20, output_size_limit=1 << 20
                ),
                rewriter.RewritePass(rules),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.NameFixPass(),
    )(model)


def _tidy(proto: onnx.ModelProto) -> None:
    """Small graph edits that make the examples easier for onnxopt and for people.

    * ``Reshape(x, [-1, K])`` with x of static shape [N, ...] where prod(...) == K
      becomes ``Flatten(axis=1)``: torch.flatten reaches the exporter already
      decomposed to a Reshape, and its hard-coded K would go stale the moment a
      pass prunes the channels feeding it.
    * Linear layers on 3-D inputs export as MatMul(x, transpose(W)) + bias, and
      constant folding names the folded weight ``val_<n>``; rename it after the
      layer (``<layer>.weight_t``, shape [in, out]) so reports stay readable.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    shapes: dict[str, list[int]] = {}
    inferred = onnx.shape_inference.infer_shapes(proto)
    for v in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]

    for node in proto.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = onnx.numpy_helper.to_array(inits[node.input[1]]).tolist()
        src = shapes.get(node.input[0], [])
        if len(target) == 2 and target[0] == -1 and len(src) >= 2 and min(src[1:]) > 0:
            if int(np.prod(src[1:])) == target[1]:
                flat = onnx.helper.make_node(
                    "Flatten", [node.input[0]], list(node.output), name=node.name, axis=1
                )
                node.CopyFrom(flat)

    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    renames: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        users = consumers[node.output[0]]
        if len(users) != 1 or users[0].op_type != "Add" or len(consumers[node.input[1]]) != 1:
            continue
        bias = next((i for i in users[0].input if i.endswith(".bias") and i in inits), None)
        if bias is not None:
            renames[node.input[1]] = bias[: -len(".bias")] + ".weight_t"
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]

    # Drop now-unused initializers (the Reshape shape constants).
    used = {i for n in proto.graph.node for i in n.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    model.eval()
    sample = torch.zeros(4, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(
        model,
        (sample,),
        dynamo=True,
        input_names=["x"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_shapes={"x": {0: batch}},
        custom_translation_table={
            torch.ops.aten.adaptive_avg_pool2d.default: _gap,
        },
        optimize=False,
    )
    assert program is not None
    _optimize(program.model)
    proto = ir.serde.serialize_model(program.model)
    _tidy(proto)
    # The exporter records source paths and stack traces on every node; they
    # make the committed files larger and machine-dependent without helping
    # anyone read the graph.
    for node in proto.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    proto.doc_string = ""
    del proto.metadata_props[:]
    proto.producer_name = "onnxopt-examples-digits"
    proto.producer_version = torch.__version__
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    reloaded = onnx.load(str(path))
    onnx.checker.check_model(reloaded, full_check=True)
    return reloaded


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        for n in proto.graph.node
    )
    return dict(sorted(counts.items()))


def describe_io(proto: onnx.ModelProto) -> dict[str, dict[str, object]]:
    def shape(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "inputs": {v.name: shape(v) for v in proto.graph.input},
        "outputs": {v.name: shape(v) for v in proto.graph.output},
    }


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"x": x})[0]


# --------------------------------------------------------------------------- main


def check_structure(name: str, hist: dict[str, int], proto: onnx.ModelProto) -> None:
    """Fail loudly if the export lost a pattern the examples exist to provide."""
    if name == "cnn":
        assert hist.get("BatchNormalization", 0) >= 8, hist
        assert hist.get("Add", 0) >= 2 and hist.get("Concat", 0) >= 1, hist
        groups = [
            a.i
            for n in proto.graph.node
            if n.op_type == "Conv"
            for a in n.attribute
            if a.name == "group"
        ]
        assert any(g > 1 for g in groups), "depthwise conv missing"
    if name == "transformer":
        assert hist.get("MatMul", 0) >= 2 * 8, hist
        fused = {"Attention", "MultiHeadAttention", "com.microsoft::Attention"}
        assert not fused & set(hist), hist


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)

    splits = make_splits()
    for split, (x, y) in splits.items():
        np.savez_compressed(HERE / f"{split}.npz", x=x, labels=y)
        print(f"{split}: x{list(x.shape)} {x.dtype}, labels{list(y.shape)} {y.dtype}")
    x_train, y_train = splits["train"]
    x_eval, y_eval = splits["eval"]

    recipes: dict[str, tuple[Callable[[], nn.Module], dict[str, object]]] = {
        "cnn": (DigitsCNN, dict(epochs=40, lr=3e-3, weight_decay=5e-4, augment=True)),
        "mlp": (DigitsMLP, dict(epochs=60, lr=2e-3, weight_decay=1e-4, augment=False)),
        "transformer": (
            DigitsTransformer,
            dict(epochs=80, lr=2e-3, weight_decay=1e-2, augment=True),
        ),
    }

    metrics: dict[str, object] = {
        "dataset": "sklearn.datasets.load_digits, pixels / 16.0, float32 [N,1,8,8]",
        "splits": {k: int(v[1].shape[0]) for k, v in splits.items()},
        "seed": SEED,
        "opset": OPSET,
        "versions": {
            "torch": torch.__version__,
            "onnxscript": onnxscript.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "models": {},
    }
    t_total = time.perf_counter()
    for name, (factory, kwargs) in recipes.items():
        # Re-seed per model so each result does not depend on training order.
        torch.manual_seed(SEED)
        model = factory()
        t0 = time.perf_counter()
        train(model, x_train, y_train, **kwargs)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0

        path = HERE / f"{name}.onnx"
        proto = export(model, path)
        hist = op_histogram(proto)
        check_structure(name, hist, proto)

        lt = torch_logits(model, x_eval)
        lo = ort_logits(path, x_eval)
        acc_torch = float((lt.argmax(1) == y_eval).mean())
        acc_ort = float((lo.argmax(1) == y_eval).mean())
        # Batch 1 as well as the full batch: proves the batch dim really is dynamic.
        lo1 = ort_logits(path, x_eval[:1])
        assert np.allclose(lo1, lo[:1], atol=1e-4)
        max_diff = float(np.abs(lt - lo).max())
        params = sum(p.numel() for p in model.parameters())
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

        print(
            f"{name}: eval acc torch={acc_torch:.4f} ort={acc_ort:.4f} "
            f"max|dlogit|={max_diff:.2e} params={params} train={seconds:.1f}s "
            f"size={path.stat().st_size} B opset={opset}"
        )
        print(f"  ops: {hist}")
        assert acc_torch == acc_ort, (acc_torch, acc_ort)
        metrics["models"][name] = {  # type: ignore[index]
            "file": path.name,
            "eval_accuracy_torch": round(acc_torch, 6),
            "eval_accuracy_ort": round(acc_ort, 6),
            "max_abs_logit_diff_torch_vs_ort": float(f"{max_diff:.3g}"),
            # Trainable torch parameters; the ONNX count also holds BN running stats.
            "parameters": params,
            "onnx_initializer_elements": int(
                sum(np.prod(i.dims, dtype=np.int64) for i in proto.graph.initializer)
            ),
            "file_bytes": path.stat().st_size,
            "opset": opset,
            "io": describe_io(proto),
            "num_nodes": len(proto.graph.node),
            "op_histogram": hist,
            "train_recipe": {k: v for k, v in kwargs.items()},
        }

    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"total {time.perf_counter() - t_total:.1f}s")


if __name__ == "__main__":
    main()
