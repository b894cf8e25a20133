"""Evaluating one candidate: rebuild its chain (reusing cached prefixes), measure drop, size and latency on ORT.

An :class:`Evaluator` lives in each worker process (or Ray actor) and keeps
the reference model, the data and the reference outputs loaded, so a
candidate costs only its own passes and one pass over the evaluation data.
Chains share prefixes (prune(0.5) is the start of prune(0.5) > quant): every
built chain is kept in memory (a few) and in the cache folder, and a chain
starts from its longest cached prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.budget import gated_as_drop
from onnxopt.data import Dataset, input_specs
from onnxopt.errors import OnnxoptError
from onnxopt.io import (
    PROTOBUF_LIMIT,
    load_model,
    save_model,
    serialize_model,
    tensor_bytes,
)
from onnxopt.measure import count_macs, count_parameters
from onnxopt.plugins import load_registry
from onnxopt.search.recipe import (
    Recipe,
    Step,
    recipe_from_json,
    recipe_key,
    recipe_to_json,
    run_step,
)
from onnxopt.sessions import SessionFactory
from onnxopt.split import split_dataset
from onnxopt.timing import LatencyComparison, TimingConfig, compare_latency, compare_latency_isolated, model_sources
from onnxopt.validate import collect_outputs, gated_drop

__all__ = ["WorkerSetup", "Evaluator", "Measured", "init_worker", "evaluate_in_worker", "latency_feed",
           "time_candidate", "latency_fields", "SCREEN_SECONDS"]

#: Chains kept in memory per worker, at most this many bytes of weights in all.
MEMORY_CACHE_BYTES = 2**29
#: Below this many evaluation samples the early test on a quarter of them proves little: it is skipped.
EARLY_TEST_MIN_SAMPLES = 200
#: Standard errors by which the quarter's drop must exceed the budget to reject a candidate without the rest.
EARLY_TEST_Z = 3.0
#: Time cap (s) of the screening timing in the workers; the front and the pick are timed again with the full cap.
SCREEN_SECONDS = 2.0


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to evaluate candidates: paths (readable where the worker runs) and figures."""

    model: str
    eval_data: str
    data: str | None
    max_drop: float
    budget_passes: tuple[str, ...] = ()
    seed: int = 0
    threads: int = 1
    cache_dir: str | None = None
    early_test: bool = True
    latency_runs: int = 30  # kept for old JSON/callers; the timing is set by ``timing``
    latency_batch: int = 1
    timing: TimingConfig | None = None
    #: ``--metric OUTPUT=METRIC`` pairs: how each output's drop is measured (as in apply and validate)
    metrics: tuple[tuple[str, str], ...] = ()


def latency_feed(dataset: Dataset, model: ir.Model, batch: int = 1) -> dict[str, np.ndarray]:
    """The feed latency is timed on: ``batch`` samples (the first feed as it is when the model fixes its batch)."""
    fixed = any(spec.fixed_batch is not None for spec in input_specs(model))
    if fixed or not dataset.arrays:
        return next(dataset.batches())
    return {k: v[:batch] for k, v in dataset.arrays.items()}


def latency_fields(result: LatencyComparison) -> dict[str, Any]:
    """A candidate's latency entries in the search JSON: candidate ÷ reference with its interval."""
    return {"latency_ms": result.candidate_ms, "reference_latency_ms": result.reference_ms,
            "latency_ratio": result.ratio, "latency_low": result.low, "latency_high": result.high,
            "latency_pairs": result.pairs, "latency_capped": result.capped, "latency_warnings": result.warnings}


def time_candidate(ref_session: Any, session: Any, feed: dict[str, np.ndarray], config: TimingConfig, *,
                   reference: ir.Model | None = None, candidate: ir.Model | None = None,
                   sessions: SessionFactory | None = None) -> LatencyComparison:
    """Candidate against reference on :mod:`onnxopt.timing`; in a child process when ``config.isolate`` (models given)."""
    if config.isolate and reference is not None and candidate is not None:
        factory = sessions or SessionFactory(threads=config.threads)
        with model_sources(reference, candidate) as sources:
            return compare_latency_isolated(sources[0], sources[1], feed, config, providers=factory.providers,
                                            threads=factory.threads)
    return compare_latency(ref_session, session, feed, config)


def _cache_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Measured:
    """A candidate measured on a part of --eval, as apply's budget ladders and its gate measure it.

    ``drop`` is the budget's drop (every output by its metric, top-1 outputs by 1 - agreement with the reference,
    labels or not: flips do not cancel), ``margin`` one standard error of it (binomial when it is a share of
    ``samples``; else from the per-sample drops: :attr:`onnxopt.budget.Drop.margin`): a candidate is within
    when ``drop + margin`` is. ``gate_drop`` is what
    apply's gate measures (top-1 against the labels when there are labels), with its basis and accuracies.
    """

    drop: float
    samples: int | None
    margin: float
    gate_drop: float
    basis: str
    accuracy: dict[str, float] | None

    def fields(self) -> dict[str, Any]:
        """The candidate's entries in the search JSON."""
        return {"drop": self.drop, "drop_margin": self.margin, "drop_samples": self.samples,
                "drop_labels": self.gate_drop if self.accuracy is not None else None, "drop_basis": self.basis,
                "accuracy": None if self.accuracy is None else self.accuracy["candidate"]}


@dataclass
class _Built:
    model: ir.Model
    recipe: Recipe  # with each step's budget resolved
    summaries: list[str]
    drop: float | None = None


class Evaluator:
    """Builds and measures candidates against one reference model on one evaluation set."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.registry = load_registry()
        self.sessions = SessionFactory(threads=setup.threads)
        self.reference = load_model(setup.model)
        from onnxopt.api import (
            load_data,  # the API module imports this package's callers; import late
        )

        evaluation = load_data(self.reference, setup.eval_data)
        if evaluation is None:  # pragma: no cover - the driver checks first
            raise OnnxoptError("the search needs evaluation data", "give --eval eval.npz")
        # choose on one part, judge on another: every candidate is measured (and picked) on the selection part;
        # the driver confirms the pick on the confirmation part, which no candidate was measured on
        self.split = split_dataset(evaluation, setup.seed)
        self.evaluation: Dataset = self.split.selection
        self.confirmation: Dataset = self.split.confirmation
        self.calibration = load_data(self.reference, setup.data) if setup.data else None
        self.ref_session = self.sessions.create(self.reference)
        # every output by its metric (declared, else chosen from the output), the worst gated: apply's and
        # validate's drop (onnxopt.metrics.output_drops), so a search's pick means what apply's gate means
        self.declared = dict(setup.metrics)
        self.registered = dict(self.registry.metrics)
        self.outputs = [o.name for o in self.ref_session.get_outputs()]
        self.output = self.outputs[0]  # the first output, named in the JSON's reference figures
        self.ref_outputs = collect_outputs(self.ref_session, self.evaluation, self.outputs)
        self.feed = latency_feed(self.evaluation, self.reference, setup.latency_batch)
        self.timing = setup.timing or TimingConfig(threads=setup.threads)
        self._memory: OrderedDict[str, _Built] = OrderedDict()
        self.cache_dir = Path(setup.cache_dir) if setup.cache_dir else None

    # -- the accuracy drop ---------------------------------------------------------------------------------------
    def _drop(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], data: Dataset) -> Measured:
        gate, basis, acc, rows = gated_drop(ref, out, data.labels, self.declared, self.registered)
        drop = gate
        if data.labels is not None:  # the budget's drop ignores the labels: 1 - agreement bounds the accuracy lost
            drop, _, _, rows = gated_drop(ref, out, None, self.declared, self.registered)
        worst = next((r for r in rows if r["metric"] != "none" and r["drop"] == drop), None)
        measured = gated_as_drop(drop, worst, len(data) if data.arrays else None)
        return Measured(drop, measured.samples, measured.margin, gate, basis, acc)

    def measure(self, model: ir.Model, data: Dataset | None = None) -> tuple[Measured, Any]:
        """``model`` measured on the selection part (or a prefix of it), and its session."""
        data = data or self.evaluation
        session = self.sessions.create(model)
        missing = [n for n in self.outputs if n not in {o.name for o in session.get_outputs()}]
        if missing:
            raise OnnxoptError(f"the candidate lost the output {missing[0]}", "a pass changed the model's interface")
        out = collect_outputs(session, data, self.outputs)
        n = len(data)
        return self._drop({k: v[:n] for k, v in self.ref_outputs.items()}, out, data), session

    def confirm(self, model: ir.Model) -> Measured:
        """``model`` measured on the confirmation part, which no candidate was measured on (the pick's honest
        figures: its ``gate_drop`` is what apply's gate would measure)."""
        ref_s, session = self.ref_session, self.sessions.create(model)
        ref = collect_outputs(ref_s, self.confirmation, self.outputs)
        out = collect_outputs(session, self.confirmation, self.outputs)
        return self._drop(ref, out, self.confirmation)

    def _early_reject(self, model: ir.Model) -> float | None:
        """The drop on the first quarter of the data when it is over budget beyond doubt, else None."""
        n = len(self.evaluation)
        if not self.setup.early_test or n < EARLY_TEST_MIN_SAMPLES or not self.evaluation.arrays:
            return None
        quarter = self.evaluation.take(max(100, n // 4))
        drop = self.measure(model, quarter)[0].drop
        m = len(quarter)
        var = max(drop, 1.0 / m) * (1 - min(drop, 1.0)) / m
        return drop if drop - EARLY_TEST_Z * math.sqrt(var) > self.setup.max_drop else None

    # -- building chains -----------------------------------------------------------------------------------------
    def _remember(self, key: str, built: _Built) -> None:
        self._memory[key] = built
        self._memory.move_to_end(key)
        while len(self._memory) > 1 and sum(tensor_bytes(b.model) for b in self._memory.values()) > MEMORY_CACHE_BYTES:
            self._memory.popitem(last=False)
        if self.cache_dir is not None and tensor_bytes(built.model) < PROTOBUF_LIMIT:
            name = _cache_name(key)
            path = self.cache_dir / f"{name}.onnx"
            if not path.exists():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                save_model(built.model, path, external_data=False, check=False)
                meta = {"key": key, "recipe": recipe_to_json(built.recipe), "summaries": built.summaries, "drop": built.drop}
                tmp = self.cache_dir / f".{name}.{os.getpid()}.json.tmp"
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, self.cache_dir / f"{name}.json")

    def cached(self, key: str) -> _Built | None:
        """A chain built before, by this worker (memory) or any worker (the cache folder)."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.cache_dir is None:
            return None
        name = _cache_name(key)
        meta_path, model_path = self.cache_dir / f"{name}.json", self.cache_dir / f"{name}.onnx"
        if not (meta_path.exists() and model_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                return None
            # as saved: normalising (shape inference) would add value_info and make the rebuilt chain differ in bytes
            model = load_model(model_path, check=False, normalize=False)
            built = _Built(model, recipe_from_json(meta["recipe"]), list(meta["summaries"]), meta.get("drop"))
        except (OnnxoptError, OSError, ValueError, KeyError):
            return None  # a damaged cache entry: rebuild
        self._memory[key] = built
        return built

    def _prefix_drop(self, built: _Built) -> float:
        if built.drop is None:
            built.drop = self.measure(built.model)[0].drop
        return built.drop

    def build(self, recipe: Sequence[Step]) -> _Built:
        """The chain's model, from its longest cached prefix; budgets of budget-reading steps resolved on the way."""
        start, current = 0, None
        for i in range(len(recipe), 0, -1):
            current = self.cached(recipe_key(recipe[:i]))
            if current is not None:
                start = i
                break
        if current is None:
            current = _Built(self.reference, (), [])
        for i in range(start, len(recipe)):
            step = recipe[i]
            if step.pass_name in self.setup.budget_passes and step.max_drop is None:
                # what the steps before left of the budget; a prefix that scored above the reference (noise on a
                # small set, usually) does not widen it
                left = self.setup.max_drop - max(0.0, self._prefix_drop(current) if current.recipe else 0.0)
                step = Step(step.pass_name, step.settings, max(0.0, left))
            model, report = run_step(current.model, step, registry=self.registry, sessions=self.sessions,
                                     calibration=self.calibration, evaluation=self.evaluation, seed=self.setup.seed,
                                     metrics=self.declared, registered_metrics=self.registered)
            current = _Built(model, (*current.recipe, step), [*current.summaries, f"{report.pass_name}: {report.summary}"])
            self._remember(recipe_key(current.recipe), current)
        return current

    # -- one candidate -------------------------------------------------------------------------------------------
    def evaluate(self, recipe: Sequence[Step]) -> dict[str, Any]:
        """Build and measure one candidate; a failing pass is a failed candidate, not a failed search."""
        start = time.perf_counter()
        out: dict[str, Any] = {"key": recipe_key(recipe), "recipe": recipe_to_json(recipe), "worker": os.getpid()}
        try:
            built = self.build(recipe)
            out["recipe"] = recipe_to_json(built.recipe)
            out["summaries"] = built.summaries
            early = self._early_reject(built.model)
            if early is not None:
                out.update(status="rejected", drop=early,
                           note=f"drop {early * 100:.2f} pt on the first quarter of the data, over budget beyond doubt")
            else:
                measured, session = self.measure(built.model)
                built.drop = measured.drop
                out.update(status="ok", **measured.fields())
                if tensor_bytes(built.model) < PROTOBUF_LIMIT:
                    blob = serialize_model(built.model)
                    # equal digests: equal models (ladder rungs that round to the same channel counts)
                    size, out["digest"] = len(blob), hashlib.sha256(blob).hexdigest()[:16]
                else:
                    size = tensor_bytes(built.model)
                shapes = {k: tuple(v.shape) for k, v in self.feed.items()}
                macs = count_macs(built.model, shapes)
                # screening: workers share the cores, so a short cap; the front is timed again serially
                screen = self.timing.with_budget(min(self.timing.time_budget, SCREEN_SECONDS))
                timed = time_candidate(self.ref_session, session, self.feed, screen)
                out.update(size_bytes=size, parameters=count_parameters(built.model),
                           macs=macs.total if not macs.unknown else None, **latency_fields(timed))
        except OnnxoptError as err:
            out.update(status="failed", error=str(err))
        except Exception as err:  # a pass's bug must not end the search: the candidate is marked failed
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            out.update(status="failed", error=f"{type(err).__name__}: {first[:300]}")
        out["seconds"] = time.perf_counter() - start
        return out


_EVALUATOR: Evaluator | None = None


def init_worker(setup: WorkerSetup) -> None:
    """Process-pool initializer: Ctrl-C is the driver's to handle; load the evaluator once per worker."""
    global _EVALUATOR
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _EVALUATOR = Evaluator(setup)


def evaluate_in_worker(recipe: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluate a recipe (JSON form) in a worker set up by :func:`init_worker`."""
    assert _EVALUATOR is not None, "init_worker was not called"
    return _EVALUATOR.evaluate(recipe_from_json(recipe))
