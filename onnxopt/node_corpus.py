"""onnx's node-test corpus (about 1,900 single-op models with inputs and expected outputs) as a suite.

Each case is written to a folder (``model.onnx`` and ``test_data_set_0``, the
layout of onnx's own backend data), and every pass runs on it through the CLI
in a child process (``onnxopt apply --pass P --no-validate``), so that a crash,
an abort inside ONNX Runtime, or a hang costs one run, not the sweep. The
child is forked from a warmed-up process that has imported onnxopt, its passes
and ONNX Runtime but never created an ORT session (onnxopt.forked): a run then
costs its own work, not 2-5 s of imports. ONNX Runtime's runs of the original
and of each output happen in forked children as well.

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
import importlib
import json
import os
import pkgutil
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["NodeCase", "NodeRun", "node_cases", "with_weights", "write_case", "read_case_values", "node_pass_args",
           "split_label", "pushed_labels",
           "check_folder", "run_case", "run_cases", "warm_up", "NONDETERMINISTIC_OPS", "NODE_RTOL", "NODE_ATOL"]

NODE_RTOL = 1e-4
NODE_ATOL = 1e-5
#: Ops whose outputs are random draws: only their count, shapes and dtypes can be compared.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                  "Bernoulli", "Multinomial", "Dropout"})
#: Ops whose output shapes follow their float inputs' values (box overlaps, float ranges, scales): a lossy pass
#: that rounds those inputs may change these dims, so there only the outputs' count, dtypes and ranks must hold.
VALUE_SHAPED_OPS = frozenset({"NonMaxSuppression", "NonZero", "Unique", "Range", "Resize", "Upsample"})
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


def split_label(label: str) -> tuple[str, dict[str, str]]:
    """A run label (onnxopt.corpus.corpus_runs' labels) as its pass and settings:
    e.g. ``"cluster[min_size=16,k=4]"`` -> ``("cluster", {"min_size": "16", "k": "4"})``."""
    name, _, rest = label.partition("[")
    return name, dict(item.split("=", 1) for item in rest.rstrip("]").split(",") if item)


def pushed_labels(passes: Iterable[str]) -> list[str]:
    """The labels of the variants each pass declares to push it past its defaults (``corpus_variants``)."""
    from onnxopt.corpus import corpus_runs

    return [label for name in passes for label, settings in corpus_runs(name) if settings]


def node_pass_args(label: str, model_path: Path) -> list[str]:
    """Extra CLI arguments of the run ``label`` (a pass, or ``pass[key=value,...]``) on a case: the case's
    inputs as data, a teacher for distill, the label's settings."""
    from onnxopt.corpus import corpus_settings

    pass_name, settings = split_label(label)
    args = ["--data", str(model_path.parent)]
    for key, value in {**corpus_settings(pass_name, model_path), **settings}.items():
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


def warm_up() -> None:
    """Import everything a run needs, so that each forked run starts warm (no ORT session is created here)."""
    import onnx_graphsurgeon  # noqa: F401
    import onnx_ir  # noqa: F401
    import onnxruntime  # noqa: F401

    import onnxopt.api  # noqa: F401
    import onnxopt.cli  # noqa: F401
    import onnxopt.corpus  # noqa: F401
    from onnxopt.plugins import load_registry

    for pass_cls in load_registry().passes.values():  # a pass package's modules, imported lazily by its run
        package = sys.modules[pass_cls.__module__]
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
            importlib.import_module(info.name)


def check_folder(folder: Path, labels: Sequence[str], timeout: float = RUN_TIMEOUT) -> list[NodeRun]:
    """Every pass in ``labels`` on the case in ``folder``, each through the CLI in a forked child process.

    ONNX Runtime runs (the original, each output) happen in forked children too, so this process holds no ORT
    session or thread pool when it forks (see onnxopt.forked): call it from a process that never ran ORT.
    """
    from onnxopt.forked import call_forked, exit_description

    model_path = folder / "model.onnx"
    original = onnx.load(str(model_path))
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    inputs = read_case_values(folder, "input", original.graph.input[: _feed_count(original)])
    expected = read_case_values(folder, "output", original.graph.output)
    feed = {info.name: value for info, value in zip(original.graph.input, inputs)}
    op_types = {n.op_type for n in _all_nodes(original.graph)}
    random_ops = bool(op_types & NONDETERMINISTIC_OPS)
    value_shaped = sorted(op_types & VALUE_SHAPED_OPS)
    # ORT does not run every op of every opset: those cases check validity only
    first = call_forked(_ort_run, str(model_path), feed, timeout=timeout)
    reference: list[Any] | None = first.value if first.ok else None
    ort_note = first.error or (f"ONNX Runtime's child process died: {first.died}" if first.died else "")
    ort_matches_expected = reference is not None and _equal(expected, reference) is None
    case_name = folder.name
    runs = []
    for i, label in enumerate(labels):
        out = folder / f"out-{i}.onnx"
        report = folder / f"report-{i}.json"
        argv = ["apply", str(model_path), "--pass", split_label(label)[0], "--no-validate", "-q",
                "-o", str(out), "--report", str(report), *node_pass_args(label, model_path)]
        stderr_path, code_path = folder / f"stderr-{i}.txt", folder / f"rc-{i}.txt"
        # one child runs the CLI and then checks its output (a fork less per run than two children)
        child = call_forked(_run_and_check, argv, folder / f"stdout-{i}.txt", stderr_path, code_path,
                            (label, out, feed, expected, reference, ort_note, random_ops, ort_matches_expected, value_shaped),
                            timeout=timeout)
        code, seconds, check = child.value if child.ok else (None, child.seconds, None)
        cli_died = child.died is not None and not code_path.exists()

        def verdict(status: str, detail: str = "", changed: bool = False) -> NodeRun:
            return NodeRun(case_name, label, status, " ".join(detail.split())[:300], round(seconds, 3), changed)

        if child.died is not None and child.died.startswith("timed out"):
            runs.append(verdict("bad", child.died))
            continue
        if cli_died:
            tail = stderr_path.read_text(errors="replace").strip().splitlines()[-1:] if stderr_path.exists() else []
            runs.append(verdict("bad", f"killed by {child.died}: {(tail or [''])[0]}"))
            continue
        if code is None:
            code = int(code_path.read_text())
        stderr = stderr_path.read_text(errors="replace")
        if hashlib.sha256(model_path.read_bytes()).hexdigest() != digest:
            runs.append(verdict("bad", "the input model file changed"))
            model_path.write_bytes(original.SerializeToString())
            continue
        if code == 2:
            problem = _stderr_problem(stderr)
            message = next((line for line in stderr.splitlines() if line.startswith("error:")), "")
            if problem:
                runs.append(verdict("bad", f"rc 2 but {problem}: {stderr.strip()[:200]}"))
            elif reference is not None and any(claim.lower() in message.lower() for claim in _ORT_CLAIMS):
                runs.append(verdict("bad", f"false refusal (ORT runs the original): {message}"))
            elif "this is a bug" in message:  # onnxopt's own words for a pass that produced an invalid model
                runs.append(verdict("bad", f"the refusal reports a bug: {message}"))
            else:
                runs.append(verdict("refused", message[len("error:"):].strip()))
            continue
        if code != 0:
            tail = stderr.strip().splitlines()[-1:] or [""]
            how = f"killed by {exit_description(code)}" if code < 0 else f"rc {code}"
            runs.append(verdict("bad", f"{how}: {tail[0]}"))
            continue
        changed = _changed(report)
        if check is None:
            runs.append(verdict("bad", f"checking the output crashed: {child.error or child.died}", changed))
        else:
            runs.append(verdict(*check, changed))
    return runs


def _run_and_check(argv: list[str], stdout: Path, stderr: Path, code_path: Path,
                   check: tuple[Any, ...]) -> tuple[int, float, tuple[str, str] | None]:
    """In a forked child: the CLI run, then (exit code 0) the checks of its output by :func:`_check_output`."""
    from onnxopt.cli import cli
    from onnxopt.forked import run_cli

    start = time.perf_counter()
    code = run_cli(argv, stdout, stderr, cli)
    seconds = time.perf_counter() - start
    code_path.write_text(str(code))  # the CLI came back: a crash from here on is the check's
    return code, seconds, _check_output(*check) if code == 0 else None


def _check_output(label: str, out: Path, feed: dict[str, Any], expected: list[Any], reference: list[Any] | None,
                  ort_note: str, random_ops: bool, ort_matches_expected: bool,
                  value_shaped: Sequence[str] = ()) -> tuple[str, str]:
    """The verdict on a pass's output (exit code 0): checker, ORT, and the comparison (run in a forked child)."""
    try:
        onnx.checker.check_model(str(out))
    except Exception as err:
        return "bad", f"output fails the checker: {_one_line(err)}"
    if reference is None:
        return "ok", f"valid (ORT does not run the original: {ort_note[:120]})"
    try:
        got = _ort_run(str(out), _candidate_feed(out, feed, reference))
    except Exception as err:
        return "bad", f"ORT cannot run the output: {_one_line(err)}"
    return _compare(label, expected, reference, got, random_ops, ort_matches_expected, value_shaped)


def _compare(label: str, expected: list[Any], reference: list[Any], got: list[Any], random_ops: bool,
             ort_matches_expected: bool, value_shaped: Sequence[str] = ()) -> tuple[str, str]:
    from onnxopt.corpus import _same_interface
    from onnxopt.plugins import load_registry

    pass_cls = load_registry().passes[split_label(label)[0]]
    if not pass_cls.comparable:
        return "ok", "runs on ORT"
    if pass_cls.lossless and not random_ops:
        problem = _equal(reference, got)
        if problem:
            return "bad", f"differs from ORT on the original: {problem}"
        if ort_matches_expected and (problem := _equal(expected, got)):
            return "bad", f"differs from the expected outputs: {problem}"
        return "ok", "equal to ORT on the original" + (" and to the expected outputs" if ort_matches_expected else "")
    if value_shaped:  # dims that follow values may move with them: count, dtypes and ranks
        flat = [np.zeros((0,) * np.ndim(v), np.asarray(v).dtype) if isinstance(v, np.ndarray) else v for v in reference]
        problem = _same_interface(flat, [np.zeros((0,) * np.ndim(v), np.asarray(v).dtype)
                                         if isinstance(v, np.ndarray) else v for v in got])
        detail = f"runs, same outputs but for the dims {'/'.join(value_shaped)} takes from values"
    else:
        problem = _same_interface(reference, got)
        detail = "runs, same interface"
    return ("bad", f"interface changed: {problem}") if problem else ("ok", detail)


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
    """Write ``case`` under ``workdir`` and check it (:func:`check_folder`: every run in a forked child)."""
    folder = workdir / case.name
    write_case(case, folder)
    try:
        return check_folder(folder, labels, timeout)
    except Exception as err:  # a bug of the checker itself: every run of the case counts as bad
        return [NodeRun(case.name, label, "bad", f"the checker failed: {_one_line(err)}") for label in labels]


def _pool_case(job: tuple[int, NodeCase, list[str], str, float, bool]) -> list[NodeRun]:
    index, case, labels, workdir, timeout, keep = job
    folder = Path(workdir) / str(index)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return run_case(case, labels, folder, timeout)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


#: Thread pools the forkserver's processes need not start (their threads would only be dropped by each fork).
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cases(cases: Sequence[NodeCase], labels: Sequence[str] | Callable[[NodeCase], Sequence[str]],
              workdir: Path, jobs: int = 1, timeout: float = RUN_TIMEOUT, keep: bool = False) -> Iterator[list[NodeRun]]:
    """:func:`run_case` on each case (``labels``: the runs, or a function giving each case its runs), ``jobs``
    cases at a time, yielding each case's runs as it finishes (not in order). The K-th case is checked in
    ``workdir/K/NAME``, removed afterwards unless ``keep`` (``out-J.onnx``: the output of its J-th label).

    The workers come from multiprocessing's forkserver: a fresh interpreter, never this process (which may
    hold ORT sessions, e.g. under a test runner), that imports onnxopt once (:func:`warm_up`); each run is
    then a child forked from a worker, which holds no ORT session.
    """
    import multiprocessing

    per_case = [list(labels(case)) if callable(labels) else list(labels) for case in cases]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["onnxopt.node_corpus"])
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update({k: v for k, v in _ONE_THREAD.items() if saved[k] is None})
    try:
        pool = context.Pool(max(jobs, 1), initializer=warm_up)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
    with pool:
        jobs_ = ((i, case, case_labels, str(workdir), timeout, keep) for i, (case, case_labels) in enumerate(zip(cases, per_case)))
        yield from pool.imap_unordered(_pool_case, jobs_)
