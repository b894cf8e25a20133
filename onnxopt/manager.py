"""The pass manager: resolve a chain of pass names, build their configs, check the order, run them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from onnxopt.config import build_config
from onnxopt.errors import OnnxoptError
from onnxopt.pass_api import CALIBRATION_DATA, EVALUATION_DATA, Pass, PassContext, PassReport
from onnxopt.plugins import Registry, notify

__all__ = ["PlannedPass", "plan_passes", "check_requirements", "run_passes"]


@dataclass(frozen=True)
class PlannedPass:
    """A pass instance with its validated config."""

    pass_: Pass[Any]
    config: Any

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
        plan.append(PlannedPass(cls(), config))
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
