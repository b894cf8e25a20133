"""Accuracy-driven fallback: return the most sensitive quantized nodes to float until the drop fits the budget.

Sensitivity is measured, not guessed: for each quantized node, the model
quantized *except* that node is run on a slice of the evaluation data, and
the node's sensitivity is how much of the full model's output error goes
away (relative L2 error of the first output against the float model, a
continuous measure that ranks better than top-1 on a few samples; a
detector's boxes and scores each count, see
:func:`onnxopt.metrics.relative_error`). Nodes
then go back to float most sensitive first (those whose return lowered the
error at all; the walk ends after ``max_steps`` nodes back, or as many trials
in a row that did not lower the drop), each only if it lowers the
real drop (the one ``--max-drop`` gates, on all the evaluation data; the
output error breaks ties) given the ones already back, until the drop is
within budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.pass_api import PassContext
from onnxopt.budget import Drop
from onnxopt.metrics import relative_error
from onnxopt.validate import collect_outputs

__all__ = ["FallbackResult", "run_fallback"]

#: Builds the quantized model with the named nodes kept float.
Builder = Callable[[frozenset[str]], ir.Model]


@dataclass
class FallbackResult:
    model: ir.Model
    initial_drop: float
    final_drop: float
    kept_float: list[dict[str, object]] = field(default_factory=list)
    within_budget: bool = True
    initial_margin: float = 0.0  # one standard error of initial_drop (Drop.margin), part of the accept rule
    final_margin: float = 0.0
    trials: int = 0  # models with one more node float that were run on the whole selection part


def _first_output(model: ir.Model, data: Dataset, ctx: PassContext) -> np.ndarray:
    session = ctx.sessions.create(model)
    name = session.get_outputs()[0].name
    return collect_outputs(session, data, [name])[name].astype(np.float64)


def _trial(reference: ir.Model, trial: ir.Model, data: Dataset, ctx: PassContext) -> tuple[Drop, np.ndarray]:
    """A trial's drop (every output by its metric) and its first output, from one run of the trial where the
    model is small enough for two sessions (a large one is run twice, one session at a time)."""
    from onnxopt.validate import one_session_at_a_time

    if one_session_at_a_time(reference, trial):
        return ctx.measured_drop(reference, trial, data), _first_output(trial, data, ctx)
    session = ctx.sessions.create(trial)
    names = [o.name for o in session.get_outputs()]
    outputs = collect_outputs(session, data, names)
    del session
    return ctx.measured_drop(reference, trial, data, candidate_outputs=outputs), outputs[names[0]].astype(np.float64)


def run_fallback(build: Builder, candidates: Sequence[tuple[str, str]], reference: ir.Model, ctx: PassContext,
                 max_drop: float, *, samples: int, max_steps: int) -> FallbackResult:
    """Quantize with ``build``; while the drop is over ``max_drop``, keep the most sensitive candidates float.

    ``candidates`` are (node name, op type) of the quantized nodes that may go back to float.
    """
    model = build(frozenset())
    # on the selection part, every output by its metric; a drop must be within by one standard error too
    # (Drop.margin: binomial for a top-1 share, the per-sample spread for cosine/SNR/textmap), like every other
    # budget choice
    measured = ctx.measured_drop(reference, model)
    drop, samples = measured.value, measured.samples

    def within(measured: Drop) -> bool:
        return measured.value + measured.margin <= max_drop + 1e-12

    result = FallbackResult(model, drop, drop, within_budget=within(measured), initial_margin=measured.margin,
                            final_margin=measured.margin)
    if result.within_budget or not candidates:
        return result
    assert ctx.evaluation is not None
    subset = ctx.evaluation.take(samples)
    ref_out = _first_output(reference, subset, ctx)
    full_error = relative_error(ref_out, _first_output(model, subset, ctx))
    sensitivity: dict[str, float] = {}
    with ctx.progress.task("quant: sensitivity per node", total=len(candidates)) as task:
        for name, _ in candidates:
            out = _first_output(build(frozenset({name})), subset, ctx)
            sensitivity[name] = full_error - relative_error(ref_out, out)
            task.advance()
    # a node whose return to float did not lower the output error on the subset is not worth a trial on the whole
    # selection part (on PP-OCRv4 rec most of its 197 nodes: each trial a full run)
    order = sorted((c for c in candidates if sensitivity[c[0]] > 0), key=lambda c: -sensitivity[c[0]])
    full = ctx.evaluation
    full_ref = ref_out if len(subset) == len(full) else _first_output(reference, full, ctx)
    kept: list[str] = []
    error = full_error if full_ref is ref_out else relative_error(full_ref, _first_output(model, full, ctx))
    idle = 0  # trials in a row that did not lower the drop: past max_steps the ranking has run out of signal
    with ctx.progress.task("quant: returning nodes to float", total=len(order)) as task:
        for name, op in order:
            task.advance()
            if len(kept) >= max_steps or idle >= max_steps:
                break
            trial = build(frozenset([*kept, name]))
            result.trials += 1
            trial_measured, out = _trial(reference, trial, full, ctx)  # every output, each by its metric
            trial_drop = trial_measured.value
            trial_error = relative_error(full_ref, out)
            # Sensitivities measured one at a time do not add up exactly (a float node changes where its
            # neighbours are quantized): a node goes back to float only if that really lowers the drop
            # (or, at equal drop, the output error) given the ones already back.
            if (trial_drop, trial_error) >= (drop, error):
                idle += 1
                continue
            idle = 0 if trial_drop < drop else idle + 1  # a lower error alone does not reset the count
            kept.append(name)
            before, model, drop, error, measured = drop, trial, trial_drop, trial_error, trial_measured
            result.kept_float.append({"node": name, "op": op, "sensitivity": round(sensitivity[name], 6),
                                      "drop_before": round(before, 6), "drop_after": round(drop, 6),
                                      "margin_after": round(measured.margin, 6)})
            if within(measured):
                break
    result.model, result.final_drop, result.final_margin = model, drop, measured.margin
    result.within_budget = within(measured)
    return result
