"""onnx's node-test corpus (about 1,900 single-op models with inputs and expected outputs) as a suite.

Each case is written to a folder (``model.onnx`` and ``test_data_set_0``, the
layout of onnx's own backend data), and every pass runs on it through the CLI
in a child process (``onnxopt apply --pass P --no-validate``), so that a crash,
an abort inside ONNX Runtime, or a hang costs one run, not the sweep. The
checks run in a child process of their own (:func:`check_folder`), which also
runs the original on ONNX Runtime once per case.

A run is ``ok``, ``refused`` or ``bad``:

- ``ok``: exit 0 and a checker-valid output that ONNX Runtime loads and runs
  wherever it ran the original. A lossless pass (fold) must also give the
  original's values on ORT and the case's expected values wherever ORT itself
  gives them (rtol 1e-4, atol 1e-5); a lossy pass must keep the outputs'
  count, shapes and dtypes.
- ``refused``: exit 2 with one ``error:`` line on stderr (warnings aside),
  and the refusal is not contradicted by what was measured (a pass may not
  claim ORT cannot load a model ORT ran).
- ``bad``: anything else.

The ``weights`` variant turns every tensor input but the first into an
initializer holding the case's input, so the lossy passes meet weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["NodeCase", "NodeRun", "node_cases", "with_weights", "write_case", "read_case_values", "node_pass_args",
           "check_folder", "run_case", "NONDETERMINISTIC_OPS", "NODE_RTOL", "NODE_ATOL"]

NODE_RTOL = 1e-4
NODE_ATOL = 1e-5
#: Ops whose outputs are random draws: only their count, shapes and dtypes can be compared.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                  "Bernoulli", "Multinomial", "Dropout"})
#: Seconds one CLI run may take before it counts as bad (a hang).
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class NodeCase:
    """One node test: a model, its inputs and expected outputs (arrays, lists for sequences, None for empty optionals)."""

    name: str
    model: onnx.ModelProto
    inputs: list[Any]
    outputs: list[Any]


@dataclass
class NodeRun:
    """One pass on one case: ``ok`` / ``refused`` / ``bad``, why, and how long the CLI run took."""

    case: str
    label: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    changed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def node_cases(every: int = 1, offset: int = 0, names: Iterable[str] | None = None) -> list[NodeCase]:
    """The node-test cases sorted by name; every ``every``-th from ``offset`` (a deterministic sample)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the case generators overflow casts on purpose
        warnings.simplefilter("ignore")
        cases = sorted((c for c in collect_testcases() if c.model is not None and c.data_sets), key=lambda c: c.name)
    wanted = set(names) if names is not None else None
    picked = [c for c in cases if wanted is None or c.name in wanted]
    if wanted is None:
        picked = picked[offset::every]
    return [NodeCase(c.name, c.model, list(c.data_sets[0][0]), list(c.data_sets[0][1])) for c in picked]


def with_weights(case: NodeCase) -> NodeCase | None:
    """The case with every tensor input but the first made an initializer; None when there is none to turn."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    keep, inputs, turned = [], [], 0
    for i, (value_info, value) in enumerate(zip(case.model.graph.input, case.inputs)):
        if i > 0 and value_info.type.HasField("tensor_type") and isinstance(value, np.ndarray) and value.dtype != object:
            graph.initializer.append(numpy_helper.from_array(value, value_info.name))
            turned += 1
        else:
            keep.append(value_info)
            inputs.append(value)
    if not turned:
        return None
    del graph.input[:]
    graph.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4  # initializers that are not graph inputs need IR 4
    return NodeCase(case.name + "[weights]", model, inputs, case.outputs)


def _value_proto(value: Any, type_proto: onnx.TypeProto, name: str) -> bytes:
    if type_proto.HasField("sequence_type"):
        return numpy_helper.from_list(value, name).SerializeToString()
    if type_proto.HasField("optional_type"):
        return numpy_helper.from_optional(value, name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), name).SerializeToString()


def write_case(case: NodeCase, folder: Path) -> Path:
    """``folder/model.onnx`` and ``folder/test_data_set_0/{input,output}_K.pb``; returns the model path."""
    data = folder / "test_data_set_0"
    data.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(case.model.SerializeToString())
    for kind, infos, values in (("input", case.model.graph.input, case.inputs), ("output", case.model.graph.output, case.outputs)):
        for j, (info, value) in enumerate(zip(infos, values)):
            (data / f"{kind}_{j}.pb").write_bytes(_value_proto(value, info.type, info.name))
    return path


def read_case_values(folder: Path, kind: str, infos: Sequence[onnx.ValueInfoProto]) -> list[Any]:
    """The ``kind`` (input/output) values of ``folder/test_data_set_0``, read by the model's declared types."""
    from onnxopt.data import read_value_proto, value_kind

    return [read_value_proto((folder / "test_data_set_0" / f"{kind}_{j}.pb").read_bytes(), value_kind(info.type))
            for j, info in enumerate(infos)]


def node_pass_args(pass_name: str, model_path: Path) -> list[str]:
    """Extra CLI arguments of ``pass_name`` on a case: the case's inputs as data, a teacher for distill."""
    from onnxopt.corpus import corpus_settings

    args = ["--data", str(model_path.parent)]
    for key, value in corpus_settings(pass_name, model_path).items():
        args += ["--set", f"{pass_name}.{key}={value}"]
    return args


def _ort_run(model: str | bytes, feed: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def _stderr_problem(stderr: str) -> str | None:
    """None when stderr is one ``error:`` line (plus ``warning:`` lines), else what is wrong with it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    stray = [line for line in lines if not line.startswith(("error:", "warning:"))]
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    if stray:
        return f"stray stderr lines before the refusal: {stray[0][:120]!r}"
    return None


#: Refusals that say ONNX Runtime cannot load or run the model: false when ORT ran the original.
_ORT_CLAIMS = ("ONNX Runtime cannot load", "onnxruntime cannot load", "ONNX Runtime cannot run")


def _changed(report_path: Path) -> bool:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    return any(p.get("modified") for p in report.get("passes", []))


def check_folder(folder: Path, labels: Sequence[str], timeout: float = RUN_TIMEOUT) -> list[NodeRun]:
    """Every pass in ``labels`` on the case in ``folder``, each through the CLI in a child process."""
    model_path = folder / "model.onnx"
    original = onnx.load(str(model_path))
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    inputs = read_case_values(folder, "input", original.graph.input[: _feed_count(original)])
    expected = read_case_values(folder, "output", original.graph.output)
    feed = {info.name: value for info, value in zip(original.graph.input, inputs)}
    random_ops = any(n.op_type in NONDETERMINISTIC_OPS for n in _all_nodes(original.graph))
    try:
        reference: list[Any] | None = _ort_run(str(model_path), feed)
        ort_note = ""
    except Exception as err:  # ORT does not run every op of every opset: those cases check validity only
        reference, ort_note = None, _one_line(err)
    ort_matches_expected = reference is not None and _equal(expected, reference) is None
    case_name = folder.name
    runs = []
    for label in labels:
        out = folder / f"out-{label}.onnx"
        report = folder / f"report-{label}.json"
        cmd = [sys.executable, "-m", "onnxopt", "apply", str(model_path), "--pass", label, "--no-validate", "-q",
               "-o", str(out), "--report", str(report), *node_pass_args(label, model_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired:
            runs.append(NodeRun(case_name, label, "bad", f"timed out after {timeout:.0f} s", timeout))
            continue
        seconds = time.perf_counter() - start

        def verdict(status: str, detail: str = "", changed: bool = False) -> NodeRun:
            return NodeRun(case_name, label, status, " ".join(detail.split())[:300], round(seconds, 2), changed)

        if hashlib.sha256(model_path.read_bytes()).hexdigest() != digest:
            runs.append(verdict("bad", "the input model file changed"))
            model_path.write_bytes(original.SerializeToString())
            continue
        if proc.returncode == 2:
            problem = _stderr_problem(proc.stderr)
            message = next((line for line in proc.stderr.splitlines() if line.startswith("error:")), "")
            if problem:
                runs.append(verdict("bad", f"rc 2 but {problem}: {proc.stderr.strip()[:200]}"))
            elif reference is not None and any(claim.lower() in message.lower() for claim in _ORT_CLAIMS):
                runs.append(verdict("bad", f"false refusal (ORT runs the original): {message}"))
            else:
                runs.append(verdict("refused", message[len("error:"):].strip()))
            continue
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [""]
            runs.append(verdict("bad", f"rc {proc.returncode}: {tail[0]}"))
            continue
        changed = _changed(report)
        try:
            onnx.checker.check_model(str(out))
        except Exception as err:
            runs.append(verdict("bad", f"output fails the checker: {_one_line(err)}", changed))
            continue
        if reference is None:
            runs.append(verdict("ok", f"valid (ORT does not run the original: {ort_note[:120]})", changed))
            continue
        try:
            got = _ort_run(str(out), _candidate_feed(out, feed, reference))
        except Exception as err:
            runs.append(verdict("bad", f"ORT cannot run the output: {_one_line(err)}", changed))
            continue
        runs.append(verdict(*_compare(label, expected, reference, got, random_ops, ort_matches_expected), changed))
    return runs


def _compare(label: str, expected: list[Any], reference: list[Any], got: list[Any], random_ops: bool,
             ort_matches_expected: bool) -> tuple[str, str]:
    from onnxopt.corpus import _same_interface
    from onnxopt.plugins import load_registry

    pass_cls = load_registry().passes[label]
    if not pass_cls.comparable:
        return "ok", "runs on ORT"
    if pass_cls.lossless and not random_ops:
        problem = _equal(reference, got)
        if problem:
            return "bad", f"differs from ORT on the original: {problem}"
        if ort_matches_expected and (problem := _equal(expected, got)):
            return "bad", f"differs from the expected outputs: {problem}"
        return "ok", "equal to ORT on the original" + (" and to the expected outputs" if ort_matches_expected else "")
    problem = _same_interface(reference, got)
    return ("bad", f"interface changed: {problem}") if problem else ("ok", "runs, same interface")


#: 16-bit float outputs are compared to one unit in the last place: ORT itself gives results that far apart for the
#: same fp16 graph with and without its graph optimizations (onnx's attention *_fp16_expanded tests).
_HALF_TOLERANCE = {np.dtype(np.float16): 2.0**-10}


def _equal(expected: list[Any], got: list[Any]) -> str | None:
    """None when the outputs are equal within rtol 1e-4 / atol 1e-5 (16-bit floats: one ulp), else what differs."""
    from onnxopt.corpus import outputs_match

    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, got)):
        half = _HALF_TOLERANCE.get(getattr(a, "dtype", None)) if isinstance(a, np.ndarray) else None
        problem = outputs_match([a], [b], half or NODE_RTOL, half or NODE_ATOL)
        if problem:
            return problem.replace("output 0", f"output {i}", 1)
    return None


def _candidate_feed(out: Path, feed: dict[str, Any], reference: list[Any]) -> dict[str, Any]:
    """The original's feed for the output, plus inputs a pass added (distill's labels)."""
    model = onnx.load(str(out), load_external_data=False)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if all(n in feed for n in names):
        return {n: feed[n] for n in names}
    from onnxopt.corpus import candidate_feed
    from onnxopt.io import load_model

    return candidate_feed({k: v for k, v in feed.items() if isinstance(v, np.ndarray)}, load_model(out), reference)


def _feed_count(model: onnx.ModelProto) -> int:
    initialized = {t.name for t in model.graph.initializer}
    return sum(1 for i in model.graph.input if i.name not in initialized)


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def run_case(case: NodeCase, labels: Sequence[str], workdir: Path, timeout: float = RUN_TIMEOUT) -> list[NodeRun]:
    """Write ``case`` under ``workdir`` and check it in a child process (which spawns one CLI run per pass)."""
    folder = workdir / case.name
    write_case(case, folder)
    budget = timeout * len(labels) + 60
    cmd = [sys.executable, "-m", "onnxopt.node_corpus", str(folder), ",".join(labels), str(timeout)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return [NodeRun(case.name, label, "bad", "checker process timed out", budget) for label in labels]
    try:
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        return [NodeRun(**row) for row in rows]
    except (ValueError, IndexError, TypeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [NodeRun(case.name, label, "bad", f"checker process died (rc {proc.returncode}): {tail[:200]}",
                        time.perf_counter() - start) for label in labels]


def _main(argv: Sequence[str]) -> None:
    folder, labels, timeout = Path(argv[0]), [s for s in argv[1].split(",") if s], float(argv[2])
    runs = check_folder(folder, labels, timeout)
    for run in runs:
        run.case = folder.name
    print(json.dumps([r.to_dict() for r in runs]))


if __name__ == "__main__":
    _main(sys.argv[1:])
