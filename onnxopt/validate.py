"""Validation: the reference and the candidate on ONNX Runtime, same inputs, side by side.

The *drop* that ``--max-drop`` gates is measured per output with a metric
declared for it (``--metric OUTPUT=top1|cosine|snr|match|none`` or a
registered metric), else chosen safely from the output itself: top-1 (against
labels when the data has them, else agreement with the reference) only where
the last axis really is classes (a 2-D [N, C] output with modest C, or
probabilities summing to 1), else 1 - cosine similarity. The gated drop is
the worst over the outputs (the declared ones, when any are declared). The
report says which metric each output used and why
(:func:`onnxopt.metrics.output_drops`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.activations import SEGMENT_SHARE, held_bytes, model_segments, run_segments, segment_min_bytes
from onnxopt.budget import Drop, gated_as_drop
from onnxopt.data import Dataset, input_specs
from onnxopt.errors import OnnxoptError
from onnxopt.graph import expose_values
from onnxopt.measure import count_macs, count_parameters, file_size, stored_weight_bytes
from onnxopt.metrics import BUILTIN_METRICS, Metric, output_drops
from onnxopt.progress import Progress
from onnxopt.io import has_external_data, tensor_bytes
from onnxopt.sessions import LARGE_MODEL_BYTES, SessionFactory, run_batches
from onnxopt.timing import (
    LatencyComparison,
    TimingConfig,
    compare_latency,
    compare_latency_isolated,
    compare_unpaired,
    model_sources,
    sample_latency_ms,
)

__all__ = ["ModelFigures", "ValidationResult", "collect_outputs", "validate", "measure_drop",
           "probe_model", "probe_verdict", "PROBE_MAX_BYTES",
           "one_session_at_a_time", "segmented_validation", "segment_budget", "outputs_by_segments", "latency_feed",
           "gated_drop", "measure_drop_detail", "budget_drop"]


@dataclass
class ModelFigures:
    """Size, parameters, MACs and latency of one model.

    ``parameters`` counts the weights the compute nodes use (a decoded weight as the weight it decodes to);
    ``weight_bytes`` is what the initializers take as stored (packed, quantized, shared).
    """

    size_bytes: int | None = None
    parameters: int = 0
    weight_bytes: int | None = None
    macs: int | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ValidationResult:
    """Reference against candidate: metrics per output, accuracy, drop, and both models' figures."""

    dataset: str
    samples: int
    fidelity_only: bool
    outputs: dict[str, dict[str, float | None]] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    drop: float = 0.0
    drop_basis: str = ""
    drop_outputs: list[dict[str, Any]] = field(default_factory=list)
    reference: ModelFigures = field(default_factory=ModelFigures)
    candidate: ModelFigures = field(default_factory=ModelFigures)
    providers: list[str] = field(default_factory=list)
    threads: int = 1
    #: the paired latency comparison (ratio with its interval); None when latency was not timed
    latency: LatencyComparison | None = None

    def ratio(self, attr: str) -> float | None:
        """candidate / reference for ``size_bytes``, ``parameters``, ``weight_bytes``, ``macs`` or ``latency_ms``.

        For latency this is the paired ratio of :mod:`onnxopt.timing` (its interval is in ``latency``).
        """
        if attr == "latency_ms" and self.latency is not None:
            return self.latency.ratio
        ref, cand = getattr(self.reference, attr), getattr(self.candidate, attr)
        if ref in (None, 0) or cand is None:
            return None
        return float(cand) / float(ref)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "samples": self.samples,
            "fidelity_only": self.fidelity_only,
            "outputs": self.outputs,
            "accuracy": self.accuracy,
            "drop": self.drop,
            "drop_basis": self.drop_basis,
            "drop_outputs": self.drop_outputs,
            "reference": self.reference.to_dict(),
            "candidate": self.candidate.to_dict(),
            "ratios": {k: self.ratio(k) for k in ("size_bytes", "parameters", "weight_bytes", "macs", "latency_ms")},
            "providers": self.providers,
            "threads": self.threads,
            "latency": None if self.latency is None else self.latency.to_dict(),
        }


def collect_outputs(
    session: ort.InferenceSession,
    dataset: Dataset,
    names: Sequence[str],
    *,
    progress: Progress | None = None,
    description: str = "running",
) -> dict[str, np.ndarray]:
    """Run the whole dataset and concatenate each output along the batch axis."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    task = progress.task(description, total=dataset.num_batches) if progress else None
    for batch in run_batches(session, dataset.batches(), names):
        for name in names:
            parts[name].append(np.atleast_1d(batch[name]))
        if task:
            task.advance()
    if task:
        task.close()
    return {n: np.concatenate(p, axis=0) if p else np.empty(0) for n, p in parts.items()}


def _common_outputs(ref: ort.InferenceSession, cand: ort.InferenceSession) -> list[str]:
    ref_names = [o.name for o in ref.get_outputs()]
    cand_names = {o.name for o in cand.get_outputs()}
    common = [n for n in ref_names if n in cand_names]
    if not common:
        raise OnnxoptError("the candidate has none of the reference's outputs", f"reference outputs: {ref_names}")
    return common


def _model_figures(model: ir.Model, path: str | os.PathLike[str] | None, shapes: Mapping[str, tuple[int, ...]] | None) -> ModelFigures:
    macs = count_macs(model, shapes)
    return ModelFigures(
        size_bytes=file_size(path) if path is not None and Path(path).exists() else None,
        parameters=count_parameters(model),
        weight_bytes=stored_weight_bytes(model),
        macs=macs.total if not macs.unknown else (macs.total or None),
    )


def gated_drop(ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray], labels: np.ndarray | None,
               declared: Mapping[str, str] | None = None, registered: Mapping[str, Metric] | None = None,
               ) -> tuple[float, str, dict[str, float] | None, list[dict[str, Any]]]:
    """The gated drop over all outputs, its basis, accuracies, and each output's row (metric, why, drop)."""
    try:
        worst, rows = output_drops(ref, cand, labels, declared, registered)
    except KeyError as err:
        raise OnnxoptError(f"--metric names {err.args[0]!r}, which is neither a built-in drop metric nor a registered one",
                           "use top1, cosine, snr, match, textmap, detection or none (or install the metric's plugin)") from None
    except ValueError as err:
        raise OnnxoptError(f"--metric: {err}", "declare another metric for that output") from None
    missing = [n for n in (declared or {}) if n not in ref]
    if missing:
        raise OnnxoptError(f"--metric names output {missing[0]!r}, which the model does not have",
                           f"outputs: {', '.join(ref)}")
    if worst is None:
        return 0.0, "no output gated (every output declared none)", None, [r.to_dict() for r in rows]
    basis = f"{worst.output}: {worst.reason.split('; ')[-1]}" if len(rows) > 1 else worst.reason.split("; ")[-1]
    return worst.drop, basis, worst.accuracy, [r.to_dict() for r in rows]


def _with_metric(gated: tuple[float, str, Any, list[dict[str, Any]]]) -> tuple[float, str | None]:
    drop, _, _, rows = gated
    worst = [r for r in rows if r["metric"] != "none" and r["drop"] == drop]
    return drop, worst[0]["metric"] if worst else None


def measure_drop(reference: ir.Model, candidate: ir.Model, dataset: Dataset, sessions: SessionFactory, *,
                 declared: Mapping[str, str] | None = None, registered: Mapping[str, Metric] | None = None,
                 reference_outputs: dict[str, np.ndarray] | None = None, use_labels: bool = True) -> float:
    """The gated drop of ``candidate`` against ``reference`` on ``dataset`` (see :func:`measure_drop_detail`)."""
    return measure_drop_detail(reference, candidate, dataset, sessions, declared=declared, registered=registered,
                               reference_outputs=reference_outputs, use_labels=use_labels)[0]


def measure_drop_detail(reference: ir.Model, candidate: ir.Model, dataset: Dataset, sessions: SessionFactory, *,
                 declared: Mapping[str, str] | None = None, registered: Mapping[str, Metric] | None = None,
                 reference_outputs: dict[str, np.ndarray] | None = None, use_labels: bool = True) -> tuple[float, str | None]:
    """The gated drop of ``candidate`` against ``reference`` on ``dataset`` (outputs only: no latency).

    ``reference_outputs``, when given, are the reference's outputs on ``dataset`` (a cache the caller keeps).
    ``use_labels=False`` measures top-1 outputs by agreement with the reference even when the data has labels:
    1 - agreement bounds the accuracy lost from above and counts the flips that a net accuracy figure lets
    cancel, which is what a chooser should guard against. Returns the drop and the gated output's metric.
    """
    return _with_metric(_measure_gated(reference, candidate, dataset, sessions, declared=declared, registered=registered,
                                       reference_outputs=reference_outputs, use_labels=use_labels))


def budget_drop(reference: ir.Model, candidate: ir.Model, dataset: Dataset, sessions: SessionFactory, *,
                declared: Mapping[str, str] | None = None, registered: Mapping[str, Metric] | None = None,
                reference_outputs: dict[str, np.ndarray] | None = None, use_labels: bool = False,
                candidate_outputs: dict[str, np.ndarray] | None = None) -> Drop:
    """The gated drop as budget choosers measure it (:func:`measure_drop_detail`, top-1 by agreement by default),
    with its margin's basis: how many samples when the gated metric is a share of them (top-1, match), else one
    standard error from the gated output's per-sample drops (:func:`onnxopt.metrics.sample_error`).

    ``candidate_outputs``: every output of ``candidate`` on ``dataset``, when the caller already ran it (used with
    ``reference_outputs`` only; a model validated one session at a time or by segments is run here all the same)."""
    drop, _, _, rows = _measure_gated(reference, candidate, dataset, sessions, declared=declared, registered=registered,
                                      reference_outputs=reference_outputs, use_labels=use_labels,
                                      candidate_outputs=candidate_outputs)
    worst = next((r for r in rows if r["metric"] != "none" and r["drop"] == drop), None)
    return gated_as_drop(drop, worst, len(dataset) if dataset.arrays else None)


def _measure_gated(reference: ir.Model, candidate: ir.Model, dataset: Dataset, sessions: SessionFactory, *,
                   declared: Mapping[str, str] | None, registered: Mapping[str, Metric] | None,
                   reference_outputs: dict[str, np.ndarray] | None, use_labels: bool,
                   candidate_outputs: dict[str, np.ndarray] | None = None,
                   ) -> tuple[float, str, dict[str, float] | None, list[dict[str, Any]]]:
    labels = dataset.labels if use_labels else None
    if segmented_validation(reference, candidate):
        names = _output_names(reference, candidate)
        budget = segment_budget(reference)
        ref = reference_outputs if reference_outputs is not None and all(n in reference_outputs for n in names) else \
            outputs_by_segments(reference, names, dataset, sessions, budget=budget)[0]
        cand = outputs_by_segments(candidate, names, dataset, sessions, budget=budget)[0]
        return gated_drop({n: ref[n] for n in names}, cand, labels, declared, registered)
    if one_session_at_a_time(reference, candidate):
        names, (ref, cand), _ = _run_one_at_a_time(reference, candidate, dataset, sessions)
        return gated_drop(ref, cand, labels, declared, registered)
    if candidate_outputs is not None and reference_outputs is not None:
        names = [n for n in reference_outputs if n in candidate_outputs]
        if names:
            return gated_drop({n: reference_outputs[n] for n in names}, {n: candidate_outputs[n] for n in names},
                              labels, declared, registered)
    cand_s = sessions.create(candidate)
    if reference_outputs is None:
        ref_s = sessions.create(reference)
        names = _common_outputs(ref_s, cand_s)
        ref = collect_outputs(ref_s, dataset, names)
    else:
        cand_names = {o.name for o in cand_s.get_outputs()}
        names = [n for n in reference_outputs if n in cand_names]
        if not names:
            raise OnnxoptError("the candidate has none of the reference's outputs", f"reference outputs: {list(reference_outputs)}")
        ref = reference_outputs
    cand = collect_outputs(cand_s, dataset, names)
    return gated_drop({n: ref[n] for n in names}, cand, labels, declared, registered)


def validate(
    reference: ir.Model,
    candidate: ir.Model,
    dataset: Dataset,
    *,
    sessions: SessionFactory | None = None,
    metrics: Sequence[Metric] = BUILTIN_METRICS,
    progress: Progress | None = None,
    latency: bool = True,
    latency_runs: int = 30,
    reference_path: str | os.PathLike[str] | None = None,
    candidate_path: str | os.PathLike[str] | None = None,
    timing: TimingConfig | None = None,
    declared: Mapping[str, str] | None = None,
) -> ValidationResult:
    """Compare ``candidate`` with ``reference`` on ``dataset``: metrics per output, drop, figures, latency.

    Latency is timed by :mod:`onnxopt.timing` as set by ``timing`` (paired, interleaved runs until the ratio
    is known to ±3% or the time cap); ``latency_runs`` is kept for old callers and no longer used.

    ``declared`` maps output names to the metric their drop is measured with (``--metric``).
    """
    sessions = sessions or SessionFactory()
    timing = timing or TimingConfig(threads=sessions.threads)
    if segmented_validation(reference, candidate):
        return _validate_segmented(reference, candidate, dataset, sessions=sessions, metrics=metrics, progress=progress,
                                   latency=latency, timing=timing, reference_path=reference_path,
                                   candidate_path=candidate_path, declared=declared)
    if one_session_at_a_time(reference, candidate):
        return _validate_one_at_a_time(reference, candidate, dataset, sessions=sessions, metrics=metrics, progress=progress,
                                       latency=latency, timing=timing, reference_path=reference_path,
                                       candidate_path=candidate_path, declared=declared)
    ref_s = sessions.create(reference)
    cand_s = sessions.create(candidate)
    names = _common_outputs(ref_s, cand_s)
    ref = collect_outputs(ref_s, dataset, names, progress=progress, description="validating reference")
    cand = collect_outputs(cand_s, dataset, names, progress=progress, description="validating candidate")
    result = _compare(reference, candidate, dataset, names, ref, cand, sessions, metrics, reference_path, candidate_path,
                      declared)
    if latency:
        one = latency_feed(dataset, reference)
        task = progress.task("timing (paired runs, % of the time cap)", total=100) if progress else None
        done = [0]

        def tick(share: float) -> None:
            if task and int(share * 100) > done[0]:
                task.advance(int(share * 100) - done[0])
                done[0] = int(share * 100)

        if timing.isolate:
            del ref_s, cand_s  # the child makes its own sessions
            with model_sources(reference, candidate) as sources:
                comparison = compare_latency_isolated(sources[0], sources[1], one, timing,
                                                      providers=sessions.providers, threads=sessions.threads, tick=tick)
        else:
            comparison = compare_latency(ref_s, cand_s, one, timing, tick=tick)
        _set_latency(result, comparison)
        if task:
            task.close()
    return result


def _set_latency(result: ValidationResult, comparison: LatencyComparison) -> None:
    result.latency = comparison
    result.reference.latency_ms = comparison.reference_ms
    result.candidate.latency_ms = comparison.candidate_ms


def _compare(
    reference: ir.Model,
    candidate: ir.Model,
    dataset: Dataset,
    names: Sequence[str],
    ref: Mapping[str, np.ndarray],
    cand: Mapping[str, np.ndarray],
    sessions: SessionFactory,
    metrics: Sequence[Metric],
    reference_path: str | os.PathLike[str] | None,
    candidate_path: str | os.PathLike[str] | None,
    declared: Mapping[str, str] | None = None,
) -> ValidationResult:
    """Metrics per output, the drop, and both models' figures (latency is the caller's) from their outputs."""
    result = ValidationResult(dataset.source, len(dataset), dataset.fidelity_only,
                              providers=list(sessions.providers), threads=sessions.threads)
    for name in names:
        row: dict[str, float | None] = {}
        for metric in metrics:
            if metric.kind == "compare":
                row[metric.name] = metric.fn(ref[name], cand[name])
            elif dataset.labels is not None:
                row[f"{metric.name}_reference"] = metric.fn(ref[name], dataset.labels)
                row[metric.name] = metric.fn(cand[name], dataset.labels)
        result.outputs[name] = row
    registered = {m.name: m for m in metrics}
    result.drop, result.drop_basis, result.accuracy, result.drop_outputs = gated_drop(ref, cand, dataset.labels, declared,
                                                                                      registered)
    first = next(dataset.batches())
    fixed = any(spec.fixed_batch is not None for spec in input_specs(reference))
    # MACs per run at batch 1 unless the model fixes its batch
    shapes = {k: tuple(v.shape) if fixed or not v.ndim else (1, *v.shape[1:]) for k, v in first.items()}
    result.reference = _model_figures(reference, reference_path, shapes)
    result.candidate = _model_figures(candidate, candidate_path, shapes)
    return result


def latency_feed(dataset: Dataset, model: ir.Model) -> dict[str, np.ndarray]:
    """The feed latency is timed on: the first batch cut to one sample, unless the model fixes its batch."""
    first = next(dataset.batches())
    fixed = any(spec.fixed_batch is not None for spec in input_specs(model))
    return first if fixed or not dataset.arrays else {k: v[:1] for k, v in first.items()}


def one_session_at_a_time(*models: ir.Model) -> bool:
    """True when the models are large enough that their ORT sessions should not be alive together.

    An ORT session holds about a model's size (weights prepacked for its
    kernels); for models with external data or large weights, validation
    keeps one session at a time so peak memory is one model, not two.
    """
    return any(has_external_data(m) for m in models) or sum(tensor_bytes(m) for m in models) >= LARGE_MODEL_BYTES


def _run_one_at_a_time(
    reference: ir.Model,
    candidate: ir.Model,
    dataset: Dataset,
    sessions: SessionFactory,
    *,
    first_only: bool = False,
    progress: Progress | None = None,
    timing_feed: Mapping[str, np.ndarray] | None = None,
    timing: TimingConfig | None = None,
) -> tuple[list[str], list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Common output names, both models' outputs, and their run times (ms), with one ORT session alive at a time."""
    wanted = {v.name for v in candidate.graph.outputs}
    names: list[str] = []
    outputs: list[dict[str, np.ndarray]] = []
    times: list[np.ndarray] = []
    timing = timing or TimingConfig(threads=sessions.threads)
    for model, label in ((reference, "reference"), (candidate, "candidate")):
        session = sessions.create(model)
        if not names:
            names = [o.name for o in session.get_outputs() if o.name in wanted]
            if not names:
                raise OnnxoptError("the candidate has none of the reference's outputs",
                                   f"reference outputs: {[o.name for o in session.get_outputs()]}")
            names = names[:1] if first_only else names
        outputs.append(collect_outputs(session, dataset, names, progress=progress, description=f"validating {label}"))
        if timing_feed is not None:
            # at least --repeat runs, else half the time cap each; no pairing is possible with one session alive
            times.append(sample_latency_ms(session, timing_feed, warmup=timing.warmup, runs=timing.repeat,
                                           seconds=timing.time_budget / 2))
        del session  # frees what ORT holds for this model before the next model's session is made
    return names, outputs, times


def _validate_one_at_a_time(
    reference: ir.Model,
    candidate: ir.Model,
    dataset: Dataset,
    *,
    sessions: SessionFactory,
    metrics: Sequence[Metric],
    progress: Progress | None,
    latency: bool,
    timing: TimingConfig,
    reference_path: str | os.PathLike[str] | None,
    candidate_path: str | os.PathLike[str] | None,
    declared: Mapping[str, str] | None = None,
) -> ValidationResult:
    """:func:`validate` with one session alive at a time (latency then cannot interleave the two models)."""
    feed = latency_feed(dataset, reference) if latency else None
    names, (ref, cand), times = _run_one_at_a_time(reference, candidate, dataset, sessions, progress=progress,
                                                   timing_feed=feed, timing=timing)
    result = _compare(reference, candidate, dataset, names, ref, cand, sessions, metrics, reference_path, candidate_path,
                      declared)
    if times:
        _set_latency(result, compare_unpaired(times[0], times[1], timing))
    return result


def segmented_validation(*models: ir.Model) -> bool:
    """True when a session over one of the models would hold :func:`onnxopt.activations.segment_min_bytes` or more
    (its weights, plus what ORT folds from them at creation, such as cluster's decoded weights).

    Such models are validated a segment at a time (:func:`outputs_by_segments`): one session over the whole
    model holds about its whole weights, and a process that must stay within its model's size cannot also
    hold that. Smaller models keep the paired, interleaved path.
    """
    return any(sum(held_bytes(model)) >= segment_min_bytes() for model in models)


def segment_budget(reference: ir.Model) -> float:
    """Bytes one segment's session may hold when validating against ``reference``: SEGMENT_SHARE of what a session
    over the reference holds, for both models (a candidate whose session would hold more, such as a packed decode
    ORT folds back to floats, gets more segments, not larger ones)."""
    return SEGMENT_SHARE * sum(held_bytes(reference))


def _output_names(reference: ir.Model, candidate: ir.Model) -> list[str]:
    wanted = {v.name for v in candidate.graph.outputs}
    names = [str(v.name) for v in reference.graph.outputs if v.name in wanted]
    if not names:
        raise OnnxoptError("the candidate has none of the reference's outputs",
                           f"reference outputs: {[v.name for v in reference.graph.outputs]}")
    return names


def outputs_by_segments(
    model: ir.Model,
    names: Sequence[str],
    dataset: Dataset,
    sessions: SessionFactory,
    *,
    feed: Mapping[str, np.ndarray] | None = None,
    timing: TimingConfig | None = None,
    progress: Progress | None = None,
    label: str = "model",
    budget: float | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
    """``model``'s outputs ``names`` on ``dataset``, one segment's session alive at a time; with ``feed``, also
    the model's run times (ms) on it; and the number of segments.

    The segments are those calibration uses (:func:`onnxopt.activations.model_segments`), of at most ``budget``
    bytes held per session when given (one segment when the model is small or has subgraphs). Each segment's
    session is the one a user's default ORT session would make of those nodes: a packed decode (cluster) is
    folded at creation as deployment folds it, a segment's share at a time (the share counts the folded values).
    Outputs equal a whole-model session's bit for bit on MatMul/Gemm models; ORT's fusions and layouts at a
    segment boundary (NCHWc convolutions) can move the last bits (1.4e-6 on examples/digits/cnn.onnx).

    Run times: each segment is timed on its share of ``feed`` (``timing.warmup`` untimed runs, then
    ``timing.repeat`` runs or half of ``timing.time_budget`` spread over the segments), right after its outputs
    are computed, on the same session; the model's run time is the sum over segments of their i-th runs. The
    segments are timed one after the other, never interleaved with another model.
    """
    exposed = expose_values(model, names)
    segments = model_segments(exposed, budget=budget) or [list(range(len(list(exposed.graph))))]
    timing = timing or TimingConfig(threads=sessions.threads)
    times: list[np.ndarray] = []

    def time(session: ort.InferenceSession, part: dict[str, np.ndarray]) -> None:
        times.append(sample_latency_ms(session, part, warmup=timing.warmup, runs=timing.repeat,
                                       seconds=timing.time_budget / 2 / len(segments)))

    batches = dataset.num_batches
    feeds = dataset.batches if feed is None else (lambda: itertools.chain(dataset.batches(), [dict(feed)]))
    task = progress.task(f"validating {label}" + (f" ({len(segments)} segments)" if len(segments) > 1 else ""),
                         total=len(segments) * (batches + (feed is not None))) if progress else None
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b, part in run_segments(exposed, segments, list(names), feeds, sessions, task=task,
                                time=time if feed is not None else None):
        if b < batches:  # the last feed is latency's
            for name, array in part.items():
                parts[name].append(np.atleast_1d(array))
    if task:
        task.close()
    outputs = {n: np.concatenate(p, axis=0) if p else np.empty(0) for n, p in parts.items()}
    if not times:
        return outputs, None, len(segments)
    runs = min(len(t) for t in times)
    return outputs, np.sum([t[:runs] for t in times], axis=0), len(segments)


def _validate_segmented(
    reference: ir.Model,
    candidate: ir.Model,
    dataset: Dataset,
    *,
    sessions: SessionFactory,
    metrics: Sequence[Metric],
    progress: Progress | None,
    latency: bool,
    timing: TimingConfig,
    reference_path: str | os.PathLike[str] | None,
    candidate_path: str | os.PathLike[str] | None,
    declared: Mapping[str, str] | None = None,
) -> ValidationResult:
    """:func:`validate` for large models: each model's outputs and run times by segments, one session at a time."""
    names = _output_names(reference, candidate)
    feed = latency_feed(dataset, reference) if latency else None
    budget = segment_budget(reference)
    ref, ref_ms, ref_parts = outputs_by_segments(reference, names, dataset, sessions, feed=feed, timing=timing,
                                                 progress=progress, label="reference", budget=budget)
    cand, cand_ms, cand_parts = outputs_by_segments(candidate, names, dataset, sessions, feed=feed, timing=timing,
                                                    progress=progress, label="candidate", budget=budget)
    result = _compare(reference, candidate, dataset, names, ref, cand, sessions, metrics, reference_path, candidate_path,
                      declared)
    if ref_ms is not None and cand_ms is not None and feed is not None:
        # the reference is timed again after the candidate (reference, candidate, reference) and both timings pooled:
        # a load that rose or fell steadily while the models were timed one after the other then weighs on both
        _, again, _ = outputs_by_segments(reference, names, Dataset("latency feed", feeds=[dict(feed)]), sessions,
                                          feed=feed, timing=timing, progress=progress, label="reference (timing again)",
                                          budget=budget)
        comparison = compare_unpaired(np.concatenate([ref_ms, again]) if again is not None else ref_ms, cand_ms, timing)
        comparison.warnings.append(
            f"large models: each was timed a segment at a time ({ref_parts} reference, {cand_parts} candidate "
            "segments, one ORT session alive at a time; the reference before and after the candidate, pooled) and "
            "its latency is the sum of its segments' run times; "
            "fusions across a segment boundary are not in it, each segment adds ORT's per-run overhead"
            + ("; --isolate does not apply to them (the segments are timed in this process)" if timing.isolate else ""))
        _set_latency(result, comparison)
    return result


#: Models with at most this many bytes of weights are probed by default (:func:`probe_model`): the probe costs one
#: more session creation and run, which is little next to a run's own sessions for such models.
PROBE_MAX_BYTES = 2**26


def _probe(model: ir.Model, feed: Mapping[str, Any], sessions: SessionFactory) -> None:
    sessions.create(model).run(None, dict(feed))


def probe_verdict(result: Any) -> None:
    """Raise the one-line error for a probe child that died by a signal (ORT aborted or crashed); else nothing.

    What ORT raises as an exception, or a probe that ran out of time, is left to the run itself to report."""
    died = getattr(result, "died", None)
    if died is None or died.startswith("timed out"):
        return
    raise OnnxoptError(f"ONNX Runtime crashed ({died}) loading or running the model on one sample, in a child "
                       "process; nothing was written",
                       "check the model with `onnxopt inspect` or try another onnxruntime version "
                       "(--no-probe skips this check, and lets the crash end the process)")


def probe_model(model: ir.Model, feed: Mapping[str, Any], sessions: SessionFactory, timeout: float = 300.0) -> None:
    """Load ``model`` into ORT and run ``feed`` once in a forked child, so that an ORT abort or segfault on a
    malformed model is an OnnxoptError (exit 2), not a dead CLI. A no-op where fork does not exist.

    Call it before this process creates ORT sessions of its own (onnxopt.forked)."""
    from onnxopt.forked import call_forked, can_fork

    if can_fork():
        probe_verdict(call_forked(_probe, model, feed, sessions, timeout=timeout))
