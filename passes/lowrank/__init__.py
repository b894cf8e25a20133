"""lowrank: SVD factorization of Gemm/MatMul/Conv weights, applied only where it pays.

A layer ``Y = X·W`` (W of K×N) becomes ``(X·A)·B`` with A of K×r and B of
r×N, which costs r·(K+N) instead of K·N per row; a Conv becomes a conv with
r outputs and a 1×1 conv (or, with ``spatial``, a kh×1 and a 1×kw conv).
The rank comes from one rule: an energy threshold per layer, a fixed ratio,
a model-wide MACs target, or the run's accuracy budget (``--max-drop`` with
``--eval``). ``method=activation`` whitens the SVD by each layer's input
covariance on ``--data`` so the rank keeps the directions the data uses.

Modules: :mod:`.layers` reads nodes as matrices, :mod:`.stats` streams
input statistics, :mod:`.factor` does the (whitened) SVD, :mod:`.ranks`
picks ranks, :mod:`.search` runs candidates, :mod:`.rewrite` writes nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import PassSkipped, Pass, PassContext, PassResult, hookimpl, option
from onnxopt.data import Dataset, input_specs
from onnxopt.io import release_pages
from onnxopt.measure import count_macs, count_parameters
from onnxopt.pass_api import PassReport, PassSpace

from onnxopt_passes.lowrank.factor import Factorization, blas_threads
from onnxopt_passes.lowrank.layers import Layer, find_layers
from onnxopt_passes.lowrank.ranks import allocate_macs, rank_for_energy, rank_for_ratio, rank_not_paying
from onnxopt_passes.lowrank.rewrite import build_model
from onnxopt_passes.lowrank.search import OutputProbe, measured_losses
from onnxopt.budget import Drop, strongest_within
from onnxopt_passes.lowrank.stats import collect_moments

__all__ = ["LowrankConfig", "LowrankPass", "DEFAULT_ENERGY", "factorize_layers"]

#: The energy rule used when no rule is set and no accuracy budget applies.
DEFAULT_ENERGY = 0.9
#: Calibration samples the measured sensitivity runs each probe on (one session per layer and probe rank).
PROBE_SAMPLES = 64
#: Rungs of the MACs-share ladder the --max-drop search bisects.
BUDGET_RUNGS = 128

Plan = list[tuple[Layer, int, Factorization]]


def _share(name: str, value: float | None, *, closed: bool) -> None:
    if value is not None and not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise ValueError(f"{name} must be in (0, 1{']' if closed else ')'}, got {value}")


@dataclass(frozen=True)
class LowrankConfig:
    """Keys of the lowrank pass.

    Set at most one rank rule: energy, ratio or target_macs. With none set, a
    run given --max-drop and data searches the fewest MACs whose measured drop
    stays within the budget; otherwise the rule is energy 0.9.
    """

    energy: float | None = option(None, "share of squared singular values each layer keeps, e.g. 0.9 (with "
                                  "method=activation: of the layer's output energy on --data, which cuts deeper)",
                                  unit="share")
    ratio: float | None = option(None, "rank as a share of each layer's full rank min(K, N)", unit="share")
    target_macs: float | None = option(None, "model-wide MACs as a share of the original's, e.g. 0.5; ranks go "
                                       "greedily by fidelity lost per MAC saved", unit="share")
    margin: float = option(0.8, "factor a layer only when r·(K+N) <= margin·K·N (its parameters and MACs)", unit="share")
    method: Literal["svd", "activation"] = option("svd", "svd: plain truncated SVD; activation: SVD whitened by each "
                                                  "layer's input covariance on --data, with bias correction")
    sensitivity: Literal["auto", "energy", "measured"] = option(
        "auto", "how target_macs and the --max-drop search compare layers: singular-value energy, or the output error "
        "measured per layer on --data (auto: measured when --data is given)")
    spatial: bool = option(False, "split kh×kw Convs (group 1) into kh×1 and 1×kw convs instead of a kh×kw conv "
                           "with r outputs and a 1×1 conv")
    exclude: tuple[str, ...] = option((), "node-name globs left alone")

    def __post_init__(self) -> None:
        _share("energy", self.energy, closed=True)
        _share("ratio", self.ratio, closed=True)
        _share("target_macs", self.target_macs, closed=False)
        _share("margin", self.margin, closed=True)
        rules = [k for k in ("energy", "ratio", "target_macs") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise ValueError(f"set only one of energy, ratio, target_macs (got {', '.join(rules)})")


def _batch1_shapes(model: ir.Model, data: Dataset | None) -> dict[str, tuple[int, ...]] | None:
    """Input shapes of one sample (the model's own batch when fixed), as validation counts MACs."""
    if data is None:
        return None
    first = next(data.batches())
    fixed = any(spec.fixed_batch is not None for spec in input_specs(model))
    # sequence / optional inputs (lists, None) have no shape to count MACs at
    return {k: tuple(v.shape) if fixed or not v.ndim else (1, *v.shape[1:]) for k, v in first.items()
            if isinstance(v, np.ndarray)}


def _finite(weight: np.ndarray) -> bool:
    """True when ``weight`` holds no NaN or infinity; its pages are given back after (a mapped weight is re-read later)."""
    finite = bool(np.isfinite(weight).all())
    release_pages(weight)
    return finite


def _lowest_macs_share(layers: Sequence[Layer], margin: float, total_macs: int) -> float:
    """The model's MACs share with every layer that pays at rank 1: the most any rank rule can take off."""
    saved = sum(layer.macs - layer.factored_macs(1) for layer in layers if layer.max_rank(margin))
    return (total_macs - saved) / max(total_macs, 1)


def factorize_layers(model: ir.Model, ranks: Mapping[str, int], *, spatial: bool = False) -> ir.Model:
    """A copy of ``model`` with the named layers factored by plain SVD at the given ranks, margin ignored.

    For exactness checks and experiments: the pass itself only uses ranks that pay.
    """
    layers, _ = find_layers(model, spatial=spatial, exclude=(), macs_by_node={})
    by_name = {layer.name: layer for layer in layers}
    missing = [name for name in ranks if name not in by_name]
    if missing:
        raise KeyError(f"not factorable layers: {missing}")
    return build_model(model, [(by_name[n], r, Factorization.plain(by_name[n].weight)) for n, r in ranks.items()])


class LowrankPass(Pass[LowrankConfig]):
    """Factor Gemm/MatMul/Conv weights by (activation-aware) SVD where the rank pays."""

    name = "lowrank"
    Config = LowrankConfig
    search_order = 20
    corpus_variants = ({"ratio": 0.5, "margin": 1.0},)

    @classmethod
    def search_space(cls, objective: str = "size") -> PassSpace:
        return PassSpace("ladder", tuple({"energy": e} for e in (0.99, 0.95, 0.9, 0.8)), fixed={"method": "activation"},
                         uses_budget=True)

    budget_keys = ("energy", "ratio", "target_macs")
    budget_inside = True  # with no rank rule set, --max-drop picks the MACs target (onnxopt.budget)

    def run(self, model: ir.Model, config: LowrankConfig, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        shapes = _batch1_shapes(model, ctx.evaluation or ctx.calibration)
        macs = count_macs(model, shapes)
        layers, skipped = find_layers(model, spatial=config.spatial, exclude=config.exclude, macs_by_node=macs.by_node)
        for label, reason in skipped:
            report.skip(label, reason)
        if not layers:
            report.summary = f"nothing to factor: no Gemm/MatMul/Conv with a constant float weight ({len(skipped)} left alone)"
            return PassResult(model, False, report)
        finite = [layer for layer in layers if _finite(layer.weight)]
        for layer in layers:
            if layer not in finite:
                report.skip(layer.name, "weight holds NaN or infinity: an SVD of it means nothing")
        layers = finite
        if not layers:
            report.summary = "nothing to factor: every candidate weight holds NaN or infinity"
            return PassResult(model, False, report)
        if any(not layer.positions_known for layer in layers):
            report.notes.append("some layers' MACs are unknown (shapes not inferred): counted as one row per run")
        try:
            factorizations = self._factorizations(model, layers, config, ctx, report)
        except np.linalg.LinAlgError as err:  # extreme (finite) weights: LAPACK gives up; leave the model as it is
            raise PassSkipped(f"SVD did not converge on these weights ({err})") from None
        plan, rule = self._plan(model, layers, factorizations, config, ctx, macs.total, report)
        if not plan:
            report.summary = f"nothing factored ({rule}): see the skipped layers for why"
            return PassResult(model, False, report)
        result = build_model(model, plan)
        self._describe(report, model, result, plan, config, rule, macs.total, shapes)
        return PassResult(result, True, report)

    # -- factorizations -------------------------------------------------------------------------------------

    def _factorizations(self, model: ir.Model, layers: list[Layer], config: LowrankConfig, ctx: PassContext,
                        report: PassReport) -> list[Factorization]:
        moments = {}
        if config.method == "activation":
            data = ctx.require_calibration(f"{self.name} (method=activation)")
            seen = [layer for layer in layers if layer.rows is not None and not layer.in_subgraph]
            moments = collect_moments(model, seen, data, ctx.sessions, ctx.rng, progress=ctx.progress)
            plain = [layer.name for layer in layers if layer.index not in moments]
            if plain:
                report.notes.append(f"plain SVD (no input statistics: spatial split or inside a subgraph) for "
                                    f"{len(plain)} layer(s): {', '.join(plain[:5])}{' ...' if len(plain) > 5 else ''}")
        out = []
        # OpenBLAS capped at the idle cores: oversubscribed, its eigensolvers run many times slower (factor.py)
        with ctx.progress.task("lowrank: SVD", total=len(layers)) as task, blas_threads():
            for layer in layers:
                m = moments.get(layer.index)
                if m is None:
                    f = Factorization.plain(layer.weight, layer.out_scale)
                else:
                    centered = layer.can_shift_bias  # the bias takes the mean's share of the error
                    f = Factorization.whitened(layer.weight, m.second_moment(centered), m.mean if centered else None,
                                               layer.out_scale)
                # A per-layer rule picks the rank right here, so only that rank's factors are computed and kept;
                # the model-wide rules need the energy curve now and factors up to the largest rank that pays
                # (computed once when first asked, then sliced for every rank a search tries). Either way the
                # weight's pages are given back (re-read from the file if touched again): memory holds factors,
                # not the model.
                keep = layer.max_rank(config.margin)
                if not self._searches(config, ctx):
                    rank = self._layer_rank(layer, f, config)
                    keep = rank if rank_not_paying(layer, rank, config.margin) is None else 0
                    if keep:
                        f.prepare(keep)
                else:
                    f.tail()
                f.totals()  # the report's energy figures need the norm: taken now, not by reading the weight again
                f.release(keep)
                release_pages(layer.weight)
                out.append(f)
                task.advance()
        return out

    @staticmethod
    def _searches(config: LowrankConfig, ctx: PassContext) -> bool:
        """True when the ranks come from a model-wide rule (MACs target or accuracy budget), not per layer."""
        if config.target_macs is not None:
            return True
        no_rule = config.ratio is None and config.energy is None
        return no_rule and ctx.max_drop is not None and (ctx.evaluation is not None or ctx.calibration is not None)

    @staticmethod
    def _layer_rank(layer: Layer, factorization: Factorization, config: LowrankConfig) -> int:
        """The rank a per-layer rule (ratio, or energy with its default) gives the layer."""
        if config.ratio is not None:
            return rank_for_ratio(layer, config.ratio)
        energy = config.energy if config.energy is not None else DEFAULT_ENERGY
        return rank_for_energy(factorization, energy, layer.max_rank(config.margin))

    # -- rank rules ----------------------------------------------------------------------------------------

    def _plan(self, model: ir.Model, layers: list[Layer], factorizations: list[Factorization], config: LowrankConfig,
              ctx: PassContext, total_macs: int, report: PassReport) -> tuple[Plan, str]:
        margin = config.margin
        no_rule = config.target_macs is None and config.ratio is None and config.energy is None
        if no_rule and ctx.max_drop is not None and (ctx.evaluation is not None or ctx.calibration is not None):
            return self._plan_budget(model, layers, factorizations, config, ctx, total_macs, report)
        if config.target_macs is not None:
            losses = self._losses(model, layers, factorizations, config, ctx, report)
            budget = config.target_macs * total_macs - (total_macs - sum(layer.macs for layer in layers))
            ranks = allocate_macs(layers, losses, margin, budget)
            rule = f"target_macs {config.target_macs:g}"
            lowest = _lowest_macs_share(layers, margin, total_macs)
            if lowest > config.target_macs:
                report.notes.append(f"target_macs {config.target_macs:g} is out of reach: with every layer that pays at "
                                    f"rank 1 the model keeps {lowest:.3f} of its MACs; that is what was done")
        else:
            ranks = [self._layer_rank(layer, f, config) for layer, f in zip(layers, factorizations)]
            energy = config.energy if config.energy is not None else DEFAULT_ENERGY
            rule = f"ratio {config.ratio:g}" if config.ratio is not None else f"energy {energy:g}"
        return self._keep_paying(layers, factorizations, ranks, margin, report), rule

    def _keep_paying(self, layers: Sequence[Layer], factorizations: Sequence[Factorization], ranks: Sequence[int],
                     margin: float, report: PassReport) -> Plan:
        plan: Plan = []
        for layer, factorization, rank in zip(layers, factorizations, ranks):
            reason = rank_not_paying(layer, max(rank, 1), margin)
            if rank == 0 and reason is None:
                reason = "kept whole by the MACs allocation: its loss per MAC saved was the highest"
            if reason is not None:
                report.skip(layer.name, reason)
            else:
                plan.append((layer, rank, factorization))
        return plan

    def _losses(self, model: ir.Model, layers: list[Layer], factorizations: list[Factorization],
                config: LowrankConfig, ctx: PassContext, report: PassReport) -> list[np.ndarray]:
        """Each layer's loss at every rank: energy lost, scaled by measured output error when asked."""
        if config.sensitivity == "measured":
            data: Dataset | None = ctx.require_calibration(f"{self.name} (sensitivity=measured)")
        else:
            data = ctx.calibration if config.sensitivity == "auto" else None
        if data is None:
            report.figures["sensitivity"] = "energy"
            return [f.tail() for f in factorizations]
        probe = OutputProbe(model, data.take(PROBE_SAMPLES), ctx.sessions)
        losses, probes = measured_losses(model, layers, factorizations, config.margin, probe, ctx.progress)
        report.figures["sensitivity"] = "measured"
        report.figures["probe_errors"] = {layer.name: {str(r): round(e, 6) for r, e in errors.items()}
                                          for layer, errors in zip(layers, probes) if errors}
        return losses

    def _plan_budget(self, model: ir.Model, layers: list[Layer], factorizations: list[Factorization],
                     config: LowrankConfig, ctx: PassContext, total_macs: int, report: PassReport) -> tuple[Plan, str]:
        """The fewest MACs whose measured drop stays within --max-drop (bisection over the MACs target)."""
        assert ctx.max_drop is not None
        losses = self._losses(model, layers, factorizations, config, ctx, report)
        fixed = total_macs - sum(layer.macs for layer in layers)
        floor = _lowest_macs_share(layers, config.margin, total_macs)
        plans: dict[float, Plan] = {}

        def drop_at(share: float) -> Drop | float:
            ranks = allocate_macs(layers, losses, config.margin, share * total_macs - fixed)
            plans[share] = [(layer, r, f) for layer, f, r in zip(layers, factorizations, ranks) if r]
            return ctx.measured_drop(model, build_model(model, plans[share])) if plans[share] else 0.0

        # the shared budget helper over MACs shares, weaker (near 1) to stronger (the floor): 128 rungs, so
        # bisection takes at most 1 + 7 measurements
        ladder = [float(x) for x in np.linspace(1.0, floor, BUDGET_RUNGS + 1)[1:]]
        with ctx.progress.task("lowrank: accuracy budget search", total=None):
            choice = strongest_within(ladder, drop_at, ctx.max_drop, labels=[f"MACs target {x:.3f}" for x in ladder])
        best = choice.value
        report.figures["budget"] = {**choice.to_dict(), "ladder": f"MACs target from 1 down to {floor:.3f} "
                                    f"({BUDGET_RUNGS} rungs, bisection)"}
        report.figures["budget_search"] = [{"macs_target": ladder[choice.rungs.index(t["setting"])], "drop": round(t["drop"], 5)}
                                           for t in choice.tried]
        if ctx.evaluation is None:
            report.notes.append("the accuracy budget was searched on the calibration data (give --eval for held-out data)")
        elif ctx.confirmation is not None and ctx.confirmation is not ctx.evaluation:
            report.notes.append("the budget search chose on the selection part of --eval; the gate and report use the "
                                "confirmation part")
        rule = f"accuracy budget {ctx.max_drop:g}"
        if best is None:
            for layer in layers:
                report.skip(layer.name, "no factorization stayed within --max-drop")
            return [], rule
        ranks = {id(layer): r for layer, r, _ in plans[best]}
        return self._keep_paying(layers, factorizations, [ranks.get(id(layer), 0) for layer in layers],
                                 config.margin, report), f"{rule} (MACs target {best:.3f})"

    # -- report --------------------------------------------------------------------------------------------

    def _describe(self, report: PassReport, model: ir.Model, result: ir.Model, plan: Plan, config: LowrankConfig,
                  rule: str, macs_before: int, shapes: dict[str, tuple[int, ...]] | None) -> None:
        for layer, rank, factorization in plan:
            row: dict[str, Any] = {
                "layer": layer.name, "op": layer.node.op_type, "form": layer.form,
                "matrix": f"{layer.groups}×{layer.k}×{layer.n}" if layer.groups > 1 else f"{layer.k}×{layer.n}",
                "rank": rank, "full_rank": layer.full_rank,
                "energy_kept": round(factorization.energy_kept(rank), 5),
                "svd": factorization.method,
                "params": [layer.params, layer.factored_params(rank)],
            }
            added, exact = factorization.added_error(rank)
            if factorization.fast:  # what the randomized SVD lost beyond the optimal truncation (share of energy)
                row["svd_added_error"] = f"{added:.2e}" if exact else f"<= {added:.2e}"
            if layer.positions_known:
                row["macs"] = [int(round(layer.macs)), int(round(layer.factored_macs(rank)))]
            report.items.append(row)
        macs_after = count_macs(result, shapes).total
        params_before, params_after = count_parameters(model), count_parameters(result)
        report.figures.update({
            "rule": rule, "method": config.method,
            "layers_factored": len(plan), "layers_left": len(report.skipped),
            "macs_before": macs_before, "macs_after": macs_after,
            "macs_ratio": round(macs_after / macs_before, 4) if macs_before else None,
            "params_before": params_before, "params_after": params_after,
            "params_ratio": round(params_after / params_before, 4) if params_before else None,
        })
        ratio = report.figures["macs_ratio"]
        report.summary = (f"factored {len(plan)} of {len(plan) + len(report.skipped)} layers ({config.method}, {rule}): "
                          f"MACs {ratio if ratio is not None else '?'}×, parameters {report.figures['params_ratio']}×")


@hookimpl
def onnxopt_register_passes(register: Any) -> None:
    register(LowrankPass)
