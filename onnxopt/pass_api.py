"""The pass contract: what a compression pass is, what it gets, what it returns.

A pass is a small class with a typed ``Config`` (a frozen dataclass whose
fields all have defaults and docs) and a ``run`` that takes a model it owns
(the manager hands it a clone, so the caller's model is never touched),
the config and a :class:`PassContext`, and returns a :class:`PassResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import onnx_ir as ir

from onnxopt.config import config_to_dict
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError, PassSkipped
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

__all__ = [
    "Pass",
    "PassContext",
    "PassSpace",
    "PassReport",
    "PassResult",
    "Skip",
    "CALIBRATION_DATA",
    "EVALUATION_DATA",
]

#: Values of ``Pass.requires``.
CALIBRATION_DATA = "calibration_data"
EVALUATION_DATA = "evaluation_data"

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class PassSpace:
    """The settings of one pass that `onnxopt search` tries.

    ``kind="ladder"``: ordered from light to aggressive (a setting that breaks
    the budget alone ends the ladder); ``kind="alternatives"``: unordered, each
    is tried. ``fixed`` keys go with every setting.
    """

    kind: Literal["ladder", "alternatives"]
    settings: tuple[dict[str, Any], ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    #: the pass reads ``ctx.max_drop`` (accuracy-driven fallback, rank search): it gets what is left of the budget;
    #: None (only from a ``--space`` file that does not say): as the pass's own space declares
    uses_budget: bool | None = False

    def resolved(self) -> list[dict[str, Any]]:
        """Each setting merged with the fixed keys, in order."""
        return [{**self.fixed, **s} for s in self.settings]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fixed": self.fixed, "settings": list(self.settings), "uses_budget": bool(self.uses_budget)}


@dataclass(frozen=True)
class Skip:
    """Something a pass left alone (a layer, a tensor, a subgraph) and why."""

    target: str
    reason: str


@dataclass
class PassReport:
    """What a pass did: a one-line summary, figures, per-item rows, what it skipped and why."""

    pass_name: str
    summary: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    modified: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: what the user must not miss (an int8 model slower than fp32, ...): printed first, before everything else
    warnings: list[str] = field(default_factory=list)

    def skip(self, target: str, reason: str) -> None:
        self.skipped.append(Skip(target, reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "summary": self.summary,
            "config": self.config,
            "modified": self.modified,
            "figures": self.figures,
            "items": self.items,
            "skipped": [{"target": s.target, "reason": s.reason} for s in self.skipped],
            "notes": self.notes,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class PassResult:
    """The new model, whether anything changed, and the report."""

    model: ir.Model
    modified: bool
    report: PassReport


@dataclass
class PassContext:
    """What passes share in one run.

    ``calibration`` comes from ``--data``; ``evaluation`` is the *selection*
    part of ``--eval`` (:mod:`onnxopt.split`): whatever a pass chooses on data
    it chooses on this, never on the confirmation part the gate and the
    report are measured on (``confirmation``, for the manager's ledger only:
    a pass must not read it). ``rng`` is seeded per run; ``sessions`` makes
    ORT sessions; ``base_dir`` resolves relative paths in configs (for example
    distill's teacher); ``max_drop`` is what is left of the run's accuracy
    budget, for passes that search within it; ``metrics`` declares the drop
    metric per output (``--metric``) and ``registered_metrics`` holds the
    plugins' metrics it may name.
    """

    sessions: SessionFactory = field(default_factory=SessionFactory)
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    max_drop: float | None = None
    seed: int = 0
    confirmation: Dataset | None = None
    metrics: dict[str, str] = field(default_factory=dict)
    registered_metrics: dict[str, Any] = field(default_factory=dict)
    _reference_outputs: tuple[Any, Any, dict[str, np.ndarray]] | None = field(default=None, repr=False, compare=False)

    def require_calibration(self, pass_name: str) -> Dataset:
        """The calibration data, or a one-line error naming the flag that gives it."""
        if self.calibration is None:
            raise OnnxoptError(f"pass {pass_name} needs calibration data", "give it with --data calib.npz")
        return self.calibration

    def require_evaluation(self, pass_name: str) -> Dataset:
        """The evaluation data, or a one-line error naming the flag that gives it."""
        if self.evaluation is None:
            raise OnnxoptError(f"pass {pass_name} needs evaluation data", "give it with --eval eval.npz")
        return self.evaluation

    def drop(self, reference: ir.Model, candidate: ir.Model, data: Dataset | None = None) -> float:
        """Drop of ``candidate`` against ``reference`` on the selection part (see :meth:`measured_drop`)."""
        return self.measured_drop(reference, candidate, data).value

    def measured_drop(self, reference: ir.Model, candidate: ir.Model, data: Dataset | None = None, *,
                      candidate_outputs: dict[str, np.ndarray] | None = None) -> Any:
        """Drop of ``candidate`` against ``reference`` on the selection part, as choosers measure it.

        Every output by its metric (:func:`onnxopt.validate.gated_drop`); top-1
        outputs by 1 - agreement with the reference even when the data has
        labels (an upper bound on the accuracy lost: flips do not cancel).
        Returns an :class:`onnxopt.budget.Drop`: the drop and its margin's
        basis (how many samples for a share: top-1, match; else one standard
        error from the per-sample drops: cosine, SNR, textmap). ``candidate_outputs``: every output of
        ``candidate`` on the data when the caller ran it already (saves a second run).
        """
        from onnxopt.validate import budget_drop, collect_outputs, one_session_at_a_time

        dataset = data or self.evaluation or self.calibration
        if dataset is None:
            raise OnnxoptError("measuring an accuracy drop needs data", "give --eval eval.npz (or --data)")
        cached = None
        if not one_session_at_a_time(reference, candidate):
            # searches measure many candidates against one reference: its outputs are kept (one entry, which also
            # holds the reference and data alive, so ids cannot be reused while cached)
            entry = self._reference_outputs
            if entry is None or entry[0] is not reference or entry[1] is not dataset:
                session = self.sessions.create(reference)
                entry = (reference, dataset, collect_outputs(session, dataset, [o.name for o in session.get_outputs()]))
                self._reference_outputs = entry
            cached = entry[2]
        return budget_drop(reference, candidate, dataset, self.sessions, declared=self.metrics,
                           registered=self.registered_metrics, reference_outputs=cached, use_labels=False,
                           candidate_outputs=candidate_outputs if cached is not None else None)


class Pass(Generic[ConfigT]):
    """Base class of every compression pass.

    Subclasses set ``name`` (the CLI spelling), ``Config``, optionally
    ``requires`` (:data:`CALIBRATION_DATA`, :data:`EVALUATION_DATA`),
    ``lossless`` (outputs must stay numerically equal) and ``final`` (must be
    the last pass of a chain, e.g. quantization), ``comparable = False`` when
    the output model's inputs/outputs differ from the input's (validation
    against the original is then skipped), and implement :meth:`run`.
    The class docstring's first line is the pass's summary in `onnxopt passes`.

    What the tools around the passes need to know of a pass, the pass says
    itself, so that the core names no pass: :meth:`search_space` (what
    `onnxopt search` tries; a pass that declares one is searched by default),
    ``search_base`` (a lossless clean-up every search candidate starts from),
    ``corpus_variants`` and :meth:`corpus_settings` (how the corpus checks run it).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    requires: ClassVar[frozenset[str]] = frozenset()
    lossless: ClassVar[bool] = False
    final: ClassVar[bool] = False
    comparable: ClassVar[bool] = True
    search_base: ClassVar[bool] = False
    #: where the pass goes in the default search chain (lower first): passes that change the structure
    #: (prune, low-rank) before those that rewrite weights in place (clustering); ``final`` passes go last anyway
    search_order: ClassVar[int] = 50
    #: extra corpus runs past the defaults: the corpus's weights are small, so with defaults most passes find
    #: little to do there; these make more of the pass's rewriting meet the corpus's graphs
    corpus_variants: ClassVar[tuple[dict[str, Any], ...]] = ()

    @classmethod
    def search_space(cls, objective: str = "size") -> PassSpace | None:
        """What `onnxopt search` tries of this pass for ``objective`` (``size`` or ``latency``).

        None (the default): the pass is not searched unless named in ``--passes``,
        and is then tried once with its defaults.
        """
        return None

    @classmethod
    def corpus_settings(cls, model_path: Path) -> dict[str, Any]:
        """Settings the pass needs to run on an arbitrary corpus model at all (e.g. a teacher model)."""
        return {}
    #: Config keys that set the pass's strength: a user who sets any of them chooses it, the budget does not.
    budget_keys: ClassVar[tuple[str, ...]] = ()
    #: The pass turns ``ctx.max_drop`` into its strength inside ``run`` (through :mod:`onnxopt.budget`).
    budget_inside: ClassVar[bool] = False

    def budget_ladder(self, config: ConfigT, ctx: PassContext) -> list[tuple[str, ConfigT]]:
        """Settings from weaker to stronger, each a label and a config, for :func:`onnxopt.budget.strongest_within`.

        The manager tries them under ``--max-drop`` (with ``--eval``) unless
        the user set one of :attr:`budget_keys`; empty means no ladder.
        """
        return []

    def budget_refinement(self, model: ir.Model, config: ConfigT, ctx: PassContext,
                          explicit: frozenset[str] = frozenset(),
                          over: ConfigT | None = None) -> list[tuple[str, ConfigT]]:
        """Stronger alternatives to the rung the ladder chose (``config``), weaker to stronger, each a label and a
        config: e.g. per-layer settings, each proposed to store less than ``config`` does.

        The manager measures them like the ladder's rungs (the same drop and
        margin on the selection part, by bisection) and keeps the strongest
        within the budget that is also smaller on disk than ``config``'s
        result; otherwise ``config``'s result stays. ``model`` is what the
        pass runs on; ``explicit`` holds the config keys the user set (their
        values must stay); ``over`` is the weakest rung stronger than
        ``config`` that the ladder measured over the budget (None: none was).
        Empty (the default) means no refinement.
        """
        return []

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, model: ir.Model, config: ConfigT, ctx: PassContext) -> PassResult:
        """Compress ``model`` (a copy this pass owns) and return the result with its report."""
        raise NotImplementedError

    def new_report(self, config: ConfigT) -> PassReport:
        """An empty report for this pass and config."""
        return PassReport(pass_name=self.name, config=config_to_dict(config))

    def apply(self, model: ir.Model, config: ConfigT | None = None, ctx: PassContext | None = None) -> PassResult:
        """Run the pass on a clone of ``model``; a :class:`PassSkipped` becomes an unmodified result."""
        config = config if config is not None else self.Config()
        ctx = ctx if ctx is not None else PassContext()
        start = time.perf_counter()
        try:
            result = self.run(model.clone(), config, ctx)
        except PassSkipped as skipped:
            report = self.new_report(config)
            report.summary = f"skipped: {skipped.reason}"
            result = PassResult(model, False, report)
        result.report.seconds = time.perf_counter() - start
        result.report.modified = result.modified
        return result


#: A function a plugin calls to register a pass class.
RegisterPass = Callable[[type[Pass[Any]]], None]
