"""The Python API: the same operations as the CLI, which is a thin layer over these functions."""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.activations import bounded_batches, held_bytes
from onnxopt.data import Dataset, compared_values, input_specs, load_dataset, shape_hint, synthetic_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.graph import training_mode_nodes
from onnxopt.io import (LOAD_NOTES, PROTOBUF_LIMIT, StagedModel, check_model_output, external_data_files, has_external_data,
                        load_model, refuse_overwriting, stage_model,
                        same_file, save_model, serialize_model, tensor_bytes)
from onnxopt.manager import plan_passes, run_chain
from onnxopt.pass_api import PassContext, PassReport
from onnxopt.plugins import Registry, load_registry
from onnxopt.progress import Progress
from onnxopt.report import RunReport, format_bytes, report_paths, write_report
from onnxopt.sessions import SessionFactory, resolve_providers
from onnxopt.split import split_dataset
from onnxopt.timing import LatencyComparison, TimingConfig
from onnxopt.validate import (PROBE_MAX_BYTES, ValidationResult, latency_feed, measure_drop, one_session_at_a_time,
                              probe_model, validate)

__all__ = ["apply", "validate_models", "load_data", "GATE_EXIT_CODE"]

#: Exit code of `onnxopt apply` when the result is over --max-drop.
GATE_EXIT_CODE = 3


def load_data(
    model: ir.Model,
    path: str | os.PathLike[str] | None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    synthetic_ok: bool = False,
    batch_size: int | None = None,
    seed: int = 0,
) -> Dataset | None:
    """Data from ``path`` matched to the model, or synthetic data from ``shapes`` (fidelity only).

    For a large model (external data, or weights over a quarter GB), batches
    shrink unless ``batch_size`` is given, so that one batch's activations
    stay within :data:`onnxopt.activations.ACTIVATION_BUDGET`.
    """
    specs = input_specs(model)
    dataset = None
    if path is not None:
        dataset = load_dataset(path, specs, batch_size=batch_size)
    elif shapes or synthetic_ok:
        try:
            dataset = synthetic_dataset(specs, shapes, seed=seed, values=compared_values(model))
        except OnnxoptError:
            if shapes:
                raise
    if dataset is not None and batch_size is None and one_session_at_a_time(model):
        dataset = bounded_batches(model, dataset)
    return dataset


def _candidate_size(model: ir.Model) -> int | None:
    # serialising reads every weight into memory: for a model with external data, the written file is measured instead
    if has_external_data(model) or tensor_bytes(model) >= PROTOBUF_LIMIT:
        return None
    return len(serialize_model(model))


#: Without --max-drop, a lossy pass whose measured drop is over this (5 pt) gets a warning nobody can miss.
LOUD_DROP = 0.05


def _check_metrics(metrics: Mapping[str, str] | None, registry: Registry) -> dict[str, str]:
    """``--metric`` values known to onnxopt (built-in drop metrics or registered ones), or a one-line error."""
    from onnxopt.metrics import DROP_METRICS

    out = {}
    for output, metric in (metrics or {}).items():
        if metric not in DROP_METRICS and metric not in registry.metrics:
            raise OnnxoptError(f"--metric {output}={metric}: unknown metric",
                               f"use one of {', '.join(DROP_METRICS)}" + (f" or a registered one ({', '.join(registry.metrics)})"
                                                                          if registry.metrics else ""))
        out[str(output)] = str(metric)
    return out


def _loud_warning(drop: float, basis: str, lossy: list[str], command: str | None, src: Path, names: Sequence[str],
                  data: str | os.PathLike[str] | None, eval_data: str | os.PathLike[str] | None,
                  output: str | os.PathLike[str] | None) -> str:
    """The warning of a lossy run without a budget that lost more than :data:`LOUD_DROP`, with the command that holds one."""
    import shlex

    if command:
        fixed = command + " --max-drop 0.01"
    else:
        parts = ["onnxopt", "apply", str(src), "--pass", ",".join(names)]
        parts += ["--data", str(data)] if data is not None else []
        parts += ["--eval", str(eval_data)] if eval_data is not None else []
        parts += ["--max-drop", "0.01"] + (["-o", str(output)] if output is not None else [])
        fixed = shlex.join(parts)
    needs = "" if data is not None and eval_data is not None else \
        " (give --data calib.npz and --eval eval.npz too: the passes choose their strength on them)"
    return (f"{', '.join(lossy)} lost {drop * 100:.1f} pt ({basis}) and no budget was given. "
            f"To let each pass choose the most compression within 1 pt, run: {fixed}{needs}")


def _slower_warning(latency: LatencyComparison | None, passes: Sequence[PassReport]) -> str | None:
    """The warning for an output validation timed slower than the input beyond noise (any pass: dynamic int8 on an
    LSTM whose weights ORT does not fold, a packed decode run every call), unless a pass already said so first."""
    if latency is None or latency.verdict != "slower" or any(w for p in passes for w in p.warnings if "SLOWER" in w):
        return None
    return (f"the output is SLOWER than the input on this machine: {latency.text()} by validation's timing; the passes "
            "made it smaller, not faster (see the pass notes), so time it where it will run before shipping it")


#: Weights ORT folds at load (a packed decode) below this many bytes are not worth a warning: the process costs more.
FOLD_WARNING_BYTES = 2**26


def _load_memory_warning(reference: ir.Model, candidate: ir.Model) -> str | None:
    """The warning for an output that a default ORT session holds more of at load than it holds of the input.

    ORT's constant folding turns an in-graph decode of packed weights (cluster's packed indices) back into float
    weights when it creates a session, with every intermediate of the decode alive at once: the file shrinks,
    the memory in deployment grows (benchmarks/load_memory.py measures it on the 3 GiB benchmark model).
    Estimated from the graph (the bytes of the folded values whose shapes are known: the decoded weights, not
    always the decode's intermediates, so a lower bound), so it costs no session.
    """
    stored, folded = held_bytes(candidate)
    original = sum(held_bytes(reference))
    if folded < FOLD_WARNING_BYTES or stored + folded <= original:
        return None
    return (f"a default ONNX Runtime session on the output holds more memory than one on the input: ORT decodes its "
            f"packed weights back to floats when it loads it (at least {format_bytes(stored + folded)} held, estimated "
            f"from the graph, against {format_bytes(original)} of weights for the input; while loading, the decode's "
            "intermediates add more: 2.9x the input's weights at the peak on the 3 GiB benchmark model). The file is "
            "smaller, deployment memory is not: load it with constant folding off (onnxruntime.InferenceSession(path, "
            "disabled_optimizers=['ConstantFolding']), which decodes at every run instead: 0.22x there), or keep "
            "float weights (cluster.mode=dense)")


def apply(
    model: str | os.PathLike[str],
    passes: Sequence[str] | str,
    output: str | os.PathLike[str] | None = None,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    data: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_drop: float | None = None,
    force: bool = False,
    report: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 1,
    external_data: bool | None = None,
    compact: bool = False,
    seed: int = 0,
    validate_result: bool = True,
    progress: Progress | None = None,
    registry: Registry | None = None,
    metrics: Mapping[str, str] | None = None,
    holdout: str | os.PathLike[str] | None = None,
    command: str | None = None,
    rollback: bool = True,
    timing: TimingConfig | None = None,
    probe: bool | None = None,
) -> RunReport:
    """Load ``model``, run ``passes``, validate against the original on ORT, and save to ``output``.

    ``settings`` is ``{pass: {key: value}}`` (the same keys as ``--set``).
    Nothing is written when a pass fails, or when the measured drop is over
    ``max_drop`` (unless ``force``); the input file is never modified.

    ``eval_data`` is split by ``seed`` into a selection part (what passes
    choose on) and a confirmation part (what the gate and the report are
    measured on), unless ``holdout`` gives the confirmation set.
    ``metrics`` declares the drop metric per output (``{output: "top1" |
    "cosine" | "snr" | "match" | "none" | a registered metric}``).
    ``command`` is the command line as typed, for the warning that shows how
    to hold a budget. Under ``max_drop`` a pass that leaves the chain over it
    (on the selection part) is rolled back unless ``rollback`` is False (then
    the chain runs as asked and the gate alone decides). ``compact`` writes short internal names and no
    intermediate shape annotations (lossless; see :func:`onnxopt.io.compact_proto`). ``probe`` loads and runs
    the model on ORT once in a child process before anything else touches ORT
    (:func:`onnxopt.validate.probe_model`), so that an ORT crash on a malformed model is an error, not a dead
    process; None: for models with up to PROBE_MAX_BYTES of weights, when validating.
    """
    src = Path(model)
    reports = report_paths(report)
    writes = [("output", output), *(("report", r) for r in reports),
              ("output data file", None if output is None else Path(output).with_name(Path(output).name + ".data"))]
    refuse_overwriting([("the input model", src), ("the --data file", data), ("the --eval file", eval_data),
                        ("the --holdout file", holdout)], writes)
    if holdout is not None and eval_data is None:
        raise OnnxoptError("--holdout confirms what was chosen on --eval, but no --eval was given",
                           "give --eval eval.npz too (or leave out --holdout)")
    registry = registry or load_registry()
    declared = _check_metrics(metrics, registry)
    for r in reports:
        if output is not None and same_file(output, r):
            raise OnnxoptError(f"--report {r} is the output model's path", "write the report to a .json file of its own")
    check_model_output(output, "-o")
    for flag, target in (("-o", output), *(("--report", r) for r in reports)):
        # fail before the work, not after it: a run can take minutes
        if target is not None and not Path(target).resolve().parent.is_dir():
            raise OnnxoptError(f"{flag} {target}: folder {Path(target).parent} does not exist", "create it first or choose another path")
    names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else list(passes)
    plan = plan_passes(registry, names, settings)
    progress = progress or Progress(enabled=False)
    sessions = SessionFactory(providers=resolve_providers(providers), threads=threads)
    reference = load_model(src)
    training = training_mode_nodes(reference)
    if training:
        warnings.warn(f"{len(training)} node(s) run in training mode ({', '.join(training[:3])}"
                      f"{', ...' if len(training) > 3 else ''}): their outputs depend on the batch or on random draws, "
                      "so passes and validation compare noise; export the model in inference mode")
    refuse_overwriting([("a data file of the input model", f) for f in external_data_files(reference)], writes)
    calibration = load_data(reference, data, seed=seed)
    evaluation = load_data(reference, eval_data, shapes, seed=seed)
    split = None
    if evaluation is not None and not evaluation.fidelity_only:
        split = split_dataset(evaluation, seed, holdout=load_data(reference, holdout, seed=seed) if holdout else None)
    selection = split.selection if split is not None else evaluation
    confirmation = split.confirmation if split is not None else evaluation
    registered = dict(registry.metrics)
    ctx = PassContext(sessions=sessions, progress=progress, rng=np.random.default_rng(seed), calibration=calibration,
                      evaluation=selection, base_dir=src.parent, max_drop=max_drop, seed=seed,
                      confirmation=confirmation, metrics=declared, registered_metrics=registered)
    run = RunReport(input=str(src), output=str(output) if output is not None else None,
                    load_notes=list(reference.meta.get(LOAD_NOTES, [])), max_drop=max_drop)
    if training:
        run.notes.append(f"training-mode nodes: {', '.join(training)} (outputs vary per batch or run)")
    if split is not None:
        run.split = split.to_dict()
        if not split.disjoint:
            run.notes.append(f"selection and confirmation are the same samples ({split.how}): figures are optimistic")
    comparable = all(p.pass_.comparable for p in plan)
    # --no-validate builds no data: synthetic inputs are for the check alone
    check_data = None if not validate_result else (
        confirmation or calibration or (load_data(reference, None, synthetic_ok=True, seed=seed) if comparable else None))
    if check_data is not None and (probe if probe is not None else tensor_bytes(reference) <= PROBE_MAX_BYTES):
        probe_model(reference, latency_feed(check_data, reference), sessions)  # before this process creates sessions
    chain = run_chain(reference, plan, ctx, registry, ledger=validate_result and comparable and split is not None,
                      timed=len(plan) > 1, rollback=rollback)
    candidate, run.passes, run.ledger = chain.model, chain.reports, chain.ledger
    unfolded = _load_memory_warning(reference, candidate)
    if unfolded:
        run.warnings.append(unfolded)
    lossy_asked = [p.name for p in plan if not p.pass_.lossless]
    if chain.rollbacks and lossy_asked and len(chain.rollbacks) >= len(lossy_asked):
        run.warnings.append(f"nothing was compressed within --max-drop {max_drop}: every lossy pass "
                            f"({', '.join(lossy_asked)}) was rolled back (see the ledger); the output equals the input "
                            "up to lossless passes")
    validating = False
    if not validate_result:
        run.validation_note = "skipped (asked)"
    elif not comparable:
        run.validation_note = "skipped: the chain changes the model's interface (" + ", ".join(p.name for p in plan if not p.pass_.comparable) + ")"
    elif check_data is None:
        run.validation_note = ("skipped: no data and the inputs have free dims: give --eval data.npz (or an ONNX "
                               f"test-data folder), or {shape_hint(input_specs(reference))}")
    else:
        validating = True
    # weights that came external stay external, even if a pass read them into memory
    keep_external = external_data if external_data is not None else (has_external_data(reference) or None)
    staged: StagedModel | None = None
    try:
        if validating:
            if evaluation is None and calibration is not None:
                run.notes.append("validated on the calibration data (--data); give --eval for an unbiased figure")
            candidate_path = None
            if output is not None and one_session_at_a_time(reference, candidate):
                # A large candidate is written first (beside -o, not yet in place) and let go: validation then reads
                # it back memory-mapped, so the passes' arrays and an ORT session never hold weights at once.
                staged = stage_model(candidate, output, external_data=keep_external, compact=compact)
                del candidate
                gc.collect()
                candidate = load_model(staged.path, check=False, normalize=False)
                candidate_path = staged.path
            run.validation = validate(reference, candidate, check_data, sessions=sessions,
                                      metrics=list(registry.metrics.values()), progress=progress, reference_path=src,
                                      candidate_path=candidate_path, timing=timing or TimingConfig(threads=threads),
                                      declared=declared)
            if candidate_path is None:
                run.validation.candidate.size_bytes = _candidate_size(candidate)
            if split is not None and selection is not None:
                kept = [row for row in chain.ledger if row["action"] != "rolled back"]
                run.drop_selection = (kept[-1]["drop_selection"] if kept else
                                      measure_drop(reference, candidate, selection, sessions, declared=declared,
                                                   registered=registered))
            lossy = [p.pass_name for p, planned in zip(run.passes, plan) if p.modified and not planned.pass_.lossless]
            if max_drop is None and lossy and run.validation.drop > LOUD_DROP:
                hand_set = [f"{p.name}.{k}" for p in plan for k in sorted(p.explicit & set(p.pass_.budget_keys))]
                run.warnings.append(_loud_warning(run.validation.drop, run.validation.drop_basis, lossy, command, src,
                                                  names, data, eval_data, output)
                                    + (f" (leave out --set {', '.join(hand_set)} to let the budget choose it: a strength "
                                       "set by hand is kept, and rolled back if it breaks the budget)" if hand_set else ""))
            slower = _slower_warning(run.validation.latency, run.passes)  # after the accuracy warning: it matters more
            if slower:
                run.warnings.append(slower)
        if max_drop is not None and run.validation is not None:
            run.gate_passed = run.validation.drop <= max_drop + 1e-12
        elif max_drop is not None:
            run.notes.append("--max-drop given but no validation ran: the budget was not checked")
        if output is not None and (run.gate_passed is not False or force):
            if staged is not None:
                staged.commit()
            else:
                save_model(candidate, output, external_data=keep_external, compact=compact)
            run.written = True
            if run.validation is not None:
                from onnxopt.measure import file_size

                run.validation.candidate.size_bytes = file_size(output)
    finally:
        if staged is not None:
            staged.discard()
    for path in reports:
        write_report(run.to_dict(), path)
    return run


def validate_models(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    eval_data: str | os.PathLike[str] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
    registry: Registry | None = None,
    metrics: Mapping[str, str] | None = None,
    timing: TimingConfig | None = None,
    probe: bool | None = None,
) -> ValidationResult:
    """Compare two model files on ORT (the `onnxopt validate` command); ``metrics`` and ``probe`` as in
    :func:`apply` (the probe runs each model)."""
    registry = registry or load_registry()
    declared = _check_metrics(metrics, registry)
    sessions = SessionFactory(providers=resolve_providers(providers), threads=threads)
    ref = load_model(reference)
    cand = load_model(candidate)
    dataset = load_data(ref, eval_data, shapes, synthetic_ok=True, seed=seed)
    if dataset is None:
        raise OnnxoptError("no data to validate on and the inputs have free dims",
                           f"give --eval data.npz (or an ONNX test-data folder), or {shape_hint(input_specs(ref))}")
    for model in (ref, cand):  # before this process creates sessions
        if probe if probe is not None else tensor_bytes(model) <= PROBE_MAX_BYTES:
            probe_model(model, latency_feed(dataset, model), sessions)
    return validate(ref, cand, dataset, sessions=sessions, metrics=list(registry.metrics.values()),
                    progress=progress, reference_path=reference, candidate_path=candidate,
                    timing=timing or TimingConfig(threads=threads), declared=declared)
