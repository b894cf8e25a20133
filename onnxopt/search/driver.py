"""`onnxopt search`: explore pass settings, evaluate candidates on ORT, keep the Pareto fronts, write the best.

"Best" is the candidate within ``max_drop`` with the smallest file, then the
lowest latency (``objective="size"``, the default), or the lowest latency,
then the smallest file (``objective="latency"``). Latency is screened in the
workers (1 thread each, as a ratio to the reference timed in turns in the
same worker, since parallel workers share the cores); the front members and
the best are then timed again one at a time, in turns with the reference,
and those serial figures are the ones reported and used for the fronts.
Every latency figure is candidate ÷ reference with its interval
(:mod:`onnxopt.timing`); candidates whose intervals overlap the fastest's
count as equally fast, and none is called faster unless its interval is
below 1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.sessions import check_threads
from onnxopt.io import check_model_output, refuse_overwriting, same_file, save_model
from onnxopt.measure import count_macs, count_parameters, file_size
from onnxopt.plugins import Registry, load_registry
from onnxopt.progress import Progress
from onnxopt.search.evaluate import (
    Evaluator,
    WorkerSetup,
    latency_fields,
    time_candidate,
)
from onnxopt.search.executor import Executor, make_executor
from onnxopt.search.pareto import pareto_front
from onnxopt.search.recipe import Step, describe, recipe_from_json, recipe_to_json
from onnxopt.search.space import PassSpace, base_pass, build_space, load_space_file, searchable_passes
from onnxopt.search.state import SearchState, fingerprint
from onnxopt.search.strategy import OBJECTIVES, Strategy, within_budget
from onnxopt.timing import TimingConfig, format_ratio, sample_latency_ms

__all__ = ["SearchResult", "search", "write_candidate", "rebuild_candidate", "mark_fronts", "pick_best", "SIZE_TIE",
           "LATENCY_TIE"]

#: Sizes within this share of the smallest count as a tie, broken by latency (objective size).
SIZE_TIE = 0.01
#: Latencies within this share of the fastest count as a tie (timing noise), broken by size (objective latency);
#: candidates whose measured interval overlaps the fastest's interval count as a tie too.
LATENCY_TIE = 0.03


@dataclass
class SearchResult:
    """The finished (or interrupted) search: its state, the best candidate, and what this run did."""

    state: SearchState
    best: dict[str, Any] | None
    evaluated: int
    reused: int
    written: bool

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return self.state.candidates


def mark_fronts(candidates: Sequence[dict[str, Any]]) -> None:
    """Set each candidate's ``front`` membership: accuracy drop against latency, and against size."""
    ok = [c for c in candidates if c.get("status") == "ok" and c.get("size_bytes") and c.get("latency_ms")]
    for c in candidates:
        c["front"] = {"latency": False, "size": False}
    for axis, attr in (("latency", "latency_ms"), ("size", "size_bytes")):
        for i in pareto_front([(float(c["drop"]), float(c[attr])) for c in ok]):
            ok[i]["front"][axis] = True


def pick_best(candidates: Sequence[dict[str, Any]], max_drop: float, objective: str) -> dict[str, Any] | None:
    """The best candidate within budget for the objective (see the module docstring)."""
    within = [c for c in candidates if within_budget(c, max_drop) and c.get("size_bytes")]
    if not within:
        return None
    inf = float("inf")
    if objective == "size":
        smallest = min(c["size_bytes"] for c in within)
        near = [c for c in within if c["size_bytes"] <= smallest * (1 + SIZE_TIE)]
        return min(near, key=lambda c: (c.get("latency_ms") or inf, c["size_bytes"], c["drop"]))
    fastest = min(within, key=lambda c: c.get("latency_ms") or inf)
    top = fastest.get("latency_ms") or inf
    # a candidate is as fast as the fastest when the timing cannot tell them apart: its interval (on the
    # reference's time) starts below the fastest's upper end, or it is within LATENCY_TIE
    top_high = top * (fastest.get("latency_high") or 0) / fastest["latency_ratio"] if fastest.get("latency_ratio") else top
    near = [c for c in within if (c.get("latency_ms") or inf) <= max(top * (1 + LATENCY_TIE), top_high)
            or _low_ms(c) <= top_high]
    return min(near, key=lambda c: (c["size_bytes"], c.get("latency_ms") or inf, c["drop"]))


def _low_ms(c: dict[str, Any]) -> float:
    """The lower end of a candidate's latency interval in ms (its latency when it has no interval)."""
    ms, ratio, low = c.get("latency_ms"), c.get("latency_ratio"), c.get("latency_low")
    if ms is None:
        return float("inf")
    return ms * low / ratio if ratio and low else ms


def rebuild_candidate(evaluator: Evaluator, candidate: dict[str, Any]) -> ir.Model:
    """A candidate's model from its stored recipe (from the cache folder when it is still there)."""
    return evaluator.build(recipe_from_json(candidate["recipe"])).model


def _reference_figures(evaluator: Evaluator, model_path: Path) -> dict[str, Any]:
    shapes = {k: tuple(v.shape) for k, v in evaluator.feed.items()}
    macs = count_macs(evaluator.reference, shapes)
    same = evaluator._drop(evaluator.ref_outputs, evaluator.ref_outputs, evaluator.evaluation)
    basis, acc = same.basis, same.accuracy
    return {"path": str(model_path), "size_bytes": file_size(model_path), "parameters": count_parameters(evaluator.reference),
            "macs": macs.total if not macs.unknown else None, "accuracy": None if acc is None else acc["reference"],
            "drop_basis": basis, "samples": len(evaluator.evaluation), "output": evaluator.output}


def _remeasure(evaluator: Evaluator, candidates: Sequence[dict[str, Any]], runs: int, progress: Progress) -> float:
    """Time the given candidates one at a time, each paired with the reference; returns the reference's median."""
    refs = []
    task = progress.task("timing the front serially", total=len(candidates))
    for c in candidates:
        model = rebuild_candidate(evaluator, c)
        session = None if evaluator.timing.isolate else evaluator.sessions.create(model)
        timed = time_candidate(evaluator.ref_session, session, evaluator.feed, evaluator.timing,
                               reference=evaluator.reference, candidate=model, sessions=evaluator.sessions)
        refs.append(timed.reference_ms)
        c.update(latency_source="serial", **latency_fields(timed))
        task.advance()
    task.close()
    if refs:
        return sorted(refs)[len(refs) // 2]
    return float(sample_latency_ms(evaluator.ref_session, evaluator.feed, runs=max(1, runs)).mean())


def search(
    model: str | os.PathLike[str],
    *,
    eval_data: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    max_drop: float = 0.01,
    passes: Sequence[str] | str | None = None,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    objective: str = "size",
    workers: int = 2,
    executor: str = "local",
    max_candidates: int = 40,
    space: str | os.PathLike[str] | dict[str, PassSpace] | None = None,
    seed: int = 0,
    threads: int = 1,
    keep_models: bool = False,
    restart: bool = False,
    latency_runs: int = 30,
    latency_batch: int = 1,
    progress: Progress | None = None,
    registry: Registry | None = None,
    timing: TimingConfig | None = None,
    metrics: dict[str, str] | None = None,
    force: bool = False,
) -> SearchResult:
    """Search pass settings for the smallest (or fastest) model within ``max_drop``; see the module docstring.

    With ``report``, the JSON is written after every candidate and a rerun with
    the same path resumes. Candidates' models are cached next to it
    (``<report>.models/``) while the search runs and removed when it completes
    unless ``keep_models``. ``metrics`` declares the drop metric per output
    (``--metric``), as in :func:`onnxopt.api.apply`: every candidate's drop is
    apply's gated drop (every output by its metric, the worst).

    The pick follows apply's budget rule: on the selection part, top-1 outputs
    by 1 - agreement with the reference (labels or not) and within when the
    drop plus one standard error (:func:`onnxopt.budget.margin`) is. The
    pick is then measured on the confirmation part, which no candidate was,
    as apply's gate measures (accuracy against the labels when there are
    labels); over ``max_drop`` there, nothing is written unless ``force``.
    """
    src = Path(model)
    _check_settings(eval_data, max_drop, objective, max_candidates, workers, latency_batch)
    check_threads(threads)
    check_model_output(output, "-o")
    out_path, report_path, plot_path = _check_paths(src, data, eval_data, output, report, plot)
    registry = registry or load_registry()
    from onnxopt.api import _check_metrics  # the API module imports this package's callers; import late

    declared = _check_metrics(metrics, registry)
    if passes is None:  # every installed pass that declares a search space
        names = searchable_passes(registry, objective)
    else:
        names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else list(passes)
    overrides = load_space_file(space) if isinstance(space, (str, os.PathLike)) else space
    search_space = build_space(registry, names, overrides, objective)
    base = base_pass(registry)
    budget_passes = tuple(p for p in search_space.passes if search_space.entries[p].uses_budget)
    progress = progress or Progress(enabled=False)

    fp = fingerprint(src, eval_data, data, max_drop=max_drop, seed=seed, threads=threads, latency_batch=latency_batch,
                     metrics=declared)
    state = SearchState.open(report_path, fp, restart=restart)
    state.settings = {"passes": list(search_space.passes), "base": base, "objective": objective, "max_drop": max_drop,
                      "max_candidates": max_candidates, "workers": workers, "executor": executor, "seed": seed,
                      "threads": threads, "latency_batch": latency_batch, "space": search_space.to_dict(),
                      "data": None if data is None else str(Path(data).resolve()), "eval": str(Path(eval_data).resolve()),
                      "metrics": declared}
    state.complete = False
    state.start_session()

    temp_cache = None
    if report_path is not None:
        cache_dir = report_path.with_name(report_path.name + ".models")
    else:
        temp_cache = cache_dir = Path(tempfile.mkdtemp(prefix="onnxopt-search-"))
    try:
        setup = WorkerSetup(model=str(src.resolve()), eval_data=str(Path(eval_data).resolve()),
                            data=None if data is None else str(Path(data).resolve()), max_drop=max_drop,
                            budget_passes=budget_passes, seed=seed, threads=threads, cache_dir=str(cache_dir.resolve()),
                            latency_runs=latency_runs, latency_batch=latency_batch,
                            timing=timing or TimingConfig(threads=threads), metrics=tuple(sorted(declared.items())))
        # the driver's own evaluator: reference figures, serial timing, the final model (and the only one with --workers 1)
        local = Evaluator(setup)
        state.reference = _reference_figures(local, src.resolve())
        state.save()

        strategy = Strategy(search_space, max_drop, objective, base)  # type: ignore[arg-type]
        results, evaluated, reused = _evaluate_candidates(strategy, state, setup, local, executor, workers,
                                                          max_candidates, progress)

        candidates = state.candidates
        best = _finish(state, local, candidates, max_drop, objective, latency_runs, progress)
        written = False
        state.settings["split"] = local.split.to_dict()
        # this session's own notes on the pick replace a resumed one's
        state.notes = [n for n in state.notes if not n.startswith(("the pick (#", "selection and confirmation are"))]
        if not local.split.disjoint:
            state.notes.append(f"selection and confirmation are the same samples ({local.split.how}): the pick's "
                               "confirmation figure is optimistic")
        if best is not None:
            # picked on the selection part; its honest figure is on the confirmation part, which no candidate saw
            sel, conf = local.split.selection_indices, local.split.confirmation_indices
            if local.split.disjoint and np.intersect1d(sel, conf).size:
                raise OnnxoptError("internal error: the selection and confirmation parts share samples",
                                   "report this as a bug")
            best_model = rebuild_candidate(local, best)
            confirmed = local.confirm(best_model)
            best.update(drop_selection=best["drop"], drop_selection_margin=best.get("drop_margin"),
                        drop_confirmation=confirmed.gate_drop, drop_confirmation_basis=confirmed.basis,
                        drop_confirmation_agreement=confirmed.drop,
                        # the same rule on both parts: what picking on the selection part gained
                        optimism=confirmed.drop - best["drop"],
                        accuracy_confirmation=None if confirmed.accuracy is None else confirmed.accuracy["candidate"],
                        within_budget_confirmation=confirmed.gate_drop <= max_drop + 1e-12)
            if not best["within_budget_confirmation"]:
                state.notes.append(
                    f"the pick (#{best['id']}) is over --max-drop on the confirmation part "
                    f"({confirmed.gate_drop * 100:.2f} pt > {max_drop * 100:.2f} pt): "
                    + ("written all the same (--force)" if force else "nothing written (--force writes it)"))
        if best is not None and out_path is not None and (best["within_budget_confirmation"] or force):
            save_model(best_model, out_path)
            best["file_size_bytes"] = file_size(out_path)
            state.output = str(out_path)
            written = True
        state.complete = True
        state.notes = [n for n in state.notes if not n.startswith("stopped at")]
        if len(results) >= max_candidates:
            state.notes.append(f"stopped at --max-candidates {max_candidates}; raise it to explore further")
        state.save()
        if plot_path is not None:
            from onnxopt.search.plot import plot_search

            plot_search(state, plot_path)
    finally:
        if temp_cache is not None:  # without --report nothing can resume: the cache goes whatever happened
            shutil.rmtree(temp_cache, ignore_errors=True)
    if temp_cache is None and not keep_models:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return SearchResult(state, best, evaluated, reused, written)


def _check_settings(eval_data: object, max_drop: float, objective: str, max_candidates: int, workers: int,
                    latency_batch: int) -> None:
    if eval_data is None:
        raise OnnxoptError("the search needs evaluation data with labels (or reference outputs to agree with)",
                           "give --eval eval.npz")
    if not 0 <= max_drop <= 1:
        raise OnnxoptError(f"--max-drop {max_drop} is not a share between 0 and 1", "e.g. --max-drop 0.01 for 1 pt")
    if objective not in OBJECTIVES:
        raise OnnxoptError(f"--objective {objective} is not one of {', '.join(OBJECTIVES)}", "use size or latency")
    if max_candidates < 1 or workers < 1 or latency_batch < 1:
        raise OnnxoptError("--max-candidates, --workers and --latency-batch must be at least 1",
                           "e.g. --workers 2 --max-candidates 40")


def _check_paths(src: Path, data: str | os.PathLike[str] | None, eval_data: str | os.PathLike[str],
                 output: str | os.PathLike[str] | None, report: str | os.PathLike[str] | None,
                 plot: str | os.PathLike[str] | None) -> tuple[Path | None, Path | None, Path | None]:
    """The output, report and plot paths: none overwrites an input or another, each in an existing folder."""
    out_path, report_path, plot_path = (Path(p) if p is not None else None for p in (output, report, plot))
    writes = [("output", out_path), ("report", report_path), ("plot", plot_path)]
    refuse_overwriting([("the input model", src), ("the --data file", data), ("the --eval file", eval_data)], writes)
    named = [(n, p) for n, p in writes if p is not None]
    for name, p in named:
        if not (p.parent if str(p.parent) else Path(".")).is_dir():
            raise OnnxoptError(f"--{name} folder {p.parent} does not exist", "create it first or choose another path")
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if same_file(a, b):
                raise OnnxoptError(f"--{name_a} and --{name_b} are the same file {a}", "give each its own path")
    return out_path, report_path, plot_path


def _evaluate_candidates(strategy: Strategy, state: SearchState, setup: WorkerSetup, local: Evaluator, executor: str,
                         workers: int, max_candidates: int, progress: Progress) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Ask the strategy for candidates and evaluate them (reusing those the JSON holds) until it is done or
    ``max_candidates`` are in; returns the results by key and how many were evaluated now and reused."""
    stored = state.by_key()
    reused = 0
    evaluated = 0
    pool: Executor | None = None
    running: dict[str, str] = {}  # key -> stage
    results: dict[str, dict[str, Any]] = {}
    task = progress.task(f"search: candidates (at most {max_candidates})", total=max_candidates)
    try:
        while True:
            proposals, finished = strategy.propose(results, set(running))
            started = False
            for proposal in proposals:
                if len(results) + len(running) >= max_candidates:
                    break
                key = proposal.key
                if key in stored:  # finished in an earlier run
                    results[key] = stored[key]
                    reused += 1
                    task.advance()
                    started = True
                    break  # the proposal may change with this result: ask again
                if pool is None:
                    pool = make_executor(executor, setup, workers, local=local)
                if len(running) >= pool.capacity:
                    break
                pool.submit(key, recipe_to_json(proposal.recipe))
                running[key] = proposal.stage
                started = True
            if started:
                continue
            if not running:
                if finished or not proposals or len(results) >= max_candidates:
                    break
                continue
            assert pool is not None
            key, result = pool.next_result()
            stage = running.pop(key)
            results[key] = state.add(result, stage)
            evaluated += 1
            task.advance()
    finally:
        task.close()
        if pool is not None:
            pool.close()
    return results, evaluated, reused


def _finish(state: SearchState, local: Evaluator, candidates: list[dict[str, Any]], max_drop: float, objective: str,
            latency_runs: int, progress: Progress) -> dict[str, Any] | None:
    """Serial timing of the screened fronts and the best, then the final fronts and the pick."""
    for c in candidates:
        if c.get("status") == "ok" and c.get("latency_source") != "serial":
            c["latency_source"] = "screen"
    mark_fronts(candidates)
    screened_best = pick_best(candidates, max_drop, objective)
    to_time = [c for c in candidates if c.get("front", {}).get("latency") or c.get("front", {}).get("size")]
    if screened_best is not None and screened_best not in to_time:
        to_time.append(screened_best)
    to_time = [c for c in to_time if c.get("latency_source") != "serial"]
    if to_time:
        _remeasure(local, to_time, latency_runs, progress)
    serial_refs = [c["reference_latency_ms"] for c in candidates if c.get("latency_source") == "serial"]
    ref_ms = sorted(serial_refs)[len(serial_refs) // 2] if serial_refs else None
    if ref_ms is not None:
        state.reference["latency_ms"] = ref_ms
        # screened candidates: their ratio to the reference in the same worker, on the serial reference time
        for c in candidates:
            if c.get("latency_source") == "screen" and c.get("latency_ratio"):
                c["latency_ms"] = c["latency_ratio"] * ref_ms
    mark_fronts(candidates)
    best = pick_best(candidates, max_drop, objective)
    ref = state.reference
    for c in candidates:
        if c.get("status") == "ok":
            c["within_budget"] = within_budget(c, max_drop)
            # one convention everywhere: candidate ÷ reference (below 1: smaller, faster)
            c["size_ratio"] = c["size_bytes"] / ref["size_bytes"] if c.get("size_bytes") and ref.get("size_bytes") else None
            c.pop("speedup", None)
            c["latency_text"] = format_ratio(c.get("latency_ratio"), c.get("latency_low"), c.get("latency_high"))
            c["label"] = _label(c["recipe"], state)
    state.best = None if best is None else best["id"]
    return best



def _label(recipe: list[dict[str, Any]], state: SearchState) -> str:
    """A short name of a chain: the base clean-up and each pass's fixed keys left out."""
    entries = state.settings.get("space", {}).get("entries", {})
    steps = []
    for step in recipe_from_json(recipe):
        if step.pass_name == state.settings.get("base"):
            continue
        fixed = entries.get(step.pass_name, {}).get("fixed", {})
        shown = {k: v for k, v in step.settings.items() if fixed.get(k, object()) != v}
        steps.append(Step(step.pass_name, shown))
    return describe(steps) if steps else (state.settings.get("base") or "reference")


def write_candidate(report: str | os.PathLike[str], candidate_id: int, output: str | os.PathLike[str]) -> dict[str, Any]:
    """Rebuild candidate ``candidate_id`` of a search JSON from its recipe and save it to ``output`` (``--pick``).

    The model and data are the ones the JSON names; they must be unchanged
    (the fingerprint is checked), so the model is the one that was measured.
    """
    check_model_output(output, "-o")
    report, output = Path(report), Path(output)
    if not report.is_file():
        raise OnnxoptError(f"--report {report}: no such file", "give the JSON of a finished search")
    import json

    try:
        doc = json.loads(report.read_text())
        settings, reference = doc["settings"], doc["reference"]
        candidate = next((c for c in doc["candidates"] if c.get("id") == candidate_id), None)
    except (ValueError, KeyError, TypeError):
        raise OnnxoptError(f"--report {report} is not an onnxopt search JSON", "give the JSON a search wrote") from None
    if candidate is None or candidate.get("status") != "ok":
        ids = ", ".join(str(c["id"]) for c in doc["candidates"] if c.get("status") == "ok")
        raise OnnxoptError(f"search {report} has no measured candidate #{candidate_id}", f"pick one of: {ids}")
    refuse_overwriting([("the input model", reference["path"]), ("the search JSON", report)], [("output", output)])
    fp = fingerprint(reference["path"], settings["eval"], settings["data"], max_drop=settings["max_drop"],
                     seed=settings["seed"], threads=settings["threads"], latency_batch=settings.get("latency_batch", 1),
                     metrics=settings.get("metrics") or {})
    SearchState.open(report, fp)  # a JSON whose model or data changed since is refused
    setup = WorkerSetup(model=reference["path"], eval_data=settings["eval"], data=settings["data"],
                        max_drop=settings["max_drop"], seed=settings["seed"], threads=settings["threads"],
                        metrics=tuple(sorted((settings.get("metrics") or {}).items())))
    save_model(rebuild_candidate(Evaluator(setup), candidate), output)
    return candidate
