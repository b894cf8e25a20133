"""Silero VAD, a real streaming audio model, through cluster, quant and fold (issue 16: every weight covered).

The models come from the silero-vad 6.2.3 wheel (MIT): ``benchmarks/fetch_silero.sh $ONNXOPT_REAL_MODELS`` puts
them in ``$ONNXOPT_REAL_MODELS/silero``. Fidelity is measured as the silero-vad wrapper runs the model: stateful,
chunk by chunk, on synthetic speech-like audio (tests/audio.py; no recorded speech offline), on seeds the
settings were not chosen on (benchmarks/silero.py chose on seeds 1-4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxopt.graph import iter_graphs
from onnxopt.io import load_model
from tests.audio import cosine, speech_like, stream
from tests.conftest import unavailable
from tests.helpers import run_cli

REAL = Path(os.environ.get("ONNXOPT_REAL_MODELS", "/nonexistent")) / "silero"
MAIN = REAL / "silero_vad.onnx"
SEEDS = (21, 22, 23, 24)
RATES = (16000, 8000)
#: validation needs these (the skip line says so): input [1, 64+512], state [2, 1, 128]; sr is fed 16000 and 8000
SHAPES = ("--shape", "input=1x576", "--shape", "state=2x1x128")


def _model(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        unavailable("real-models", f"no {path}: run benchmarks/fetch_silero.sh $ONNXOPT_REAL_MODELS")
    return path


def _probabilities(path: Path | str, sr: int, seeds: tuple[int, ...] = SEEDS) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([stream(lambda feed: session.run(None, feed), speech_like(8.0, sr, seed), sr, names)[0]
                           for seed in seeds])


def _apply(tmp_path: Path, model: Path, *args: str) -> tuple[Path, dict]:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli("apply", model, *args, "-o", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(report.read_text())


def _float_weights(path: Path, min_size: int = 256) -> int:
    """Float constants of ``min_size``+ elements that something reads, in every graph (shapes and indices are ints),
    less the biases of Conv and Gemm (input 2: added, never clustered; op18's LSTM-as-Gemm biases, 2 KB each)."""
    model = load_model(path)
    return sum(1 for g in iter_graphs(model) for v in g.initializers.values()
               if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point()
               and v.const_value.size >= min_size and list(v.uses())
               and not all(n.op_type in ("Conv", "Gemm") and i == 2 for n, i in v.uses()))


def test_cluster_covers_every_weight_at_under_016x_of_the_file(tmp_path: Path) -> None:
    model = _model("silero_vad.onnx")
    out, report = _apply(tmp_path, model, "--pass", "cluster", "--set", "cluster.granularity=channel",
                         "--set", "cluster.init=optimal", "--set", "cluster.codebook_dtype=int8", "--compact", *SHAPES)
    cluster = report["passes"][0]
    clustered = {item["tensor"].split("__Inline_0__")[-1] for item in cluster["items"]}
    # both rates' STFT basis, 4 encoder Convs and the LSTM's W, R and biases, which the LSTMs read through nested Ifs
    # and a gate-reordering Slice/Concat
    assert clustered == {"stft.forward_basis_buffer", *(f"encoder.{i}.reparam_conv.weight" for i in range(4)),
                         *(f"decoder.rnn.{w}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))}
    assert len(cluster["items"]) == 18
    assert [s["reason"] for s in cluster["skipped"]] == ["128 elements, under min_size 256"] * 2  # the 1x1 head, said
    assert report["validation"] is not None  # validation ran on the --shape the skip line names
    assert out.stat().st_size <= 0.16 * model.stat().st_size, out.stat().st_size
    # measured (16 kHz / 8 kHz): 0.970 / 0.986 on seeds 11-18, 0.960 / 0.959 on these: the 0.98 is not met
    for sr in RATES:
        assert cosine(_probabilities(model, sr), _probabilities(out, sr)) >= 0.94, sr


def test_cluster_with_float16_codebooks_is_closer_at_0174x(tmp_path: Path) -> None:
    """float16 codebooks: 0.174x of the file, over the issue's 0.16x; no k=16 setting tried meets both targets."""
    model = _model("silero_vad.onnx")
    out, _ = _apply(tmp_path, model, "--pass", "cluster", "--set", "cluster.granularity=channel",
                    "--set", "cluster.init=optimal", "--compact", "--no-validate")
    assert out.stat().st_size <= 0.18 * model.stat().st_size
    # measured: 0.981 / 0.990 on seeds 11-18, 0.987 / 0.971 on these
    for sr in RATES:
        assert cosine(_probabilities(model, sr), _probabilities(out, sr)) >= 0.96, sr


def test_dynamic_quant_stores_each_lstm_weight_once_and_lists_what_it_leaves(tmp_path: Path) -> None:
    model = _model("silero_vad.onnx")
    out, report = _apply(tmp_path, model, "--pass", "quant", "--set", "quant.mode=dynamic", *SHAPES)
    quant = report["passes"][0]
    # W and R of each rate's LSTM, each read by the LSTMs of both inner branches (folded once, not once per branch)
    assert len(quant["items"]) == 4 and all(len(item["node"].split(", ")) == 2 for item in quant["items"])
    assert sorted({s["reason"].split(":")[0] for s in quant["skipped"]}) == ["never dynamic for Conv"]
    assert len(quant["skipped"]) == 12
    assert out.stat().st_size < 0.7 * model.stat().st_size
    for sr in RATES:
        assert cosine(_probabilities(model, sr), _probabilities(out, sr)) >= 0.999, sr


def test_fold_is_exact_and_does_not_grow_the_file(tmp_path: Path) -> None:
    """Folding the gate reordering once per inner branch used to store each LSTM weight twice (2.3 MB -> 3.3 MB)."""
    model = _model("silero_vad.onnx")
    out, _ = _apply(tmp_path, model, "--pass", "fold", "--no-validate")
    assert out.stat().st_size <= model.stat().st_size
    for sr in RATES:
        np.testing.assert_array_equal(_probabilities(model, sr, SEEDS[:1]), _probabilities(out, sr, SEEDS[:1]))


@pytest.mark.parametrize("name", ["silero_vad_16k_op15.onnx", "silero_vad_half.onnx", "silero_vad_op18_ifless.onnx",
                                  "silero_vad_openvino_16k.onnx", "silero_vad_16k_sequence.onnx"])
def test_variants_cluster_every_weight_or_say_why(tmp_path: Path, name: str) -> None:
    model = _model(name)
    out, report = _apply(tmp_path, model, "--pass", "cluster", "--compact", "--no-validate")
    cluster = report["passes"][0]
    weights = _float_weights(model)
    assert len(cluster["items"]) + len(cluster["skipped"]) >= weights > 0, (cluster["items"], cluster["skipped"])
    # with --compact: the op18 export's per-node PyTorch metadata (a fifth of its file) goes too
    assert out.stat().st_size < 0.2 * model.stat().st_size
    out, report = _apply(tmp_path, model, "--pass", "quant", "--set", "quant.mode=dynamic", "--no-validate")
    assert report["passes"][0]["items"] or report["passes"][0]["skipped"]
