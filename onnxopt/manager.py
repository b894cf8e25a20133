"""The pass manager: resolve a chain of pass names, build their configs, check the order, run them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from onnxopt.config import build_config
from onnxopt.errors import OnnxoptError
from onnxopt.pass_api import CALIBRATION_DATA, EVALUATION_DATA, Pass, PassContext, PassReport, PassResult
from onnxopt.plugins import Registry, notify

__all__ = ["PlannedPass", "plan_passes", "check_requirements", "run_passes", "run_chain", "ChainResult"]


@dataclass(frozen=True)
class PlannedPass:
    """A pass instance with its validated config."""

    pass_: Pass[Any]
    config: Any
    #: config keys the user set (``--set``, recipe, API): settings given explicitly win over the budget
    explicit: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.pass_.name


def plan_passes(
    registry: Registry,
    names: Sequence[str],
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[PlannedPass]:
    """Resolve ``names`` to passes with configs from ``settings``; enforce declared ordering rules.

    Settings for a pass that is not in the chain are an error too: a typo in
    ``--set quantt.method=...`` must not be silently ignored.
    """
    settings = dict(settings or {})
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise OnnxoptError("no pass given", "name passes with --pass, e.g. --pass fold,quant (see `onnxopt passes`)")
    stray = [k for k in settings if k not in names]
    if stray:
        raise OnnxoptError(f"settings given for pass {stray[0]!r}, which is not in the chain {','.join(names)}",
                           f"add it to --pass or fix the key (--set {stray[0]}.KEY=VALUE)")
    plan = []
    for name in names:
        cls = registry.get_pass(name)
        config = build_config(cls.Config, settings.get(name, {}), pass_name=name)
        plan.append(PlannedPass(cls(), config, frozenset(settings.get(name, {}))))
    finals = [p.name for p in plan if p.pass_.final]
    if len(finals) > 1:
        raise OnnxoptError(f"passes {', '.join(finals)} each must run last; a chain can hold only one of them",
                           "run them in separate `onnxopt apply` calls")
    if finals and plan[-1].name != finals[0]:
        after = [p.name for p in plan[plan.index(next(p for p in plan if p.name == finals[0])) + 1 :]]
        raise OnnxoptError(f"pass {finals[0]} must be the last of the chain, but {', '.join(after)} comes after it",
                           f"reorder: --pass {','.join([*[p.name for p in plan if p.name != finals[0]], finals[0]])}")
    return plan


def check_requirements(plan: Sequence[PlannedPass], ctx: PassContext) -> None:
    """Fail early, before any work, when a pass lacks the data it needs."""
    for planned in plan:
        if CALIBRATION_DATA in planned.pass_.requires:
            ctx.require_calibration(planned.name)
        if EVALUATION_DATA in planned.pass_.requires:
            ctx.require_evaluation(planned.name)


def run_passes(
    model: ir.Model,
    plan: Sequence[PlannedPass],
    ctx: PassContext,
    registry: Registry | None = None,
) -> tuple[ir.Model, list[PassReport]]:
    """Run the chain; each pass gets its own copy of the model, so ``model`` is left as it was."""
    check_requirements(plan, ctx)
    reports = []
    current = model
    for planned in plan:
        notify(registry, "onnxopt_before_pass", pass_name=planned.name, model=current, config=planned.config, ctx=ctx)
        result = planned.pass_.apply(current, planned.config, ctx)
        notify(registry, "onnxopt_after_pass", pass_name=planned.name, result=result, ctx=ctx)
        reports.append(result.report)
        current = result.model
    return current, reports


# -- chains under a budget: the ledger ------------------------------------------------------------------------------

@dataclass
class ChainResult:
    """The chain's model, each pass's report, and the ledger (one row per pass: drops, size, latency, action)."""

    model: ir.Model
    reports: list[PassReport]
    ledger: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        return [row for row in self.ledger if row["action"] == "rolled back"]


def _size(model: ir.Model) -> int | None:
    from onnxopt.io import PROTOBUF_LIMIT, has_external_data, serialized_size, tensor_bytes

    if has_external_data(model) or tensor_bytes(model) >= PROTOBUF_LIMIT:
        return None
    return serialized_size(model)  # the model's protobuf is not built: on a large model it was a second copy


class _Ledger:
    """Measures the chain against the original model after each pass: drop on both parts, size, latency."""

    def __init__(self, original: ir.Model, ctx: PassContext, timed: bool) -> None:
        self.original = original
        self.ctx = ctx
        self.timed = timed
        self._ref: dict[int, dict[str, Any]] = {}

    def drop(self, candidate: ir.Model, data: Any, *, choosing: bool = False) -> float:
        return self.measured(candidate, data, choosing=choosing).value

    def measured(self, candidate: ir.Model, data: Any, *, choosing: bool = False) -> Any:
        """The chain's drop against the original (an :class:`onnxopt.budget.Drop`); choosing: as choosers measure."""
        from onnxopt.validate import budget_drop, collect_outputs, one_session_at_a_time

        cache = None
        if not one_session_at_a_time(self.original, candidate):
            if id(data) not in self._ref:
                session = self.ctx.sessions.create(self.original)
                self._ref[id(data)] = collect_outputs(session, data, [o.name for o in session.get_outputs()])
            cache = self._ref[id(data)]
        return budget_drop(self.original, candidate, data, self.ctx.sessions, declared=self.ctx.metrics,
                           registered=self.ctx.registered_metrics, reference_outputs=cache, use_labels=not choosing)

    def row(self, name: str, report: PassReport, candidate: ir.Model, action: str) -> dict[str, Any]:
        from onnxopt.validate import validate

        row: dict[str, Any] = {"pass": name, "summary": report.summary, "action": action,
                               "drop_selection": None, "margin_selection": None, "drop_confirmation": None,
                               "size_bytes": _size(candidate), "latency_ms": None, "reference_latency_ms": None}
        if self.ctx.evaluation is not None:
            # keeping or rolling back is a choice made on the selection part: it gets the margin choosers add
            # (one standard error: binomial for a share of samples, else from the per-sample drops)
            measured = self.measured(candidate, self.ctx.evaluation)
            row["drop_selection"], row["margin_selection"] = measured.value, measured.margin
        if self.ctx.confirmation is not None:
            if self.timed:
                # the latency field is whatever validate measures today (the timing module is another change's)
                result = validate(self.original, candidate, self.ctx.confirmation, sessions=self.ctx.sessions,
                                  metrics=list(self.ctx.registered_metrics.values()) or _builtin_metrics(),
                                  declared=self.ctx.metrics)
                row.update(drop_confirmation=result.drop, latency_ms=result.candidate.latency_ms,
                           reference_latency_ms=result.reference.latency_ms)
            else:
                row["drop_confirmation"] = self.drop(candidate, self.ctx.confirmation)
        return row


_FIGURES = ("drop_selection", "margin_selection", "drop_confirmation", "size_bytes", "latency_ms",
            "reference_latency_ms")


def _last(ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the model a pass left unchanged: the previous row's (or the original's, drop 0)."""
    for row in reversed(ledger):
        if row["action"] != "rolled back":
            return {k: row.get(k) for k in _FIGURES}
    return {k: (0.0 if k.startswith(("drop", "margin")) else None) for k in _FIGURES}


def _builtin_metrics() -> list[Any]:
    from onnxopt.metrics import BUILTIN_METRICS

    return list(BUILTIN_METRICS)


def _fit_to_budget(planned: PlannedPass, current: ir.Model, ctx: PassContext, ledger: _Ledger,
                   ladder: list[tuple[str, Any]], standard_errors: float = 1.0) -> tuple[Any, Any]:
    """Run the pass at the strongest rung of its ladder within the budget (drop on the selection part, whole chain)."""
    from onnxopt.budget import Drop, strongest_within

    assert ctx.max_drop is not None and ctx.evaluation is not None
    results: dict[int, Any] = {}
    configs = [config for _, config in ladder]

    def measure(config: Any) -> Drop:
        result = planned.pass_.apply(current, config, ctx)
        index = next(i for i, c in enumerate(configs) if c is config)
        # only the rung in hand and the best within so far are kept (each is a whole model)
        drop = ledger.measured(result.model, ctx.evaluation, choosing=True) if result.modified else Drop(0.0)
        if drop.value + drop.margin * standard_errors <= ctx.max_drop + 1e-12:
            for i in [i for i in results if i < index]:
                del results[i]
            results[index] = result
        return drop

    with ctx.progress.task(f"{planned.name}: fitting --max-drop {ctx.max_drop:g}", total=None):
        choice = strongest_within(configs, measure, ctx.max_drop, labels=[label for label, _ in ladder],
                                  standard_errors=standard_errors)
    return choice, (results.get(choice.chosen) if choice.chosen is not None else None)


#: A refinement is a second search on the selection samples the ladder already chose on, among proposals made to
#: be stronger: it counts as within only with two standard errors of margin (one let two of the ten cluster runs
#: of benchmarks/budget.py pass on selection and break the budget on fresh inputs: digits transformer and mlp at 0.02).
REFINEMENT_STANDARD_ERRORS = 2.0


def _refine(planned: PlannedPass, current: ir.Model, ctx: PassContext, ledger: _Ledger, choice: Any,
            result: PassResult, ladder: list[tuple[str, Any]]) -> tuple[PassResult, dict[str, Any] | None]:
    """The pass's refinement of the rung the ladder chose (:meth:`Pass.budget_refinement`), measured as the ladder
    was: the strongest alternative within the budget on the selection part that is smaller on disk, else ``result``.
    Returns the result kept and what was tried (None: the pass offers no refinement)."""
    over = [i for i, label in enumerate(choice.rungs) if i > choice.chosen
            and any(t["setting"] == label and not t["within"] for t in choice.tried)]
    steps = planned.pass_.budget_refinement(current, choice.value, ctx, planned.explicit,
                                            ladder[over[0]][1] if over else None)
    if not steps:
        return result, None
    refined_choice, refined = _fit_to_budget(planned, current, ctx, ledger, steps, REFINEMENT_STANDARD_ERRORS)
    doc = {**refined_choice.to_dict(), "from": choice.label, "kept": False}
    if refined is None:
        doc["reason"] = f"{refined_choice.reason}: {choice.label} stays"
        return result, doc
    size, uniform = _size(refined.model), _size(result.model)
    if size is not None and uniform is not None and size >= uniform:
        doc["reason"] = (f"{refined_choice.reason}; but its file ({size:,} bytes) is not smaller than "
                         f"{choice.label}'s ({uniform:,} bytes): {choice.label} stays")
        return result, doc
    doc.update(kept=True, size_bytes=size, from_size_bytes=uniform)
    return refined, doc


def run_chain(
    model: ir.Model,
    plan: Sequence[PlannedPass],
    ctx: PassContext,
    registry: Registry | None = None,
    *,
    ledger: bool = True,
    timed: bool = True,
    rollback: bool = True,
) -> ChainResult:
    """Run the chain, keeping a ledger; under ``ctx.max_drop`` each lossy pass holds the budget or is rolled back.

    With a budget and evaluation data: a pass with a ladder (:meth:`Pass.budget_ladder`) whose strength the
    user did not set runs at the strongest rung within what is left (then at the strongest of its refinements,
    :meth:`Pass.budget_refinement`, that is within and smaller); any pass that leaves the chain over the budget on
    the selection part, by its drop plus one standard error (the margin every chooser adds:
    :attr:`onnxopt.budget.Drop.margin`), is rolled back (the chain goes on from the model before it).
    Decisions use the selection part only; the confirmation part is measured for the ledger and the gate.
    """
    from dataclasses import replace as dc_replace

    from onnxopt.budget import BUDGET_TOLERANCE

    check_requirements(plan, ctx)
    book = _Ledger(model, ctx, timed) if ledger and ctx.evaluation is not None else None
    budget = ctx.max_drop if book is not None else None
    out = ChainResult(model, [])
    current = model
    spent = 0.0
    for planned in plan:
        notify(registry, "onnxopt_before_pass", pass_name=planned.name, model=current, config=planned.config, ctx=ctx)
        lossy = not planned.pass_.lossless
        left = None if budget is None else max(0.0, budget - spent)
        pass_ctx = ctx if left is None else dc_replace(ctx, max_drop=left)
        choice = None
        ladder = planned.pass_.budget_ladder(planned.config, pass_ctx) if budget is not None and lossy else []
        chosen_by_user = sorted(planned.explicit & set(planned.pass_.budget_keys))
        refinement: dict[str, Any] | None = None
        if ladder and not chosen_by_user and book is not None:
            # the ladder measures the whole chain against the original: the full budget, not what is left
            choice, result = _fit_to_budget(planned, current, dc_replace(ctx, max_drop=budget), book, ladder)
            if result is not None:
                result, refinement = _refine(planned, current, dc_replace(ctx, max_drop=budget), book, choice, result,
                                             ladder)
            if result is None:  # no rung within: the pass is not applied
                report = planned.pass_.new_report(planned.config)
                report.summary = "rolled back: no setting of its ladder kept the chain within --max-drop"
                result = PassResult(current, False, report)
                out.ledger.append({"pass": planned.name, "summary": report.summary, "action": "rolled back",
                                   "reason": choice.reason, "tried": len(choice.tried),
                                   **_last(out.ledger)})
        else:
            result = planned.pass_.apply(current, planned.config, pass_ctx)
        assert result is not None
        report = result.report
        if choice is not None:
            report.figures["budget"] = choice.to_dict()  # printed and rendered from here (RunReport.budget_choices)
            if refinement is not None:
                report.figures["budget"]["refinement"] = refinement
                if refinement["kept"]:
                    report.figures["budget"]["chosen"] = f"{choice.label}, refined: {refinement['chosen']}"
        elif budget is not None and lossy and chosen_by_user:
            report.notes.append(f"strength set by you ({', '.join(chosen_by_user)}): the budget did not choose it")
        notify(registry, "onnxopt_after_pass", pass_name=planned.name, result=result, ctx=ctx)
        action = "kept" if result.modified else "no change"
        if book is None:
            out.reports.append(report)
            current = result.model
            continue
        row = book.row(planned.name, report, result.model, action) if result.modified else None
        if rollback and row is not None and budget is not None and row["drop_selection"] is not None \
                and row["drop_selection"] + row["margin_selection"] > budget + BUDGET_TOLERANCE:
            pad = row["margin_selection"]
            reason = (f"the chain's drop on the selection part after {planned.name} was "
                      f"{row['drop_selection'] * 100:.2f} pt"
                      + (f" + {pad * 100:.2f} pt margin (one standard error)" if pad else "")
                      + f", over --max-drop {budget * 100:.2f} pt")
            row.update(action="rolled back", reason=reason)
            report.notes.append(f"rolled back: {reason}; the chain goes on from the model before it")
            report.summary = f"rolled back ({report.summary})"
            out.ledger.append(row)
            out.reports.append(report)
            continue  # current stays the model before this pass
        if row is None:
            if choice is not None and choice.chosen is None:
                out.reports.append(report)
                continue  # rolled back above
            row = {"pass": planned.name, "summary": report.summary, "action": action, **_last(out.ledger)}
        if choice is not None:
            row["chosen"] = report.figures["budget"]["chosen"]
            row["tried"] = len(choice.tried) + (len(refinement["tried"]) if refinement is not None else 0)
        out.ledger.append(row)
        out.reports.append(report)
        current = result.model
        if row["drop_selection"] is not None:
            spent = max(0.0, row["drop_selection"])
    out.model = current
    return out
