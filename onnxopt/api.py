"""The Python API: the same operations as the CLI, which is a thin layer over these functions."""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.activations import bounded_batches
from onnxopt.data import Dataset, input_specs, load_dataset, synthetic_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.io import (LOAD_NOTES, PROTOBUF_LIMIT, StagedModel, external_data_files, has_external_data, load_model,
                        refuse_overwriting, stage_model,
                        same_file, save_model, serialize_model, tensor_bytes)
from onnxopt.manager import plan_passes, run_passes
from onnxopt.pass_api import PassContext
from onnxopt.plugins import Registry, load_registry
from onnxopt.progress import Progress
from onnxopt.report import RunReport, write_json
from onnxopt.sessions import SessionFactory, resolve_providers
from onnxopt.validate import ValidationResult, one_session_at_a_time, validate

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
            dataset = synthetic_dataset(specs, shapes, seed=seed)
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
    report: str | os.PathLike[str] | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 1,
    external_data: bool | None = None,
    seed: int = 0,
    validate_result: bool = True,
    progress: Progress | None = None,
    registry: Registry | None = None,
) -> RunReport:
    """Load ``model``, run ``passes``, validate against the original on ORT, and save to ``output``.

    ``settings`` is ``{pass: {key: value}}`` (the same keys as ``--set``).
    Nothing is written when a pass fails, or when the measured drop is over
    ``max_drop`` (unless ``force``); the input file is never modified.
    """
    src = Path(model)
    writes = [("output", output), ("report", report),
              ("output data file", None if output is None else Path(output).with_name(Path(output).name + ".data"))]
    refuse_overwriting([("the input model", src), ("the --data file", data), ("the --eval file", eval_data)], writes)
    if output is not None and report is not None and same_file(output, report):
        raise OnnxoptError(f"--report {report} is the output model's path", "write the report to a .json file of its own")
    for flag, target in (("-o", output), ("--report", report)):
        # fail before the work, not after it: a run can take minutes
        if target is not None and not Path(target).resolve().parent.is_dir():
            raise OnnxoptError(f"{flag} {target}: folder {Path(target).parent} does not exist", "create it first or choose another path")
    names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else list(passes)
    registry = registry or load_registry()
    plan = plan_passes(registry, names, settings)
    progress = progress or Progress(enabled=False)
    sessions = SessionFactory(providers=resolve_providers(providers), threads=threads)
    reference = load_model(src)
    refuse_overwriting([("a data file of the input model", f) for f in external_data_files(reference)], writes)
    calibration = load_data(reference, data, seed=seed)
    evaluation = load_data(reference, eval_data, shapes, seed=seed)
    ctx = PassContext(sessions=sessions, progress=progress, rng=np.random.default_rng(seed), calibration=calibration,
                      evaluation=evaluation, base_dir=src.parent, max_drop=max_drop, seed=seed)
    run = RunReport(input=str(src), output=str(output) if output is not None else None,
                    load_notes=list(reference.meta.get(LOAD_NOTES, [])), max_drop=max_drop)
    candidate, run.passes = run_passes(reference, plan, ctx, registry)

    comparable = all(p.pass_.comparable for p in plan)
    check_data = evaluation or calibration or (load_data(reference, None, synthetic_ok=True, seed=seed) if comparable else None)
    validating = False
    if not validate_result:
        run.validation_note = "skipped (asked)"
    elif not comparable:
        run.validation_note = "skipped: the chain changes the model's interface (" + ", ".join(p.name for p in plan if not p.pass_.comparable) + ")"
    elif check_data is None:
        run.validation_note = "skipped: no data and the inputs have free dims (give --eval data.npz or --shape NAME=DIMS)"
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
                staged = stage_model(candidate, output, external_data=keep_external)
                del candidate
                gc.collect()
                candidate = load_model(staged.path, check=False, normalize=False)
                candidate_path = staged.path
            run.validation = validate(reference, candidate, check_data, sessions=sessions,
                                      metrics=list(registry.metrics.values()), progress=progress, reference_path=src,
                                      candidate_path=candidate_path)
            if candidate_path is None:
                run.validation.candidate.size_bytes = _candidate_size(candidate)
        if max_drop is not None and run.validation is not None:
            run.gate_passed = run.validation.drop <= max_drop + 1e-12
        elif max_drop is not None:
            run.notes.append("--max-drop given but no validation ran: the budget was not checked")
        if output is not None and (run.gate_passed is not False or force):
            if staged is not None:
                staged.commit()
            else:
                save_model(candidate, output, external_data=keep_external)
            run.written = True
            if run.validation is not None:
                from onnxopt.measure import file_size

                run.validation.candidate.size_bytes = file_size(output)
    finally:
        if staged is not None:
            staged.discard()
    if report is not None:
        write_json(run.to_dict(), report)
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
) -> ValidationResult:
    """Compare two model files on ORT (the `onnxopt validate` command)."""
    registry = registry or load_registry()
    sessions = SessionFactory(providers=resolve_providers(providers), threads=threads)
    ref = load_model(reference)
    cand = load_model(candidate)
    dataset = load_data(ref, eval_data, shapes, synthetic_ok=True, seed=seed)
    if dataset is None:
        raise OnnxoptError("no data to validate on and the inputs have free dims",
                           "give --eval data.npz or --shape NAME=DIMS")
    return validate(ref, cand, dataset, sessions=sessions, metrics=list(registry.metrics.values()),
                    progress=progress, reference_path=reference, candidate_path=candidate)
