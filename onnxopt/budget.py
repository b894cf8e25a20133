"""Budget-first: one helper turns ``--max-drop`` into a pass's strength.

A lossy pass declares a *ladder* of settings, weaker to stronger
(:meth:`onnxopt.Pass.budget_ladder`); :func:`strongest_within` finds the
strongest rung whose drop, measured on the selection part of ``--eval``,
stays within the budget (top-1 outputs measured by 1 - agreement with the
reference, an upper bound on the accuracy lost) — by bisection (the drop is assumed to grow along
the ladder; the rung returned was always measured within) or greedily
(weaker to stronger, stopping at the first rung over). Passes that search
inside their run (lowrank's MACs share) call the same helper with a ladder
of their own values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

__all__ = ["BudgetChoice", "Drop", "strongest_within", "margin", "BUDGET_TOLERANCE", "SHARE_METRICS", "gated_as_drop"]

#: Drops within this of the budget count as within (float noise of a share).
BUDGET_TOLERANCE = 1e-12

T = TypeVar("T")


@dataclass
class BudgetChoice(Generic[T]):
    """What a budget search chose, every rung it tried (label and drop on the selection part), and why."""

    limit: float
    chosen: int | None = None
    value: T | None = None
    label: str | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)
    rungs: list[str] = field(default_factory=list)
    reason: str = ""
    samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "samples": self.samples, "chosen": self.label, "rung": self.chosen, "ladder": self.rungs,
                "tried": self.tried, "reason": self.reason}


#: Drop metrics that are a share of samples (a binomial standard error applies); others (cosine, SNR, textmap) get
#: one standard error from the spread of their per-sample values (:func:`onnxopt.metrics.sample_error`).
SHARE_METRICS = frozenset({"top1", "match"})


@dataclass(frozen=True)
class Drop:
    """A measured drop and the basis of its margin: when it is a share of samples (top-1, match), how many;
    otherwise (cosine, SNR, textmap), ``error``, one standard error from the per-sample drops when known."""

    value: float
    samples: int | None = None
    error: float | None = None

    @property
    def margin(self) -> float:
        """One standard error: binomial for a share of ``samples``, else ``error`` (0 when neither is known)."""
        if self.samples:
            return margin(self.value, self.samples)
        return float(self.error) if self.error is not None and math.isfinite(self.error) else 0.0


def gated_as_drop(drop: float, gated: Mapping[str, Any] | None, samples: int | None) -> Drop:
    """The gated output's drop (a row of :func:`onnxopt.validate.gated_drop`) with its margin's basis: one standard
    error of its per-sample drops when the row has one (cosine, SNR, textmap; top-1 of a sequence or map), else
    binomial over ``samples`` for a share of them (top-1 of one position per sample, match)."""
    error = gated.get("error") if gated is not None else None
    if gated is not None and gated["metric"] in SHARE_METRICS and error is None:
        return Drop(drop, samples)
    return Drop(drop, None, error)


def _count(n: float) -> str:
    return {1.0: "one", 2.0: "two", 3.0: "three"}.get(float(n), f"{n:g}")


def margin(drop: float, samples: int | None) -> float:
    """One standard error of a drop measured as a share of ``samples`` (binomial; at least that of one sample in n)."""
    if not samples:
        return 0.0
    p = min(max(drop, 1.0 / samples), 1.0)
    return float(math.sqrt(p * (1.0 - min(max(drop, 0.0), 1.0)) / samples))


def strongest_within(
    ladder: Sequence[T],
    measure: Callable[[T], float | Drop],
    limit: float,
    *,
    labels: Sequence[str] | None = None,
    mode: Literal["bisect", "greedy"] = "bisect",
    what: str = "drop on the selection part",
    samples: int | None = None,
    standard_errors: float = 1.0,
) -> BudgetChoice[T]:
    """The strongest rung of ``ladder`` (ordered weaker to stronger) whose ``measure`` stays within ``limit``.

    bisect: the strongest rung first (done when it is within), then bisection
    between "no change" and it; greedy: weaker to stronger until a rung is
    over. None is chosen when even the weakest rung measured is over.

    With ``samples`` (how many the drop was measured on), or when ``measure``
    returns a :class:`Drop` that says so, a rung counts as within only when
    its drop plus one standard error (:func:`margin`) is: picking the
    strongest of several noisy measurements flatters it (the winner's curse),
    and the confirmation part is what it is judged on. A drop that is not a
    share of samples (1 - cosine, textmap) gets the :class:`Drop`'s ``error``
    instead (the standard error of its per-sample values), when known.
    ``standard_errors`` widens that margin: a second search on the same
    samples (a refinement of a rung already chosen on them) needs more.
    """
    labels = list(labels) if labels is not None else [str(v) for v in ladder]
    choice: BudgetChoice[T] = BudgetChoice(limit, rungs=labels, samples=samples)
    if not ladder:
        choice.reason = "empty ladder: nothing to choose"
        return choice
    measured: dict[int, float] = {}
    pads: dict[int, float] = {}
    kinds: dict[int, str] = {}  # which margin a rung got: a share's (binomial) unless noted

    def within(i: int) -> bool:
        if i not in measured:
            result = measure(ladder[i])
            drop = result if isinstance(result, Drop) else Drop(float(result), samples)
            measured[i], pads[i] = float(drop.value), drop.margin * standard_errors
            if pads[i] and not drop.samples:
                kinds[i] = "per-sample"
            choice.tried.append({"setting": labels[i], "drop": measured[i], "margin": pads[i],
                                 "within": measured[i] + pads[i] <= limit + BUDGET_TOLERANCE})
        return measured[i] + pads[i] <= limit + BUDGET_TOLERANCE

    if mode == "greedy":
        best = None
        for i in range(len(ladder)):
            if not within(i):
                break
            best = i
    else:
        strongest = len(ladder) - 1
        if within(strongest):
            best = strongest
        else:
            low, high = -1, strongest  # low: within (or "no change"), high: over
            while high - low > 1:
                mid = (low + high) // 2
                if within(mid):
                    low = mid
                else:
                    high = mid
            best = low if low >= 0 else None
    if best is None:
        weakest = min(measured)
        choice.reason = (f"even the weakest setting tried ({labels[weakest]}) measured a {what} of "
                         f"{measured[weakest] * 100:.2f} pt, over the budget of {limit * 100:.2f} pt")
        return choice
    choice.chosen, choice.value, choice.label = best, ladder[best], labels[best]
    stronger = [labels[i] for i in measured if i > best]
    pad = pads[best]
    choice.reason = (f"{labels[best]}: the strongest setting measured within {limit * 100:.2f} pt "
                     f"({what} {measured[best] * 100:.2f} pt"
                     + ((f" + {pad * 100:.2f} pt, {_count(standard_errors)} standard error"
                         + ("s" if standard_errors != 1 else "") + " of "
                         + ("its per-sample values)" if kinds.get(best) else "a share of samples)")) if pad else ")")
                     + (f"; stronger settings tried were over ({', '.join(stronger)})" if stronger else
                        "; it is the strongest rung of the ladder"))
    return choice
