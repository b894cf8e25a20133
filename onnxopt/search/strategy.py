"""Which candidates to try next: per-pass sensitivity first, then combinations ranked by prediction, then a
local refinement around the best.

The strategy is a pure function of the results so far (``propose``), so a
resumed search proposes the same candidates and finds the finished ones in
its JSON. Three stages:

1. **sensitivity** — each pass alone (after the lossless base), its ladder
   from light to aggressive, stopping at the first setting over budget;
   alternatives (calibration methods) are each tried.
2. **combine** — chains of two or more passes built from the settings that
   stayed within budget and paid off alone, ranked by a prediction (drops add
   up, size and latency ratios multiply, corrected per pair of passes by what
   the chains measured so far showed), best predicted objective first; only
   chains predicted within budget are tried.
3. **refine** — around the best measured chain: one step more aggressive on
   each ladder, each other alternative, each missing pass at its lightest,
   each pass left out; repeated while the best improves.

Throughout, the budget prunes a lattice: a chain at least as aggressive in
every pass as one measured over budget is not tried, nor one of the same
passes at most as aggressive as one measured within it (it cannot be
smaller or faster).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from onnxopt.search.recipe import Recipe, Step, recipe_key
from onnxopt.search.space import Space

__all__ = ["Strategy", "Proposal", "within_budget", "objective_key", "OBJECTIVES", "STAGES"]

OBJECTIVES = ("size", "latency")
STAGES = ("base", "sensitivity", "combine", "refine")
#: A pass setting "pays off" alone when it cuts the size by this share, or the latency by the next (timing noise).
MIN_GAIN = 0.02
MIN_LATENCY_GAIN = 0.08
#: Ridge term of the pass-interaction fit (in units of measured chains): a pair seen once moves the prediction
#: most of the way to what was measured, never all the way.
INTERACTION_RIDGE = 0.25
_NO_CORRECTION = np.zeros(3)

Choice = dict[str, int]


@dataclass(frozen=True)
class Proposal:
    """A candidate to evaluate, and the stage that proposed it."""

    recipe: Recipe
    stage: str

    @property
    def key(self) -> str:
        return recipe_key(self.recipe)


def within_budget(result: Mapping[str, Any] | None, max_drop: float) -> bool:
    """True for a candidate measured whole and within ``max_drop`` by the budget's rule: its drop plus one standard
    error (``drop_margin``: binomial for a share of samples, else from the per-sample drops) within, as apply's
    ladders choose."""
    if not result or result.get("status") != "ok":
        return False
    return float(result["drop"]) + float(result.get("drop_margin") or 0.0) <= max_drop + 1e-12


def _over(result: Mapping[str, Any] | None, max_drop: float) -> bool:
    # failed candidates count as over: a more aggressive setting of a pass that failed is not tried either
    return bool(result) and not within_budget(result, max_drop)


def objective_key(result: Mapping[str, Any], objective: str) -> tuple[float, float]:
    """Sort key of a measured candidate: size then latency, or latency then size (smaller is better)."""
    size = float(result.get("size_bytes") or math.inf)
    latency = float(result.get("latency_ratio") or math.inf)
    return (size, latency) if objective == "size" else (latency, size)


class Strategy:
    """Proposes candidates over ``space`` for an accuracy budget and an objective."""

    def __init__(self, space: Space, max_drop: float, objective: Literal["size", "latency"], base: str | None) -> None:
        self.space = space
        self.max_drop = max_drop
        self.objective = objective
        self.base: Recipe = (Step(base),) if base else ()
        self._resolved = {p: space.entries[p].resolved() for p in space.passes}

    # -- chains <-> choices --------------------------------------------------------------------------------------
    def chain(self, choice: Mapping[str, int]) -> Recipe:
        """The recipe of a choice ``{pass: setting index}``, passes in chain order after the base."""
        return (*self.base, *(Step(p, dict(self._resolved[p][choice[p]])) for p in self.space.passes if p in choice))

    def choice_of(self, recipe: list[dict[str, Any]]) -> Choice | None:
        """The choice a stored recipe made, or None when it is not a chain of this space."""
        steps = recipe[len(self.base):]
        if [s["pass"] for s in recipe[: len(self.base)]] != [s.pass_name for s in self.base]:
            return None
        choice: Choice = {}
        for step in steps:
            name = step.get("pass")
            if name not in self.space.entries or name in choice:
                return None
            index = self.space.index(name, step.get("settings", {}))
            if index is None:
                return None
            choice[name] = index
        return choice

    def _ladder(self, name: str) -> bool:
        return self.space.entries[name].kind == "ladder"

    def _at_least(self, a: Choice, b: Choice) -> bool:
        """``a`` is at least as aggressive as ``b`` in every pass of ``b``."""
        for name, index in b.items():
            if name not in a:
                return False
            if a[name] != index and not (self._ladder(name) and a[name] > index):
                return False
        return True

    # -- the proposal --------------------------------------------------------------------------------------------
    def propose(self, results: Mapping[str, Mapping[str, Any]], running: AbstractSet[str]) -> tuple[list[Proposal], bool]:
        """Candidates to start now, best first, and whether the search is over (nothing left, nothing running)."""
        measured = {k: r for k, r in results.items() if k not in running}
        choices = [(c, r) for r in measured.values() if (c := self.choice_of(r.get("recipe", []))) is not None]
        over = [c for c, r in choices if _over(r, self.max_drop)]
        within = [c for c, r in choices if within_budget(r, self.max_drop)]

        def open_(choice: Choice) -> bool:
            key = recipe_key(self.chain(choice))
            if key in measured or key in running:
                return False
            if any(self._at_least(choice, o) for o in over):
                return False  # at least as aggressive as a chain over budget
            # a chain of the same passes, each no more aggressive than in one within budget, cannot beat it (other
            # pass sets can: a pass may grow a model, e.g. int8 weights after 4-bit clustering)
            return not any(w != choice and w.keys() == choice.keys() and self._at_least(w, choice) for w in within)

        base_key = recipe_key(self.base)
        stage_one: list[Proposal] = []
        if self.base and base_key not in measured and base_key not in running:
            stage_one.append(Proposal(self.base, "base"))
        waiting = base_key in running
        for name in self.space.passes:
            entry = self.space.entries[name]
            for index in range(len(entry.settings)):
                key = recipe_key(self.chain({name: index}))
                if key in running:
                    waiting = True
                    if entry.kind == "ladder":
                        break
                    continue
                if key in measured:
                    if entry.kind == "ladder" and _over(measured[key], self.max_drop):
                        break
                    continue
                stage_one.append(Proposal(self.chain({name: index}), "sensitivity"))
                if entry.kind == "ladder":
                    break
        if stage_one or waiting:
            return stage_one, False

        singles = {name: {i: measured.get(recipe_key(self.chain({name: i}))) for i in range(len(self.space.entries[name].settings))}
                   for name in self.space.passes}
        base = measured.get(base_key) if self.base else None
        combine = [Proposal(self.chain(c), "combine") for c in self._combinations(singles, base, choices) if open_(c)]
        if combine:
            return combine, False
        if running:  # the refinement starts from the best chain: wait for every combination
            return [], False

        best = min(((c, r) for c, r in choices if within_budget(r, self.max_drop) and c),
                   key=lambda cr: objective_key(cr[1], self.objective), default=None)
        if best is None:
            return [], True
        refine = [Proposal(self.chain(c), "refine") for c in self._neighbours(best[0], singles, (base or {}).get("digest")) if open_(c)]
        return refine, not refine

    def _single_figures(self, result: Mapping[str, Any] | None, base: Mapping[str, Any] | None) -> tuple[float, float, float] | None:
        """(drop, size ratio, latency ratio) of a pass alone against the base; None when not measured whole."""
        if not result or result.get("status") != "ok" or not result.get("size_bytes"):
            return None
        base_ok = base is not None and base.get("status") == "ok" and base.get("size_bytes")
        size = float(result["size_bytes"]) / float(base["size_bytes"]) if base_ok else 1.0  # type: ignore[index]
        base_latency = float(base.get("latency_ratio") or 1.0) if base_ok else 1.0  # type: ignore[union-attr]
        latency = float(result.get("latency_ratio") or base_latency) / base_latency
        return max(0.0, float(result["drop"])), size, latency

    def _interactions(self, singles: Mapping[str, Mapping[int, Mapping[str, Any] | None]], base: Mapping[str, Any] | None,
                      measured: Sequence[tuple[Choice, Mapping[str, Any]]]) -> dict[tuple[str, str], np.ndarray]:
        """Per pair of passes, a correction learned from the chains measured so far: (drop added, log size factor,
        log latency factor) by ridge least squares over the pairs each chain holds. Passes interact (int8 weights
        after 4-bit clustering grow the file again); the prediction learns it from the first such chain."""
        rows, targets = [], []
        pairs: dict[tuple[str, str], int] = {}
        for choice, result in measured:
            if len(choice) < 2 or result.get("status") != "ok" or not result.get("size_bytes"):
                continue
            parts = [self._single_figures(singles[n].get(i), base) for n, i in choice.items()]
            got = self._single_figures(result, base)
            if got is None or any(p is None for p in parts):
                continue
            drop = sum(p[0] for p in parts)  # type: ignore[index]
            size = math.prod(p[1] for p in parts)  # type: ignore[index]
            latency = math.prod(p[2] for p in parts)  # type: ignore[index]
            keys = [tuple(sorted(pair)) for pair in itertools.combinations(choice, 2)]
            rows.append([pairs.setdefault(k, len(pairs)) for k in keys])  # type: ignore[arg-type]
            targets.append((got[0] - drop, math.log(got[1] / size), math.log(got[2] / latency)))
        if not rows:
            return {}
        x = np.zeros((len(rows), len(pairs)))
        for r, cols in enumerate(rows):
            x[r, cols] = 1.0
        y = np.asarray(targets)
        coef = np.linalg.solve(x.T @ x + INTERACTION_RIDGE * np.eye(len(pairs)), x.T @ y)
        return {k: coef[i] for k, i in pairs.items()}

    def _combinations(self, singles: Mapping[str, Mapping[int, Mapping[str, Any] | None]],
                      base: Mapping[str, Any] | None, measured: Sequence[tuple[Choice, Mapping[str, Any]]]) -> list[Choice]:
        options: dict[str, list[tuple[int, float, float, float]]] = {}
        for name, by_index in singles.items():
            usable = []
            seen: set[str] = set()
            for index, result in by_index.items():
                figures = self._single_figures(result, base) if within_budget(result, self.max_drop) else None
                if figures is None:
                    continue
                digest = result.get("digest")  # type: ignore[union-attr]
                if base is not None and digest is not None and digest == base.get("digest"):
                    continue  # the same model as the base: nothing done
                if figures[1] > 1 - MIN_GAIN and figures[2] > 1 - MIN_LATENCY_GAIN:
                    continue  # did not pay off alone
                if digest is not None and digest in seen:
                    continue  # the same model as a lighter rung (rounding): one option
                if digest is not None:
                    seen.add(digest)
                usable.append((index, *figures))
            if usable and not self._ladder(name):
                usable = [min(usable, key=lambda u: (u[1], u[2] if self.objective == "size" else u[3]))]
            options[name] = usable
        learned = self._interactions(singles, base, measured)
        ranked = []
        names = [n for n in self.space.passes if options.get(n)]
        for picks in itertools.product(*[[None, *options[n]] for n in names]):
            chosen = [(n, p) for n, p in zip(names, picks) if p is not None]
            if len(chosen) < 2:
                continue
            correction = sum((learned.get(tuple(sorted((a, b))), _NO_CORRECTION)  # type: ignore[arg-type]
                              for (a, _), (b, _) in itertools.combinations(chosen, 2)), _NO_CORRECTION)
            drop = sum(p[1] for _, p in chosen) + float(correction[0])
            if drop > self.max_drop:
                continue
            size = math.prod(p[2] for _, p in chosen) * math.exp(correction[1])
            latency = math.prod(p[3] for _, p in chosen) * math.exp(correction[2])
            key = (size, latency) if self.objective == "size" else (latency, size)
            ranked.append((key, drop, {n: p[0] for n, p in chosen}))
        ranked.sort(key=lambda item: (item[0], item[1]))
        return [c for _, _, c in ranked]

    def _neighbours(self, best: Choice, singles: Mapping[str, Mapping[int, Mapping[str, Any] | None]],
                    base_digest: str | None) -> list[Choice]:
        out: list[Choice] = []
        for name in self.space.passes:
            entry = self.space.entries[name]
            if name in best:
                if entry.kind == "ladder":
                    up = self._next_distinct(name, best[name], singles[name])
                    if up is not None:
                        out.append({**best, name: up})
                else:
                    out.extend({**best, name: i} for i in range(len(entry.settings)) if i != best[name])
            else:
                first = self._next_distinct(name, -1, singles[name], like=base_digest)
                if first is not None:
                    out.append({**best, name: first})
            if name in best and len(best) > 1:  # passes interact: one may undo another's savings
                out.append({k: v for k, v in best.items() if k != name})
        return out

    def _next_distinct(self, name: str, index: int, singles: Mapping[int, Mapping[str, Any] | None],
                       like: str | None = None) -> int | None:
        """The next setting after ``index`` whose model alone differs from this one's (or from the model with
        digest ``like``); None when there is none."""
        here = like if like is not None else (singles.get(index) or {}).get("digest")
        for up in range(index + 1, len(self.space.entries[name].settings)):
            digest = (singles.get(up) or {}).get("digest")
            if digest is None or digest != here:
                return up
        return None
