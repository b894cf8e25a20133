"""prune: dependency-aware structured channel pruning on the ONNX graph, with least-squares reconstruction.

How it is built, one idea per module:

- :mod:`.constants` makes per-channel constants and computed Reshape targets plain initializers;
- :mod:`.groups` and :mod:`.ops` find the channel dependency groups (the per-op propagation table);
- :mod:`.saliency` scores channels (L1/L2, activations, share of the next layer's output);
- :mod:`.selection` picks channels greedily by least-squares cost on Gram matrices (``saliency=reconstruct``);
- :mod:`.distribution` and :mod:`.cost` decide how many each group keeps (uniform, sensitivity, targets);
- :mod:`.compensate` folds what removed channels add whatever the input (a BatchNorm shift through the
  activation) into the readers' biases;
- :mod:`.surgery` removes them physically, so the model is smaller and faster on any runtime;
- :mod:`.design` and :mod:`.reconstruct` refit the layers that read pruned channels on calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, PassSkipped, PassSpace, hookimpl, option
from onnxopt.data import Dataset
from onnxopt.graph import Names, cleanup, is_onnx_op, is_weight, name_nodes
from onnxopt.io import infer_shapes
from onnxopt.measure import count_macs, count_parameters
from onnxopt.sessions import SessionFactory

from .compensate import compensate, constant_parts
from .constants import fold_constant_chains, fold_reshape_targets
from .cost import CostModel
from .distribution import (
    SCAN_SAMPLES,
    Limits,
    build_keep,
    cached_scan,
    plan_for_target,
    scan_key,
    scan_sensitivity,
    sensitivity_plan,
    uniform_plan,
)
from .groups import ChannelGraph, Group
from .ops import discover
from .reconstruct import compose_log, refit_consumers, refit_from_grams
from .saliency import activation_scores, activation_stats, energy_scores, magnitude_scores, probe_values, ranking
from .selection import greedy_orders, input_grams
from .surgery import SliceLog, apply_surgery

__all__ = ["PruneConfig", "PrunePass", "prune_model"]

Saliency = Literal["l1", "l2", "activation", "reconstruct"]
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class PruneConfig:
    """Keys of the prune pass."""

    ratio: float = option(0.5, "share of each group's channels removed (ignored when target_macs/target_params is set)",
                          unit="share")
    target_macs: float | None = option(None, "MACs the pruned model may keep, as a share of the dense model's "
                                             "(e.g. 0.5); replaces ratio", unit="share")
    target_params: float | None = option(None, "parameters the pruned model may keep, as a share of the dense "
                                               "model's; replaces ratio", unit="share")
    saliency: Saliency = option("l1", "which channels go: l1/l2 = smallest weights, data-free (a following BatchNorm's "
                                      "gamma, else the readers' weight energy on the channel, else the filter's "
                                      "L1/L2 norm); activation = smallest mean "
                                      "|x| on --data; reconstruct = those the next layers can best do without "
                                      "(greedy least squares on --data), then a least-squares refit of those layers")
    reconstruct: bool | None = option(None, "refit the layers that read pruned channels by ridge least squares on "
                                             "--data (always on with saliency=reconstruct); unset: on whenever --data "
                                             "is given (measured: benchmarks/results/prune_refit.md), false to turn it off")
    distribution: Literal["uniform", "sensitivity"] = option(
        "uniform", "one ratio for every group, or per-group ratios from a sensitivity scan on --data "
                   "that meet the same MACs (or the target)")
    rounds: int = option(1, "prune in this many steps, re-scoring (and refitting) between them")
    round_to: int = option(0, "round kept channels to a multiple of this (8 or 16 suit SIMD kernels); 0 keeps each "
                              "layer's own alignment (largest power of two up to 16 dividing its channels, at most "
                              "a quarter of them)")
    min_channels: int = option(1, "fewest channels a group keeps")
    keep_first_last: bool = option(False, "leave the first layer's outputs and the last layer's inputs whole")
    attention_heads: bool = option(False, "prune whole attention heads (Q/K/V projections split by a Reshape)")
    exclude: tuple[str, ...] = option((), "node-name globs (fnmatch) whose channel groups are left alone")
    ridge: float = option(1e-3, "ridge term of the refit, relative to the mean input energy")
    compensate: bool = option(False, "fold each removed channel's constant part (what it outputs with its filters "
                                    "zeroed: a BatchNorm shift through the activation) into the readers' biases, measured "
                                    "on one zero input (needs static input dims, --data or --shape)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        for name in ("target_macs", "target_params"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.target_macs is not None and self.target_params is not None:
            raise ValueError("give target_macs or target_params, not both")
        if self.rounds < 1 or self.round_to < 0 or self.min_channels < 1:
            raise ValueError("rounds and min_channels must be at least 1, round_to at least 0")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")

    @property
    def refit(self) -> bool:
        return bool(self.reconstruct) or self.saliency == "reconstruct"

    @property
    def needs_data(self) -> bool:
        return self.refit or self.saliency == "activation" or self.distribution == "sensitivity"


def _edge_layers(model: ir.Model) -> set[str]:
    """Names of the first compute layers after the graph inputs and the last ones before the outputs."""
    found: set[str] = set()
    frontier = [v for v in model.graph.inputs if v.const_value is None]
    seen: set[int] = set()
    while frontier:
        value = frontier.pop()
        for node, _ in value.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if is_onnx_op(node, *COMPUTE_OPS) and is_weight(node.inputs[1] if len(node.inputs) > 1 else None):
                found.add(node.name or "")
            else:
                frontier.extend(o for o in node.outputs if o is not None)
    back = list(model.graph.outputs)
    seen.clear()
    while back:
        node = back.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if is_onnx_op(node, *COMPUTE_OPS) and is_weight(node.inputs[1] if len(node.inputs) > 1 else None):
            found.add(node.name or "")
        else:
            back.extend(v for v in node.inputs if v is not None)
    return found


def _input_shapes(data: Dataset | None) -> dict[str, tuple[int, ...]] | None:
    """Input shapes (batch 1) from the data, so MACs are counted at the size the model really runs at."""
    if data is None:
        return None
    if data.arrays:
        return {k: (1, *v.shape[1:]) for k, v in data.arrays.items()}
    if data.feeds:
        # sequence / optional inputs (lists, None) have no shape to count MACs at
        return {k: (1, *v.shape[1:]) if v.ndim else () for k, v in data.feeds[0].items() if isinstance(v, np.ndarray)}
    return None


def _orders(model: ir.Model, cg: ChannelGraph, groups: list[Group], config: PruneConfig, ctx: PassContext,
            data: Dataset | None) -> dict[str, np.ndarray]:
    """Per group, its prunable channels least important first, by the configured saliency."""
    if config.saliency in ("l1", "l2"):
        return ranking(groups, magnitude_scores(cg, 1 if config.saliency == "l1" else 2))
    assert data is not None
    stats = activation_stats(model, cg, probe_values(cg), data, ctx.sessions, ctx.progress)
    if config.saliency == "activation":
        return ranking(groups, activation_scores(cg, stats))
    return ranking(groups, energy_scores(cg, stats))  # the plan's sizes; greedy selection refines the order after


def _compensated(model: ir.Model, cg: ChannelGraph, keep: np.ndarray, config: PruneConfig, sessions: SessionFactory,
                 shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[ChannelGraph, list[str]]:
    """Fold the removed channels' constant parts into their readers' biases; the channel graph to cut with, and notes.

    Discovery runs again after: a bias made here (a Conv had none) must be
    sliced with its layer's outputs; the ids come out the same, so ``keep`` holds.
    """
    parts = constant_parts(model, cg, keep, sessions, shapes)
    if parts is None:
        return cg, ["constant parts of removed channels not folded: an input dim other than the batch is unknown "
                    "(give --data or --shape)"]
    if not parts:
        return cg, []
    done, left = compensate(cg, parts, Names(model))
    notes = [f"constant parts of removed channels folded into {done} reader bias(es)"] if done else []
    if left:
        notes.append(f"constant parts not folded into {len(left)} reader(s) without a bias to hold them: {', '.join(left[:5])}")
    return (discover(model, attention_heads=config.attention_heads) if done else cg), notes


def _pruned_copy(model: ir.Model, config: PruneConfig, order: Mapping[str, np.ndarray], counts: Mapping[str, int],
                 protect: set[str], grams: dict[str, np.ndarray] | None, sessions: SessionFactory,
                 shapes: Mapping[str, tuple[int, ...]] | None) -> ir.Model:
    """A pruned clone (discovery on a clone gives the same channel ids, so ``order`` still applies).

    With ``grams`` (the refit is on) the readers are refit from them, so the
    sensitivity scan judges each group by what is left after reconstruction.
    """
    clone = model.clone()
    cg = discover(clone, attention_heads=config.attention_heads)
    groups = cg.groups(exclude=config.exclude, protect=sorted(protect))
    keep = build_keep(cg, groups, order, counts)
    if config.compensate:
        cg, _ = _compensated(clone, cg, keep, config, sessions, shapes)
    log = apply_surgery(clone, cg, keep)
    if grams:
        refit_from_grams(model, clone, cg.consumers, log, grams, config.ridge)
    return clone


@dataclass
class _Round:
    """What one round decided: kept counts per group, and the reached share of a target."""

    counts: dict[str, int]
    reached: float | None = None
    scan_reused: bool = False


def _plan(model: ir.Model, cg: ChannelGraph, groups: list[Group], order: Mapping[str, np.ndarray], config: PruneConfig,
          ctx: PassContext, data: Dataset | None, step: float, dense: Mapping[str, int], sizes: Mapping[str, int],
          shapes: Mapping[str, tuple[int, ...]] | None, protect: set[str]) -> _Round:
    """Kept channels per group for this round; ``step`` in (0, 1] is how far along the schedule it is."""
    limits = Limits(config.min_channels, config.round_to)
    target_kind = "macs" if config.target_macs is not None else "params" if config.target_params is not None else None
    if target_kind is None and config.distribution == "uniform":
        ratio = 1.0 - (1.0 - config.ratio) ** step
        return _Round(uniform_plan(groups, ratio, limits, sizes))
    cost = CostModel(model, cg, shapes)
    if target_kind is not None:
        share = float(config.target_macs if target_kind == "macs" else config.target_params) ** step  # type: ignore[arg-type]
        target = (target_kind, share)
    else:
        ratio = 1.0 - (1.0 - config.ratio) ** step
        uniform = uniform_plan(groups, ratio, limits, sizes)
        _, macs = cost.evaluate(build_keep(cg, groups, order, uniform))
        target = ("macs", macs / max(dense["macs"], 1))
    ratio_for: Callable[[float], Mapping[str, float]] | None = None
    reused = False
    if config.distribution == "sensitivity":
        assert data is not None

        def scan() -> dict[str, list[tuple[float, float]]]:
            grams = None
            if config.refit:
                # a generator of its own: a scan skipped on a cache hit must not shift the draws of the passes after
                by_layer = input_grams(model, cg.consumers, data.take(SCAN_SAMPLES), ctx.sessions,
                                       np.random.default_rng(ctx.seed), ctx.progress)
                grams = {c.node.name or "": g for c, g in by_layer.items()}
            return scan_sensitivity(model, groups, order, limits, data, ctx.sessions,
                                    lambda m, counts: _pruned_copy(m, config, order, counts, protect, grams, ctx.sessions,
                                                                   shapes), ctx.progress)

        # the same model, order, samples and settings give the same curves whatever the strength: a ladder scans once
        unstrengthened = replace(config, ratio=0.0, target_macs=None, target_params=None, rounds=1)
        key = scan_key(model, order, data, f"{unstrengthened!r}|{sorted(protect)}|{shapes}|{ctx.sessions.providers}|{ctx.seed}")
        curves, reused = cached_scan(key, scan)
        ratio_for = sensitivity_plan(groups, curves)
    counts, reached = plan_for_target(cg, groups, order, cost, target, dense, limits, ratio_for)
    return _Round(counts, reached, reused)


def prune_model(model: ir.Model, config: PruneConfig, ctx: PassContext) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[str, str]], list[str]]:
    """Prune ``model`` in place; return figures, per-group rows, skipped (target, reason) pairs and notes."""
    data = ctx.require_calibration(PrunePass.name) if config.needs_data else None
    name_nodes(model)
    notes: list[str] = []
    notes.extend(infer_shapes(model))  # ranks and sizes decide what is safe to prune
    folded = fold_constant_chains(model)
    if folded:
        notes.append(f"{folded} constant Reshape/Unsqueeze/Cast chain(s) folded into initializers")
    targets = fold_reshape_targets(model)
    if targets:
        notes.append(f"{targets} Reshape target(s) computed from the input's own shape made constant")
    if folded or targets:
        cleanup(model)  # the shape arithmetic left behind would otherwise read the channel count
    shapes = _input_shapes(data if data is not None else ctx.calibration)
    dense_figures = {"params": count_parameters(model), "macs": count_macs(model, shapes).total}
    dense = model.clone() if config.refit else None
    protect = _edge_layers(model) if config.keep_first_last else set()
    origin: SliceLog = {}
    sizes: dict[str, int] = {}
    first: list[Group] = []
    last: _Round | None = None
    refit_rows: list[dict[str, Any]] = []
    kept_now: dict[str, int] = {}
    for r in range(1, config.rounds + 1):
        cg = discover(model, attention_heads=config.attention_heads)
        groups = cg.groups(exclude=config.exclude, protect=sorted(protect))
        if r == 1:
            first = groups
            sizes = {g.key: g.size for g in groups}
            if not any(g.prunable for g in groups):
                reasons = sorted({g.reason or "" for g in groups})
                raise PassSkipped("no prunable channel group" + (f" ({reasons[0]})" if reasons else ""))
        order = _orders(model, cg, groups, config, ctx, data)
        planned = _plan(model, cg, groups, order, config, ctx, data, r / config.rounds, dense_figures, sizes, shapes, protect)
        last = planned
        if planned.scan_reused:
            note = "sensitivity scan reused: same model, data and settings as an earlier run but for the strength"
            if note not in notes:
                notes.append(note)
        if config.saliency == "reconstruct" and data is not None:
            grams = input_grams(model, cg.consumers, data, ctx.sessions, ctx.rng, ctx.progress)
            removals = {g.key: g.size - planned.counts.get(g.key, g.size) for g in groups}
            order.update(greedy_orders(cg, groups, grams, config.ridge, removals))
        kept_now.update({g.key: planned.counts.get(g.key, g.size) for g in groups})
        keep = build_keep(cg, groups, order, planned.counts)
        if config.compensate:
            cg, folded_notes = _compensated(model, cg, keep, config, ctx.sessions, shapes)
            notes.extend(n for n in folded_notes if n not in notes)
        log = apply_surgery(model, cg, keep)
        compose_log(origin, log)
        if config.refit and dense is not None and data is not None:
            rows, refit_notes = refit_consumers(dense, model, cg.consumers, origin, data, ctx.sessions, ctx.rng,
                                                config.ridge, ctx.progress)
            refit_rows = rows
            notes.extend(n for n in refit_notes if n not in notes)
    cleanup(model)
    assert last is not None
    items: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    total = removed = 0
    for g in first:
        if not g.prunable:
            skipped.append((g.name, g.reason or "no prunable channel"))
            continue
        kept = kept_now.get(g.key, g.size)
        width = g.width
        items.append({"group": g.name, "layers": [p.node.name for p in g.producers], "channels": g.size * width,
                      "kept": kept * width, "fixed": len(g.fixed) * width})
        if g.reason:
            notes.append(f"{g.name}: {len(g.fixed) * width} channel(s) kept whole: {g.reason}")
        total += g.size * width
        removed += (g.size - kept) * width
    params, macs = count_parameters(model), count_macs(model, shapes).total
    figures: dict[str, Any] = {
        "channels_before": total, "channels_removed": removed,
        "groups_pruned": sum(1 for i in items if i["kept"] < i["channels"]), "groups_left_alone": len(skipped),
        "params_before": dense_figures["params"], "params_after": params,
        "macs_before": dense_figures["macs"], "macs_after": macs,
    }
    if last.reached is not None:
        figures["target_reached"] = round(last.reached, 4)
        wanted = config.target_macs if config.target_macs is not None else config.target_params
        if wanted is not None and last.reached > wanted + 1e-6:
            notes.append(f"target {wanted} not reachable within the protections; reached {last.reached:.3f}")
    if refit_rows:
        figures["refit_layers"] = len(refit_rows)
        items.extend({"refit": row["layer"], **{k: v for k, v in row.items() if k != "layer"}} for row in refit_rows)
    return figures, items, skipped, notes


class PrunePass(Pass[PruneConfig]):
    """Structured channel pruning: removes whole channels along dependency groups, optional least-squares refit."""

    name = "prune"
    Config = PruneConfig
    search_order = 10
    corpus_variants = ({"ratio": 0.75, "saliency": "activation"},)

    @classmethod
    def search_space(cls, objective: str = "size") -> PassSpace:
        # reconstruct saliency refits the next layer on --data: it keeps most accuracy at high ratios; the
        # sensitivity scan spreads the cut over the groups where it costs least, to a share of the parameters
        # (objective size) or, with objective latency, of the MACs
        key = "target_macs" if objective == "latency" else "target_params"
        return PassSpace("ladder", tuple({key: t} for t in (0.5, 0.35, 0.25, 0.2, 0.15, 0.1)),
                         fixed={"saliency": "reconstruct", "distribution": "sensitivity"})

    budget_keys = ("ratio", "target_macs", "target_params")
    #: MACs the model keeps, weaker to stronger: the ladder --max-drop climbs
    BUDGET_MACS = (0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)

    def budget_ladder(self, config: PruneConfig, ctx: PassContext) -> list[tuple[str, PruneConfig]]:
        """MACs targets from 0.98 down to 0.3; per-group ratios from the measured sensitivity when --data is given."""
        distribution = "sensitivity" if ctx.calibration is not None else config.distribution
        return [(f"target_macs={share:g} ({distribution})",
                 replace(config, target_macs=share, target_params=None, distribution=distribution))
                for share in self.BUDGET_MACS]

    def run(self, model: ir.Model, config: PruneConfig, ctx: PassContext) -> PassResult:
        auto_refit = config.reconstruct is None and ctx.calibration is not None
        # unset, the refit follows the data: with --data it is on (on the digits models, a MobileNetV3-style net
        # and PP-OCR cls it kept agreement where l1 alone lost it: benchmarks/results/prune_refit.md), without
        # --data there is nothing to fit on
        config = replace(config, reconstruct=ctx.calibration is not None) if config.reconstruct is None else config
        report = self.new_report(config)
        if auto_refit:
            report.notes.append("readers refit on --data (prune.reconstruct is on by default with --data; "
                                "--set prune.reconstruct=false turns it off)")
        if config.needs_data and ctx.calibration is None:
            mode = "saliency=" + config.saliency if config.saliency in ("activation", "reconstruct") else (
                "reconstruct=true" if config.reconstruct else "distribution=sensitivity")
            raise OnnxoptError(f"prune with {mode} needs calibration data", "give it with --data calib.npz")
        figures, items, skipped, notes = prune_model(model, config, ctx)
        report.figures = figures
        report.items = items
        for target, reason in skipped:
            report.skip(target, reason)
        report.notes.extend(notes)
        removed = figures["channels_removed"]
        report.summary = (f"removed {removed} of {figures['channels_before']} channels in {figures['groups_pruned']} groups "
                          f"({figures['groups_left_alone']} left alone); params {figures['params_before']:,} -> "
                          f"{figures['params_after']:,}, MACs {figures['macs_before']:,} -> {figures['macs_after']:,}")
        return PassResult(model, removed > 0, report)


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(PrunePass)
