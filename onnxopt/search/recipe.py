"""A candidate's recipe: the chain of passes with their settings, and how to rebuild its model from it.

A recipe written to the search JSON is all it takes to rebuild a candidate:
each step names its pass, its settings and, for passes that read the
accuracy budget, the share of it the step was given (what was left after
the steps before it), so :func:`apply_recipe` makes the same model again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.manager import plan_passes, run_passes
from onnxopt.pass_api import PassContext, PassReport
from onnxopt.plugins import Registry
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

__all__ = ["Step", "Recipe", "recipe_key", "recipe_to_json", "recipe_from_json", "run_step", "apply_recipe", "describe"]


@dataclass(frozen=True)
class Step:
    """One pass of a chain: its name, its settings, and the accuracy budget it was given (None: none)."""

    pass_name: str
    settings: dict[str, Any] = field(default_factory=dict)
    max_drop: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.pass_name, "settings": dict(self.settings)}
        if self.max_drop is not None:
            out["max_drop"] = self.max_drop
        return out


Recipe = tuple[Step, ...]


def recipe_key(recipe: Sequence[Step]) -> str:
    """The identity of a candidate: passes and settings (budgets follow from them, so they are not part of it)."""
    return json.dumps([[s.pass_name, dict(s.settings)] for s in recipe], sort_keys=True, separators=(",", ":"))


def recipe_to_json(recipe: Sequence[Step]) -> list[dict[str, Any]]:
    return [s.to_json() for s in recipe]


def recipe_from_json(data: Any) -> Recipe:
    """A recipe from its JSON form; a malformed one is a one-line error."""
    if not isinstance(data, list):
        raise OnnxoptError("a candidate's recipe is not a list of steps", "the search JSON was edited or is damaged")
    steps = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("pass"), str) or not isinstance(item.get("settings", {}), dict):
            raise OnnxoptError(f"recipe step {item!r} is not {{pass, settings[, max_drop]}}", "the search JSON was edited or is damaged")
        budget = item.get("max_drop")
        steps.append(Step(item["pass"], dict(item.get("settings", {})), None if budget is None else float(budget)))
    return tuple(steps)


def describe(recipe: Sequence[Step]) -> str:
    """A short label: ``prune(ratio=0.5) > quant(method=minmax)``; the base clean-up and fixed keys are kept."""
    parts = []
    for s in recipe:
        args = ",".join(f"{k}={v}" for k, v in s.settings.items())
        parts.append(f"{s.pass_name}({args})" if args else s.pass_name)
    return " > ".join(parts)


def run_step(
    model: ir.Model,
    step: Step,
    *,
    registry: Registry,
    sessions: SessionFactory,
    calibration: Dataset | None,
    evaluation: Dataset | None,
    seed: int = 0,
    progress: Progress | None = None,
    metrics: dict[str, str] | None = None,
    registered_metrics: dict[str, Any] | None = None,
) -> tuple[ir.Model, PassReport]:
    """Run one step on ``model`` (left as it was); every step gets a fresh RNG from ``seed``, so a chain
    rebuilt from a cached prefix is the same as one built from scratch. ``metrics`` (``--metric``) and the
    registered metrics are how a budget-reading step measures its drop, as in apply."""
    plan = plan_passes(registry, [step.pass_name], {step.pass_name: step.settings} if step.settings else None)
    ctx = PassContext(sessions=sessions, progress=progress or Progress(enabled=False), rng=np.random.default_rng(seed),
                      calibration=calibration, evaluation=evaluation, max_drop=step.max_drop, seed=seed,
                      metrics=dict(metrics or {}), registered_metrics=dict(registered_metrics or {}))
    out, reports = run_passes(model, plan, ctx, registry)
    return out, reports[0]


def apply_recipe(
    model: ir.Model,
    recipe: Sequence[Step],
    *,
    registry: Registry,
    sessions: SessionFactory,
    calibration: Dataset | None,
    evaluation: Dataset | None,
    seed: int = 0,
    progress: Progress | None = None,
    metrics: dict[str, str] | None = None,
) -> tuple[ir.Model, list[PassReport]]:
    """Rebuild a candidate's model from its recipe (as the search JSON stores it; ``metrics`` as the search had)."""
    reports = []
    for step in recipe:
        model, report = run_step(model, step, registry=registry, sessions=sessions, calibration=calibration,
                                 evaluation=evaluation, seed=seed, progress=progress, metrics=metrics,
                                 registered_metrics=dict(registry.metrics))
        reports.append(report)
    return model, reports

