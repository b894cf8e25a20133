"""quant: int8 QDQ quantization placed where ONNX Runtime fuses it into integer kernels.

Modes:

- ``static`` (default): activation ranges calibrated on ``--data``
  (:mod:`calibration`), QDQ pairs placed per op (:mod:`handlers`,
  :mod:`plan`, :mod:`qdq`), weights int8 per output channel, biases int32;
  with ``--eval`` and ``--max-drop`` the most sensitive nodes go back to
  float until the drop fits (:mod:`fallback`);
- ``dynamic``: MatMul/Gemm weights int8 offline, activations quantized at
  run time (:mod:`dynamic`), no data needed;
- ``weight_bits=4``: int4 block-wise weight-only MatMul/Gemm (:mod:`weight_only`), no data needed.

What must stay exact is excluded automatically with a reason (:mod:`exact`).
The report counts which QDQ groups ONNX Runtime actually ran as integer
kernels (:mod:`kernels`).

Static mode also: rebuilds HardSwish/HardSigmoid/Swish from ops ORT runs as
integer kernels (:mod:`rewrites`); keeps outputs and their parts off a
shared 8-bit scale (:mod:`outputs`); widens weight scales where u8 x s8
pairs could saturate on CPUs without VNNI (:mod:`saturation`); keeps
weights already on an int4 grid in 4 bits (:mod:`grid`); optionally
corrects biases (:mod:`bias_correction`) and migrates LayerNorm outliers
(:mod:`smooth`); and times int8 against fp32, returning to float the kinds
of regions that do not pay and warning first thing when the model is
still slower (:mod:`speed`). int4 weight-only can round by GPTQ (:mod:`gptq`).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, PassSkipped, PassSpace, hookimpl, option
from onnxopt.graph import Names, cleanup, constant_array, is_onnx_op, iter_graphs, iter_nodes, name_nodes, opset_version
from onnxopt.opset import ensure_opset
from onnxopt.timing import ratio_verdict
from onnxopt.validate import latency_feed, one_session_at_a_time

from onnxopt_passes.fold import FoldConfig, FoldPass
from onnxopt_passes.quant.calibration import Method, collect_ranges
from onnxopt_passes.quant.dynamic import CONV_REASON, DynamicStats, dynamic_target, quantize_dynamic_node
from onnxopt_passes.quant.exact import exact_nodes
from onnxopt_passes.quant.exposure import if_of
from onnxopt_passes.quant.fallback import run_fallback
from onnxopt_passes.quant.handlers import ABSORBED_ACTIVATIONS, RULES, PlaceContext, place, rescale_factor
from onnxopt_passes.quant.kernels import ort_kernels
from onnxopt_passes.quant.adaround import AdaRounder, layer_inputs
from onnxopt_passes.quant.grid import grid_levels
from onnxopt_passes.quant.outputs import output_exclusions
from onnxopt_passes.quant.packed import packed_decodes, restore_packed
from onnxopt_passes.quant.plan import Plan, build_plan
from onnxopt_passes.quant.qdq import InsertionStats, insert_qdq
from onnxopt_passes.quant.speed import latency_ratio, quantized_islands, region_kinds
from onnxopt_passes.quant.rewrites import (collapse_float_activations, expand_activations, expansion_groups, fold_bias_add,
                                           fold_hardsigmoid, fuse_tanh_gelu_chains, rewrite_gelu, tag_hardswish_chains)
from onnxopt_passes.quant.weight_only import (WeightOnlyStats, int8_weight_targets, quantize_int4_node, quantize_int8_weight,
                                              store_int8_decoded)

__all__ = ["QuantConfig", "QuantPass", "onnxopt_register_passes"]

_ANCHORS = ("Conv", "MatMul", "Gemm")
#: Opset that per-channel DequantizeLinear (axis) needs, and the one int4 block-wise DequantizeLinear needs.
_PER_CHANNEL_OPSET = 13
_INT4_OPSET = 21
_DYNAMIC_OPSET = 11


@dataclass(frozen=True)
class QuantConfig:
    """Keys of the quant pass."""

    mode: Literal["static", "dynamic"] = option(
        "static", "static: activations calibrated on --data; dynamic: MatMul/Gemm activations quantized at run time")
    method: Method = option("minmax", "calibration method: minmax, percentile, entropy (KL) or mse")
    percentile: float = option(99.999, "share of values the percentile method keeps", unit="%")
    per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)")
    activation_type: Literal["uint8", "int8"] = option(
        "uint8", "activation storage: uint8 asymmetric (fast on x86 ORT) or int8 symmetric (ORT on x86 fuses few int8 groups)")
    weight_bits: Literal[8, 4] = option(8, "8: int8 weights; 4: int4 block-wise weight-only MatMul/Gemm (no data needed)",
                                        unit="bits")
    block_size: int = option(32, "rows per int4 block (power of two, 16 or more)", unit="rows")
    exclude_ops: tuple[str, ...] = option((), "op types kept float, e.g. Softmax,Add")
    exclude_nodes: tuple[str, ...] = option((), "node-name globs kept float, e.g. '*head*'")
    keep_first_last: bool = option(False, "keep the first and the last Conv/MatMul/Gemm float")
    bins: int = option(2048, "histogram bins per tensor (percentile, entropy, mse)", unit="bins")
    fallback: bool = option(True, "with --eval and --max-drop, return the most sensitive nodes to float until within budget")
    fallback_samples: int = option(64, "evaluation samples used to rank node sensitivity", unit="samples")
    fallback_steps: int = option(24, "most nodes the fallback returns to float", unit="nodes")
    check_kernels: bool = option(True, "read ONNX Runtime's optimized graph and report the integer kernels it runs")
    speed_guard: Literal["revert", "warn", "off"] = option(
        "revert", "time int8 against fp32 (paired, interleaved) after quantizing; revert: return to float the kinds of "
                  "regions whose Q/DQ transitions cost more than their integer kernels win, and warn first thing if the "
                  "model is still slower; warn: only warn; off: no timing")
    speed_islands: int = option(
        0, "when the model is still slower than fp32 after the region kinds, the speed guard times at most this many "
           "single connected quantized regions (smallest first), then single Conv/MatMul/Gemm of the regions that did "
           "not pay, back in float, and keeps each that pays; their weights stay int8 in the file with speed_fallback="
           "int8_weights, else go back to float and the file grows (0: region kinds only; 12 suits MobileNetV3-style "
           "nets)", unit="regions")
    speed_fallback: Literal["int8_weights", "off"] = option(
        "int8_weights", "when the int8 model is still slower than fp32 after the region kinds (and speed_islands), the "
                        "speed guard times the model computed in float with its Conv/MatMul/Gemm weights stored int8 "
                        "(decoded once when ONNX Runtime loads it) and keeps that unless it is slower than int8 beyond "
                        "timing noise: the file keeps the "
                        "int8 size, the latency is fp32's; regions speed_islands returns to float keep int8 weights "
                        "the same way; off: compute stays int8 and the slower model is only warned")
    speed_rounds: int = option(7, "at least this many paired blocks (onnxopt.timing) per latency comparison of the speed guard", unit="blocks")
    saturation: Literal["fix", "report", "off"] = option(
        "fix", "u8 x s8 kernels on x86 CPUs without VNNI add weight pairs in int16 and saturate: fix widens, per layer "
               "and channel, the weight scales just enough that no pair can overflow; report only lists the layers")
    rounding: Literal["nearest", "gptq", "adaround"] = option(
        "nearest", "weight rounding: nearest; gptq: second-order (inverse-Hessian) rounding of int4 weight-only "
                   "MatMul/Gemm from the --data activations; adaround: static int8 Conv/MatMul/Gemm weights rounded "
                   "down or up as learned (AdaRound) to keep each layer's output on the --data activations")
    adaround_iterations: int = option(400, "Adam iterations per layer of rounding=adaround", unit="iterations")
    bias_correction: bool = option(
        False, "static int8: measure each quantized Conv/Gemm's mean output error per channel on --data and fold it "
               "into its bias, then quantize again")
    smoothquant: float = option(
        0.0, "SmoothQuant migration strength alpha for static int8: activation outliers after a LayerNormalization "
             "move into the MatMul/Gemm weights reading it (0 = off; 0.5 is the usual choice)")
    keep_outputs_float: bool = option(
        True, "keep float every node whose quantized output would reach a graph output (no shared 8-bit scale over an "
              "output or over the parts a Concat joins into one)")
    rewrite_activations: bool = option(
        True, "rebuild HardSwish/HardSigmoid/Swish from Add/Clip/Mul/Sigmoid so ONNX Runtime runs them as integer kernels")
    float_bias_outputs: bool = option(
        False, "a MatMul/Conv whose output reaches only float readers through a bias Add (or a Div/Mul by a constant) "
               "keeps that output float: for projections with outlier output channels (all-MiniLM-L6-v2: embedding "
               "cosine 0.901 -> 0.991), but ONNX Runtime then runs them in float on weights dequantized at every run")
    gelu: Literal["float", "integer", "integer_erf"] = option(
        "float", "GELU: float leaves it to ONNX Runtime's fused float kernel (an exported tanh chain is put as one op "
                 "first); integer rebuilds tanh-form GELU (Gelu approximate=tanh, com.microsoft FastGelu, the exported "
                 "0.5*x*(1+tanh(...)) chain) as x*sigmoid(...), equal in float up to rounding, which runs as "
                 "QLinearMul/QLinearAdd/QLinearSigmoid; "
                 "integer_erf also erf GELU, through the tanh approximation (lossy: each GELU output moves by at most "
                 "4.7e-4, near x = -2.7). Not the default: on all-MiniLM-L6-v2 the 8-bit polynomial cost the "
                 "embedding cosine 0.991 -> 0.962, and it was not faster than the fused float GELU here")

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile {self.percentile} is not in (0, 100]")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} is not a power of two >= 16 (ONNX Runtime's MatMulNBits needs that)")
        if self.bins < 128:
            raise ValueError(f"bins {self.bins} is under 128")
        if not 0.0 <= self.smoothquant <= 1.0:
            raise ValueError(f"smoothquant {self.smoothquant} is not in [0, 1]")
        if self.speed_islands < 0:
            raise ValueError(f"speed_islands {self.speed_islands} is negative")
        if self.speed_rounds < 3:
            raise ValueError(f"speed_rounds {self.speed_rounds} is under 3 (an interval needs a few rounds)")
        if self.rounding == "adaround" and (self.mode != "static" or self.weight_bits != 8):
            raise ValueError("rounding=adaround is for static int8 (mode=static, weight_bits=8); int4 weight-only takes gptq")
        if self.adaround_iterations < 10:
            raise ValueError(f"adaround_iterations {self.adaround_iterations} is under 10")
        if self.fallback_samples < 1 or self.fallback_steps < 1:
            raise ValueError("fallback_samples and fallback_steps must be positive")


def _prepare(model: ir.Model, opset: int, why: str, report: Any, ctx: PassContext, *, rewrite: bool = False,
             activations: bool = False) -> ir.Model:
    """Weights as initializers, opset high enough, constants and BatchNorm folded (the fold pass), every node
    named; for static mode also the float-exact rewrites that keep more of the graph in integer kernels."""
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    model, note = ensure_opset(model, opset, why=why)
    if note:
        report.notes.append(note)
    # BatchNorm must be in the weights before they are quantized; constant folding turns computed biases into weights
    # max_growth=0: quant needs every weight as a constant, packed (clustered) ones unpacked too
    folded = FoldPass().apply(model, FoldConfig(max_growth=0), PassContext(sessions=ctx.sessions))
    model = folded.model
    if folded.modified:
        report.notes.append(f"folded first (fold pass): {folded.report.summary}")
    if rewrite:
        biases = fold_bias_add(model)
        if biases:
            report.notes.append(f"{biases} Add of a per-channel constant folded into the Conv/Gemm bias before it")
        gates = fold_hardsigmoid(model)
        if gates:
            report.notes.append(f"{gates} HardSigmoid folded into the Conv/Gemm before them as Clip(0, 1) (runs in the integer Conv)")
    if rewrite and activations:
        tagged = tag_hardswish_chains(model)
        if tagged and opset_version(model) < 14:
            try:  # HardSwish is opset 14: needed to put a chain left float back as one op
                model, note = ensure_opset(model, 14, why="a hard-swish chain left float is put back as HardSwish")
                if note:
                    report.notes.append(note)
            except OnnxoptError:
                pass  # chains left float then stay as they are
        if tagged:
            report.notes.append(f"{tagged} exported hard-swish chains (Add/Clip/Mul/Div) recognised: each is judged with "
                                "its Conv by the speed guard and put back as one HardSwish where left float")
        expanded = expand_activations(model)
        if expanded:
            report.notes.append("rebuilt for integer kernels (QLinearAdd/QLinearMul/QLinearSigmoid): " + ", ".join(
                f"{op} x{n}" for op, n in expanded.items()) + "; any left wholly float is put back as the single op")
    name_nodes(model)
    return model


def _grid_storage(model: ir.Model, config: QuantConfig, report: Any) -> tuple[ir.Model, bool]:
    """When some Conv/MatMul/Gemm weight is already on an int4 grid (``cluster.init=grid``), the model at opset 21
    so those weights keep 4-bit storage; returns the model and whether int4 storage is on."""
    pc = PlaceContext(config.activation_type, config.per_channel)
    for node in iter_nodes(model):
        placed = place(node, pc) if node.op_type in _ANCHORS else "not an anchor"
        if isinstance(placed, str) or placed[1].weight is None:
            continue
        w = constant_array(node.inputs[placed[1].weight])
        if w is not None and w.size >= 16 and np.any(w) and grid_levels(w, placed[1].weight_axis) is not None:
            break
    else:
        return model, False
    try:
        upgraded, note = ensure_opset(model, _INT4_OPSET, why="weights on an int4 grid keep 4-bit storage")
    except OnnxoptError as err:
        report.notes.append(f"weights on an int4 grid stored in 8 bits: {err}")
        return model, False
    if note:
        report.notes.append(note)
    return upgraded, True


def _loop_bodies(model: ir.Model) -> list[ir.Graph]:
    """Loop/Scan bodies: calibration cannot read their per-iteration tensors."""
    out = []
    for graph in iter_graphs(model):
        if graph is model.graph:
            continue
        if if_of(model, graph) is None:
            out.append(graph)
    return out


def _explicit_exclusions(model: ir.Model, config: QuantConfig, pc: PlaceContext) -> dict[str, str]:
    """node name -> reason, from exact-value rules, exclude_ops, exclude_nodes, keep_first_last and Loop/Scan bodies."""
    excluded: dict[str, str] = {}
    for node, reason in exact_nodes(model).values():
        excluded.setdefault(node.name or "", reason)
    ops = set(config.exclude_ops)
    for node in iter_nodes(model):
        if node.op_type in ops:
            excluded.setdefault(node.name or "", f"exclude_ops has {node.op_type}")
        elif any(fnmatch.fnmatchcase(node.name or "", glob) for glob in config.exclude_nodes):
            excluded.setdefault(node.name or "", "matches exclude_nodes")
    for body in _loop_bodies(model):
        for node in body:
            excluded.setdefault(node.name or "", "inside a Loop/Scan body: calibration cannot read per-iteration tensors")
    if config.keep_first_last:
        anchors = [n for n in model.graph if n.op_type in _ANCHORS and n.name not in excluded
                   and not isinstance(place(n, pc), str)]
        for node in (anchors[:1] + anchors[-1:]):
            excluded.setdefault(node.name or "", "keep_first_last")
    excluded.pop("", None)
    return excluded


def _nothing_planned(model: ir.Model, plan: Plan, excluded: Mapping[str, str]) -> str:
    """Why a plan holds no node, truthfully: the anchors excluded (and why) or left float by placement."""
    anchors = [n for n in iter_nodes(model) if n.op_type in _ANCHORS]
    if not anchors:
        others = len(int8_weight_targets(model, {})[0])
        return ("nothing to quantize: the model has no Conv, MatMul or Gemm"
                + (f"; its {others} recurrent/embedding weight(s) stay float in static mode (quant.mode=dynamic stores "
                   "them int8 weight-only)" if others else ""))
    reasons = Counter(excluded[n.name] for n in anchors if n.name in excluded)
    reasons.update(r for _, r in plan.skipped.values())
    why = "; ".join(f"{count}× {reason}" for reason, count in reasons.most_common(4)) or "none could be placed"
    return f"nothing to quantize: none of {len(anchors)} Conv/MatMul/Gemm could be quantized ({why})"


def _count_ops(nodes: Mapping[int, Any]) -> dict[str, int]:
    return dict(Counter(p.node.op_type for p in nodes.values()).most_common())


def _no_kernel_note(model: ir.Model) -> str | None:
    skipped = Counter(n.op_type for n in iter_nodes(model)
                      if n.op_type not in RULES and n.op_type not in ABSORBED_ACTIVATIONS
                      and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Cast", "Identity")
                      and any(o.dtype == ir.DataType.FLOAT for o in n.outputs))
    if not skipped:
        return None
    listed = ", ".join(f"{op} x{n}" for op, n in skipped.most_common(8))
    return f"no integer kernel in ONNX Runtime, left float: {listed}"


def _report_placement(report: Any, plan: Plan, stats: InsertionStats, prepared: ir.Model, pc: PlaceContext,
                      reasons: Mapping[str, str]) -> None:
    """Each node left float with its reason, and each quantized node with its kernel and output grid."""
    for node, reason in [*((n, r) for n, r in plan.skipped.values())]:
        report.skip(f"{node.op_type} {node.name}", reason)
    by_name = {n.name: n for n in iter_nodes(prepared)}
    for name, reason in reasons.items():
        node = by_name.get(name)
        if node is not None and not isinstance(place(node, pc), str):
            report.skip(f"{node.op_type} {name}", reason)
    for planned in plan.nodes.values():
        out = planned.output
        params = stats.params.get(out.name) if out is not None and out.name else None
        report.items.append({"node": planned.node.name, "op": planned.node.op_type, "kernel": planned.rule.kernel,
                             "output": None if params is None else {"scale": params.scale, "zero_point": params.zero_point},
                             "relu_folded": planned.absorbed is not None})


def _report_fallback(fallback: Any, max_drop: float, figures: dict[str, Any], report: Any) -> None:
    """The accuracy fallback's figures, its budget choice in the shape every pass reports, and its notes."""
    figures["fallback"] = {"initial_drop": fallback.initial_drop, "final_drop": fallback.final_drop,
                           "within_budget": fallback.within_budget, "kept_float": fallback.kept_float}
    # the same shape as every pass's budget choice (onnxopt.budget.BudgetChoice.to_dict), for the report
    # "within" by the accept rule the fallback used: the drop plus one standard error (onnxopt.budget.Drop.margin)
    tried = [{"setting": "all quantized", "drop": fallback.initial_drop, "margin": fallback.initial_margin,
              "within": fallback.initial_drop + fallback.initial_margin <= max_drop + 1e-12}]
    tried += [{"setting": f"+{k['node']} float", "drop": float(k["drop_after"]), "margin": float(k["margin_after"]),
               "within": float(k["drop_after"]) + float(k["margin_after"]) <= max_drop + 1e-12}
              for k in fallback.kept_float]
    pad = f" + {fallback.final_margin * 100:.2f} pt (one standard error)" if fallback.final_margin else ""
    figures["budget"] = {
        "limit": max_drop, "rung": len(fallback.kept_float) if fallback.within_budget else None,
        "chosen": f"{len(fallback.kept_float)} node(s) back to float" if fallback.within_budget else None,
        "ladder": "nodes back to float, most sensitive first (greedy, on the selection part)", "tried": tried,
        "reason": (f"drop on the selection part {fallback.final_drop * 100:.2f} pt{pad} within {max_drop * 100:.2f} pt"
                   if fallback.within_budget else
                   f"still {fallback.final_drop * 100:.2f} pt{pad} after {len(fallback.kept_float)} node(s) back to float")}
    if fallback.kept_float:
        report.notes.append("accuracy fallback kept float: " + ", ".join(
            f"{k['node']} ({k['op']}, drop {float(k['drop_before']):.4f} -> {float(k['drop_after']):.4f})"
            for k in fallback.kept_float))
    if not fallback.within_budget:
        report.notes.append(f"accuracy fallback could not reach the budget: drop {fallback.final_drop:.4f} after "
                            f"{len(fallback.kept_float)} nodes back to float (raise fallback_steps or exclude more)")


def _report_saturation(stats: InsertionStats | DynamicStats, saturation: str, figures: dict[str, Any], report: Any) -> None:
    """The layers whose int16 weight pairs can saturate on CPUs without VNNI, and whether they were fixed."""
    figures["saturation"] = stats.saturation
    if stats.saturation:
        fixed = [s for s in stats.saturation if s["fixed"] and saturation == "fix"]
        report.notes.append(
            f"{len(stats.saturation)} layers can saturate int16 weight pairs on CPUs without VNNI (vpmaddubsw)"
            + (f"; {len(fixed)} fixed by widening their weight scales (at most "
               f"{max(float(s['max_scale_widening']) for s in fixed):.2f}x)" if fixed else
               "; not fixed (quant.saturation=report): results differ between CPUs"))


class QuantPass(Pass[QuantConfig]):
    """int8 QDQ quantization placed where ONNX Runtime fuses it into integer kernels (static, dynamic, int4 weight-only)."""

    name = "quant"
    budget_inside = True  # its fallback turns ctx.max_drop into the nodes kept float
    Config = QuantConfig
    requires = frozenset()  # static mode asks for --data itself; dynamic and int4 weight-only need none
    final = True
    corpus_variants = ({"mode": "dynamic"}, {"weight_bits": 4, "block_size": 16},
                       {"method": "entropy", "activation_type": "int8", "per_channel": False},
                       # the corpus's models are mostly one or two ops whose result is a graph output, which the
                       # defaults keep float (keep_outputs_float): this run quantizes them all the same
                       {"keep_outputs_float": False})

    @classmethod
    def search_space(cls, objective: str = "size") -> PassSpace:
        # the accuracy-driven fallback returns sensitive nodes to float within what is left of the budget
        return PassSpace("alternatives", tuple({"method": m} for m in ("minmax", "percentile", "entropy")),
                         fixed={"fallback": True}, uses_budget=True)

    def run(self, model: ir.Model, config: QuantConfig, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        name_nodes(model)  # the decodes' readers are found again by name
        decodes = packed_decodes(model)  # before the preparation unpacks them (fold.max_growth=0)
        if config.weight_bits == 4:
            result = self._weight_only(model, config, ctx, report)
        elif config.mode == "dynamic":
            result = self._dynamic(model, config, ctx, report)
        else:
            result = self._static(model, config, ctx, report)
        if decodes:
            # a weight quant left float would otherwise stay unpacked in fp32: the file grows back
            restored, saved = restore_packed(result.model, decodes, ctx.sessions)
            if restored:
                report.notes.append(f"{restored} weight(s) left float keep the packed form they came in (their decode "
                                    f"put back, bit-equal; {saved / 1e3:.1f} kB of fp32 not written)")
                report.figures["packed_weights_kept"] = restored
        return result

    # -- static ---------------------------------------------------------------------------------------------

    def _static(self, model: ir.Model, config: QuantConfig, ctx: PassContext, report: Any) -> PassResult:
        data = ctx.require_calibration(self.name)
        reference = model.clone()
        pc = PlaceContext(config.activation_type, config.per_channel)
        prepared, int4_grid, excluded = self._static_graph(model, data, config, pc, ctx, report)
        anchors_total = Counter(n.op_type for n in iter_nodes(prepared) if n.op_type in _ANCHORS)

        def plan_for(model_: ir.Model, extra: Mapping[str, str]) -> Plan:
            by_name = {n.name: n for n in iter_nodes(model_)}
            reasons = {**excluded, **extra}
            excl = {id(by_name[k]): (by_name[k], r) for k, r in reasons.items() if k in by_name}
            return build_plan(model_, excl, pc, _loop_bodies(model_), float_bias_outputs=config.float_bias_outputs)

        plan = plan_for(prepared, {})
        if not plan.nodes:
            raise PassSkipped(_nothing_planned(prepared, plan, excluded))
        # Rescale outputs are calibrated too: when the fallback breaks the integer chain before a
        # Div/Mul by a constant, that output becomes an ordinary tensor that needs its own range.
        wanted = [*plan.tensors, *(n.outputs[0].name for n in plan.rescales if n.outputs[0].name)]
        ranges = collect_ranges(prepared, wanted, data, ctx.sessions, method=config.method,
                                percentile=config.percentile, bins=config.bins, progress=ctx.progress)
        for node in plan.rescales:  # keep a rescale output on its input's grid, as in the full plan
            source = node.inputs[plan.nodes[id(node)].placement.activations[0]]
            factor = rescale_factor(node)
            if source is not None and source.name in ranges and factor is not None and node.outputs[0].name:
                lo, hi = ranges[source.name]
                ranges[node.outputs[0].name] = (lo * factor, hi * factor)
        unreached: dict[str, str] = {}

        def settle(model_: ir.Model, extra: Mapping[str, str]) -> Plan:
            """The plan without the nodes touching a tensor calibration never reached (an If branch not taken)."""
            plan_ = plan_for(model_, {**unreached, **extra})
            for _ in range(16):  # each round only removes nodes, so this settles fast
                missing = {n for n in plan_.tensors if n not in ranges}
                if not missing:
                    break
                for planned in plan_.nodes.values():
                    touched = {v.name for v in planned.node.inputs if v is not None} | \
                              ({planned.output.name} if planned.output is not None else set())
                    if touched & missing:
                        unreached[planned.node.name or ""] = "the calibration data never reached it (an If branch not taken?)"
                plan_ = plan_for(model_, {**unreached, **extra})
            return plan_

        plan = settle(prepared, {})
        if not plan.nodes:
            raise PassSkipped("nothing to quantize: the calibration data reached none of the quantizable nodes")

        rounder = self._adaround(prepared, plan, data, config, ctx, report) if config.rounding == "adaround" else None

        # the int8-stored float weights of each model build made, by the model's id: every build records its own
        # (empty too), so the live final model's entry is always its own
        decoded: dict[int, WeightOnlyStats] = {}

        def build(kept_float: frozenset[str], stored: frozenset[str] = frozenset()) -> tuple[ir.Model, Plan, InsertionStats]:
            """The QDQ model with ``kept_float`` left float; of those, ``stored`` keep their weights int8 (float compute)."""
            clone = prepared.clone()
            extra = {k: "kept float by the accuracy fallback or the speed guard" for k in kept_float}
            p = settle(clone, extra)
            if collapse_float_activations(clone, set(p.nodes)):
                p = settle(clone, extra)  # the plan again, on the graph with the single ops back
            names = Names(clone)
            stats = insert_qdq(clone, p, ranges, config.activation_type, names, saturation=config.saturation,
                               int4_grid=int4_grid, rounder=rounder)
            decoded[id(clone)] = WeightOnlyStats()
            if stored:
                store_int8_decoded(clone, stored & kept_float, pc, names, decoded[id(clone)], int4_grid=int4_grid)
            cleanup(clone)
            return clone, p, stats

        quantized, plan, stats = build(frozenset())
        if config.bias_correction and self._correct_biases(prepared, quantized, plan, data, ctx, report):
            quantized, plan, stats = build(frozenset())
        fallback = None
        if config.fallback and ctx.evaluation is not None and ctx.max_drop is not None:
            candidates = [(p.node.name or "", p.node.op_type) for p in plan.nodes.values()
                          if p.rule.role not in ("passthrough", "rescale")]
            fallback = run_fallback(lambda kept: build(kept)[0], candidates, reference, ctx, ctx.max_drop,
                                    samples=config.fallback_samples, max_steps=config.fallback_steps)
            kept = frozenset(str(k["node"]) for k in fallback.kept_float)
            quantized, plan, stats = build(kept) if kept else (quantized, plan, stats)
        else:
            kept = frozenset()
        quantized, plan, stats, kept, speed = self._speed_guard(build, quantized, plan, stats, kept, reference, data,
                                                                config, ctx, report, prepared)
        if rounder is not None:
            rounder.close()

        _report_placement(report, plan, stats, prepared, pc, {**excluded, **unreached})
        report.figures = self._static_figures(quantized, plan, stats, config, ctx, report, anchors_total, len(ranges),
                                              len(data), fallback, speed, decoded[id(quantized)])
        return PassResult(quantized, True, report)

    def _adaround(self, prepared: ir.Model, plan: Plan, data: Any, config: QuantConfig, ctx: PassContext,
                  report: Any) -> AdaRounder:
        """The layer inputs' second moments on --data, for AdaRound-rounding the weights as they are written."""
        layers = []
        for planned in plan.nodes.values():
            slot = planned.placement.weight
            w = constant_array(planned.node.inputs[slot]) if slot is not None else None
            if w is not None and planned.node.op_type in ("Conv", "MatMul", "Gemm"):
                layers.append((planned.node, w))
        inputs = layer_inputs(prepared, layers, data, ctx.sessions, progress=ctx.progress)
        report.notes.append(f"AdaRound: weights of {len(inputs)} of {len(layers)} Conv/MatMul/Gemm rounded as learned "
                            f"({config.adaround_iterations} iterations each) on {len(data)} --data samples")
        return AdaRounder(inputs, config.adaround_iterations, ctx.progress, len(inputs))

    def _static_graph(self, model: ir.Model, data: Any, config: QuantConfig, pc: PlaceContext, ctx: PassContext,
                      report: Any) -> tuple[ir.Model, bool, dict[str, str]]:
        """The graph static QDQ is placed on (rewrites, SmoothQuant, int4 grid), and the nodes kept float with why."""
        prepared = _prepare(model, _PER_CHANNEL_OPSET, "per-channel QDQ needs DequantizeLinear with axis", report, ctx,
                            rewrite=True, activations=config.rewrite_activations)
        if config.gelu == "float" and config.rewrite_activations:
            fused = fuse_tanh_gelu_chains(prepared)
            if fused:
                report.notes.append(f"{fused} exported tanh-GELU chains put as one GELU op (float-exact; ONNX Runtime "
                                    "runs it as one fused kernel, where it leaves the chain as a dozen ops)")
                name_nodes(prepared)
        if config.gelu != "float":
            gelus = rewrite_gelu(prepared, erf=config.gelu == "integer_erf")
            if gelus:
                report.notes.append("GELU rebuilt as x*sigmoid(...) for integer kernels (QLinearMul/QLinearAdd/"
                                    "QLinearSigmoid): " + ", ".join(f"{k} x{n}" for k, n in gelus.items())
                                    + "; any left wholly float is put back as one GELU op")
                name_nodes(prepared)
        if config.smoothquant > 0:
            from onnxopt_passes.quant.smooth import smooth_layernorms

            smoothed = smooth_layernorms(prepared, data, ctx.sessions, config.smoothquant, progress=ctx.progress)
            report.notes.append(f"SmoothQuant (alpha {config.smoothquant}): {smoothed} LayerNormalization outputs "
                                "had their outlier channels moved into the weights reading them")
        prepared, int4_grid = _grid_storage(prepared, config, report)
        excluded = _explicit_exclusions(prepared, config, pc)
        if config.keep_outputs_float:
            for name, reason in output_exclusions(prepared, pc).items():
                excluded.setdefault(name, reason)
        for target in int8_weight_targets(prepared, {})[0]:  # what static QDQ does not cover, said per weight
            report.skip(f"{target.readers[0].op_type} weight {target.value.name}",
                        "static int8 quantizes Conv/MatMul/Gemm only: recurrent and embedding weights stay float "
                        "(quant.mode=dynamic stores them int8 weight-only)")
        return prepared, int4_grid, excluded

    def _static_figures(self, quantized: ir.Model, plan: Plan, stats: InsertionStats, config: QuantConfig,
                        ctx: PassContext, report: Any, anchors_total: Counter[str], calibrated: int, samples: int,
                        fallback: Any, speed: dict[str, Any] | None, decoded: WeightOnlyStats) -> dict[str, Any]:
        """The static run's figures, notes and one-line summary (which opens with a warning when int8 is slower)."""
        quantized_ops = _count_ops(plan.nodes)
        figures: dict[str, Any] = {
            "mode": "static", "method": config.method, "activation_type": config.activation_type,
            "per_channel": config.per_channel, "quantized_nodes": quantized_ops,
            "anchor_ops_total": dict(anchors_total), "activation_qdq_pairs": stats.activation_pairs,
            "weights_quantized": stats.weights, "biases_int32": stats.biases,
            "weight_bytes_float": stats.float_weight_bytes, "weight_bytes_int8": stats.int_weight_bytes,
            "weights_stored_int4": stats.int4_weights,
            # Conv/MatMul/Gemm the speed guard returned to float compute whose weights the file still stores int8
            "float_compute_int8_weights": decoded.nodes,
            "weight_bytes_float_compute": decoded.float_weight_bytes,
            "weight_bytes_float_compute_int8": decoded.int_weight_bytes,
            "calibrated_tensors": calibrated, "calibration_samples": samples,
        }
        if fallback is not None:
            _report_fallback(fallback, ctx.max_drop, figures, report)
        if speed is not None:
            figures["speed"] = speed
        if config.saturation != "off":
            _report_saturation(stats, config.saturation, figures, report)
        self._kernels(quantized, config, ctx, figures, report)
        note = _no_kernel_note(quantized)
        if note:
            report.notes.append(note)
        anchors_q = sum(v for k, v in quantized_ops.items() if k in _ANCHORS)
        kernels = figures.get("ort_integer_kernels", {})
        report.summary = (f"static int8 ({config.method}, {config.activation_type} activations): "
                          f"{anchors_q}/{sum(anchors_total.values())} Conv/MatMul/Gemm and "
                          f"{sum(quantized_ops.values()) - anchors_q} other ops quantized"
                          + (f"; ORT runs {sum(kernels.values())} integer kernels" if kernels else "")
                          + (f"; {len(fallback.kept_float)} kept float by fallback" if fallback and fallback.kept_float else "")
                          + (f"; {decoded.nodes} Conv/MatMul/Gemm compute in float on int8-stored weights (int8 "
                             "compute did not pay on this CPU)" if decoded.nodes else ""))
        if report.warnings:
            report.summary = "SLOWER THAN FP32 - " + report.summary
        return figures

    def _speed_guard(self, build: Any, quantized: ir.Model, plan: Plan, stats: InsertionStats, kept: frozenset[str],
                     reference: ir.Model, data: Any, config: QuantConfig, ctx: PassContext, report: Any, prepared: ir.Model
                     ) -> tuple[ir.Model, Plan, InsertionStats, frozenset[str], dict[str, Any] | None]:
        """Time int8 against fp32; return slow region kinds to float (revert) and warn first thing if still slower."""
        speed: dict[str, Any] | None = None
        if config.speed_guard != "off" and one_session_at_a_time(reference, quantized):
            report.notes.append("speed guard skipped: the model is large enough that two sessions at once would double "
                                "the memory (time it with onnxopt's validation instead)")
        elif config.speed_guard != "off":
            feed = latency_feed(data, reference)
            speed = {"tried": []}
            noise = False
            # Past the region kinds, what the guard returns to float keeps its weights int8 in the file, computing in
            # float (decoded when ORT loads the model: no cost at run time); the accuracy fallback's nodes keep
            # float32. The kinds stage itself keeps float32 weights: on a model that stays int8 the size is already
            # won, and int8-rounded weights cost fidelity (PP-OCR cls with all 54 convs' weights int8 and float
            # compute: 1-cos 1.6e-4 on held-out text lines, where its int8 model measured 4.7e-5 to 3.6e-4)
            base = kept
            stored_build = (lambda kept_: build(kept_, kept_ - base)) if config.speed_fallback == "int8_weights" else build  # noqa: E731
            if config.speed_guard == "revert":
                quantized, plan, stats, kept = self._revert_slow_regions(build, quantized, plan, stats, kept, feed,
                                                                         config, ctx, speed, report,
                                                                         expansion_groups(prepared))
            final = latency_ratio(quantized, reference, feed, ctx.sessions, rounds=config.speed_rounds)
            if config.speed_guard == "revert" and config.speed_islands and final.median > 1.0:
                # still slower than fp32: single regions and layers, which only then are worth their timing
                speed["int8_over_fp32_after_kinds"] = final.to_dict()
                before = kept
                quantized, plan, stats, kept = self._revert_slow_islands(stored_build, quantized, plan, stats, kept,
                                                                         feed, config, ctx, speed, report)
                if kept != before:
                    final = latency_ratio(quantized, reference, feed, ctx.sessions, rounds=config.speed_rounds)
            if config.speed_guard == "revert" and config.speed_fallback == "int8_weights" and final.median > 1.0:
                speed["int8_over_fp32_before_fallback"] = final.to_dict()
                # "slower" as the warning below calls it: the interval wholly above 1. ratio_verdict's 3% resolution
                # alone let int8 at 1.03x (1.006-1.058) stay and be warned SLOWER than fp32 on the MobileNetV3-style
                # net of benchmarks/quant_vs_peers.py, while the build taken here is fp32's own graph
                slower = final.low > 1.0 or ratio_verdict(final.low, final.high, final.median) == "slower"
                switched = self._float_compute(stored_build, quantized, plan, kept, feed, config, ctx, speed, report,
                                               slower=slower)
                if switched is not None:
                    quantized, plan, stats, kept = switched
                    final = latency_ratio(quantized, reference, feed, ctx.sessions, rounds=config.speed_rounds)
                    # after ORT folds the decoding this is fp32's own graph: a median over 1 that onnxopt.timing
                    # does not call slower (interval holding 1, or under its resolution) is noted, not warned;
                    # the figure is recorded as measured
                    noise = final.median > 1.0 and ratio_verdict(final.low, final.high, final.median) != "slower"
                    if noise:
                        report.notes.append(f"speed guard: float compute with int8 weights timed {final.median:.2f}x "
                                            f"fp32 (95% interval {final.low:.2f}-{final.high:.2f}): the same graph as "
                                            "fp32's once ORT folds the decoding, within timing resolution")
            speed["int8_over_fp32"] = final.to_dict()
            if final.median > 1.0 and not noise:
                verdict = "SLOWER than fp32" if final.low > 1.0 else "SLOWER than fp32 by its median (not beyond timing noise)"
                report.warnings.append(
                    f"the int8 model is {verdict}: {final.median:.2f}x the float latency (95% interval "
                    f"{final.low:.2f}-{final.high:.2f}, {final.rounds} paired blocks, batch of one, this CPU); "
                    + ("regions that did not pay are already back in float: " if speed["tried"] else "")
                    + "consider keeping this model float or quantizing with --set quant.exclude_ops=...")

        return quantized, plan, stats, kept, speed

    def _correct_biases(self, prepared: ir.Model, quantized: ir.Model, plan: Plan, data: Any, ctx: PassContext,
                        report: Any) -> bool:
        """Fold the quantized layers' mean output errors into the float biases of ``prepared``; True if any moved."""
        from onnxopt_passes.quant.bias_correction import apply_corrections, bias_corrections

        names = {p.node.name for p in plan.nodes.values() if p.node.op_type in ("Conv", "Gemm")}
        layers = [n for n in prepared.graph if n.name in names and n.op_type in ("Conv", "Gemm")]
        shifts = bias_corrections(prepared, quantized, layers, data, ctx.sessions, progress=ctx.progress)
        corrected = apply_corrections(prepared, layers, shifts)
        if not corrected:
            return False
        worst = max(float(np.abs(v).max()) for v in shifts.values())
        report.notes.append(f"bias correction: {corrected} Conv/Gemm biases shifted by their mean int8 output error "
                            f"per channel on --data (largest shift {worst:.3g})")
        return True

    def _revert_slow_regions(self, build: Callable[[frozenset[str]], tuple[ir.Model, Plan, InsertionStats]],
                             quantized: ir.Model, plan: Plan, stats: InsertionStats, kept: frozenset[str],
                             feed: Mapping[str, Any], config: QuantConfig, ctx: PassContext, speed: dict[str, Any],
                             report: Any, expansions: Mapping[str, list[str]]
                             ) -> tuple[ir.Model, Plan, InsertionStats, frozenset[str]]:
        """Return to float, one kind of region at a time, the quantized non-anchor regions whose removal is
        measurably faster (the paired ratio's 95% interval wholly under 1), keeping each change that pays."""
        kinds = region_kinds((p.node for p in plan.nodes.values()), expansions)
        with ctx.progress.task("quant: timing regions against float", total=len(kinds)) as task:
            for kind, names in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
                task.advance()
                if set(names) <= kept:
                    continue  # already float with a larger kind
                trial = build(kept | frozenset(names))
                ratio = latency_ratio(trial[0], quantized, feed, ctx.sessions, rounds=config.speed_rounds)
                keep_float = ratio.high < 1.0
                speed["tried"].append({"kind": kind, "nodes": len(names), "float_over_int8": ratio.to_dict(),
                                       "returned_to_float": keep_float})
                if keep_float:
                    kept = kept | frozenset(names)
                    quantized, plan, stats = trial
                    report.notes.append(f"speed guard: {len(names)} {kind} nodes back to float "
                                        f"({ratio.median:.2f}x the latency with them quantized)")
        return quantized, plan, stats, kept

    def _float_compute(self, build: Callable[..., tuple[ir.Model, Plan, InsertionStats]], quantized: ir.Model,
                       plan: Plan, kept: frozenset[str], feed: Mapping[str, Any],
                       config: QuantConfig, ctx: PassContext, speed: dict[str, Any], report: Any, *, slower: bool = False
                       ) -> tuple[ir.Model, Plan, InsertionStats, frozenset[str]] | None:
        """The model still slower than fp32 by its median: time it computed in float with every quantized
        Conv/MatMul/Gemm's weight stored int8 (decoded at load) against the int8 model, and return that build unless
        it is slower than int8 beyond timing noise.

        Not by the interval's high end as the region stages are: int8 is already slower than fp32 by its median,
        and this build is fp32's graph once ONNX Runtime has folded the decoding. ``slower``: int8 was timed slower than fp32 with its whole
        interval above 1 (what the guard would warn as SLOWER), so this build (fp32's graph) is taken even when its
        own comparison with int8 lands on the other side of 1 by noise (seen on a MobileNetV3-style net at
        1.03-1.06x). Nodes the accuracy fallback or exclusions keep float keep float32 weights."""
        names = frozenset(p.node.name for p in plan.nodes.values() if p.node.name)
        trial = build(kept | names)
        ratio = latency_ratio(trial[0], quantized, feed, ctx.sessions, rounds=config.speed_rounds)
        # int8 is over fp32 by its median, and this build is fp32's own graph once loaded: take it unless it was timed
        # slower than int8 beyond noise (its interval wholly above 1). Keeping int8 on a median under 1 by noise left
        # a MobileNetV3-style net at 1.01x fp32 (0.99-1.05) with a warning, and with reverted layers' float32
        # weights a larger file than this build's
        switch = slower or ratio.low <= 1.0
        speed["tried"].append({"kind": "whole model in float, weights stored int8", "nodes": len(names), "scope": "model",
                               "float_over_int8": ratio.to_dict(), "int8_slower_beyond_noise": slower,
                               "returned_to_float": switch})
        if not switch:
            return None
        report.notes.append(f"speed guard: int8 compute did not pay on this CPU, so the model computes in float "
                            f"({ratio.median:.2f}x the int8 latency) with its Conv/MatMul/Gemm weights stored int8 and "
                            "decoded when ONNX Runtime loads it (speed_fallback=int8_weights; off keeps int8 compute)")
        return (*trial, kept | names)

    def _revert_slow_islands(self, build: Callable[..., tuple[ir.Model, Plan, InsertionStats]],
                             quantized: ir.Model, plan: Plan, stats: InsertionStats, kept: frozenset[str],
                             feed: Mapping[str, Any], config: QuantConfig, ctx: PassContext, speed: dict[str, Any],
                             report: Any) -> tuple[ir.Model, Plan, InsertionStats, frozenset[str]]:
        """Return to float single connected quantized regions (smallest first), then single Conv/MatMul/Gemm of
        those that did not pay, keeping each change the paired ratio says is faster; at most ``speed_islands``."""
        # nodes still in the graph: a folded rescale (x * 1/6 into the next scale) is no region of its own
        islands = [i for i in quantized_islands(p.node for p in plan.nodes.values()
                                                if p.node.name not in kept and p.node.graph is not None)
                   if not set(i) <= kept][:config.speed_islands]
        if not islands:
            return quantized, plan, stats, kept
        back = 0
        # then, with what is left of the budget, each Conv/MatMul/Gemm of an island that did not pay on its own
        anchors = [[n.name] for n in iter_nodes(quantized) if n.name and n.op_type in _ANCHORS
                   and any(n.name in i and len(i) > 1 for i in islands)]
        units = [*islands, *anchors][:max(config.speed_islands, len(islands))]
        with ctx.progress.task("quant: timing single regions against float", total=len(units)) as task:
            for names in units:
                task.advance()
                if set(names) <= kept:
                    continue
                trial = build(kept | frozenset(names))
                ratio = latency_ratio(trial[0], quantized, feed, ctx.sessions, rounds=config.speed_rounds)
                keep_float = ratio.high < 1.0
                ops = "+".join(sorted({n.op_type for n in iter_nodes(quantized) if n.name in set(names)}))
                speed["tried"].append({"kind": f"region {names[0]} ({ops})", "nodes": len(names), "scope": "region",
                                       "float_over_int8": ratio.to_dict(), "returned_to_float": keep_float})
                if keep_float:
                    kept = kept | frozenset(names)
                    quantized, plan, stats = trial
                    back += 1
        if back:
            report.notes.append(f"speed guard: {back} of {len(units)} single quantized regions or layers timed back to float")
        return quantized, plan, stats, kept

    def _kernels(self, model: ir.Model, config: QuantConfig, ctx: PassContext, figures: dict[str, Any], report: Any) -> None:
        if not config.check_kernels:
            return
        found = ort_kernels(model, ctx.sessions)
        if found is None:
            report.notes.append("ORT kernel check skipped: the quantized model is too large for one session beside "
                                "the pass's own copy of its weights, and no cut leaves every fused Q/DQ group whole; "
                                "validation still runs it (--set quant.check_kernels=false silences this note)")
            return
        figures["ort_integer_kernels"] = found["integer"]
        figures["ort_kernel_types"] = found["kernels"]
        figures["ort_float_compute_left"] = found["float"]
        figures["ort_int_data_movers"] = found["int_data_movers"]
        figures["ort_conversions"] = found["conversions"]

    # -- dynamic and int4 weight-only --------------------------------------------------------------------------

    def _matmul_targets(self, model: ir.Model, config: QuantConfig, report: Any, why_conv: str | None
                        ) -> list[tuple[ir.Node, Any, Any]]:
        excluded = _explicit_exclusions(model, config, PlaceContext(config.activation_type, config.per_channel))
        targets = []
        for node in list(iter_nodes(model)):
            if is_onnx_op(node, "Conv", "ConvTranspose"):
                if why_conv:
                    report.skip(f"{node.op_type} {node.name}", why_conv)
                continue
            if not is_onnx_op(node, "MatMul", "Gemm"):
                continue
            if node.name in excluded:
                report.skip(f"{node.op_type} {node.name}", excluded[node.name])
                continue
            found = dynamic_target(node)
            if isinstance(found, str):
                report.skip(f"{node.op_type} {node.name}", found)
                continue
            targets.append((node, *found))
        return targets

    def _dynamic(self, model: ir.Model, config: QuantConfig, ctx: PassContext, report: Any) -> PassResult:
        model = _prepare(model, _DYNAMIC_OPSET, "DynamicQuantizeLinear and MatMulInteger", report, ctx)
        # weight-only needs no calibration: a Loop/Scan body is no reason to leave a weight float
        excluded = {k: r for k, r in _explicit_exclusions(model, config, PlaceContext(config.activation_type,
                                                                                      config.per_channel)).items()
                    if not r.startswith("inside a Loop/Scan body")}
        if config.per_channel and opset_version(model) < _PER_CHANNEL_OPSET and int8_weight_targets(model, excluded)[0]:
            model, note = ensure_opset(model, _PER_CHANNEL_OPSET, why="per-channel DequantizeLinear of recurrent/embedding weights")
            if note:
                report.notes.append(note)
        targets = self._matmul_targets(model, config, report, CONV_REASON)
        others, skipped = int8_weight_targets(model, excluded)
        for label, reason in skipped:
            report.skip(label, reason)
        if not targets and not others:
            left = "; ".join(f"{label}: {reason}" for label, reason in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            raise PassSkipped("nothing to quantize dynamically: no MatMul/Gemm with a constant float32 weight matrix, "
                              "and no LSTM/GRU/RNN or Gather weight" + (f" it can take (left: {left})" if skipped else ""))
        names, cache, stats = Names(model), {}, DynamicStats()
        while targets:  # popped: each weight is let go once quantized, so a large model is never all in memory
            node, weight, bias = targets.pop(0)
            quantize_dynamic_node(node, weight, bias, config.per_channel, names, cache, stats, config.saturation)
            report.items.append({"node": node.name, "op": node.op_type, "kernel": "DynamicQuantizeMatMul",
                                 "weight": list(weight.shape)})
        int8 = WeightOnlyStats()
        while others:
            target = others.pop(0)
            quantize_int8_weight(target, config.per_channel, names, int8)
            report.items.append({"node": ", ".join(n.name or n.op_type for n in target.readers),
                                 "op": target.readers[0].op_type, "kernel": "weight-only int8 (DequantizeLinear)",
                                 "weight": [int(d) for d in target.value.shape] if target.value.shape else [],
                                 "tensor": target.value.name})
        cleanup(model)
        figures: dict[str, Any] = {"mode": "dynamic", "per_channel": config.per_channel, "quantized_nodes": stats.nodes,
                                   "weight_only_int8_tensors": int8.nodes,
                                   "weight_bytes_float": stats.float_weight_bytes + int8.float_weight_bytes,
                                   "weight_bytes_int8": stats.int_weight_bytes + int8.int_weight_bytes}
        if config.saturation != "off":
            _report_saturation(stats, config.saturation, figures, report)
        self._kernels(model, config, ctx, figures, report)
        report.figures = figures
        report.summary = (f"dynamic int8: {stats.nodes} MatMul/Gemm"
                          + (f", {int8.nodes} recurrent/embedding weights weight-only" if int8.nodes else "")
                          + f", weights {figures['weight_bytes_float'] / 1e6:.2f} MB -> {figures['weight_bytes_int8'] / 1e6:.2f} MB")
        return PassResult(model, True, report)

    def _gptq(self, model: ir.Model, targets: list[tuple[ir.Node, Any, Any]], config: QuantConfig, ctx: PassContext,
              report: Any) -> dict[int, tuple[Any, Any]]:
        """GPTQ-rounded int4 values and scales per target node id, from the input Hessians on --data."""
        from onnxopt_passes.quant.gptq import gptq_blockwise, input_hessians

        if ctx.calibration is None:
            raise OnnxoptError("quant.rounding=gptq needs calibration data (the layer inputs' Hessians)",
                               "give it with --data calib.npz, or use --set quant.rounding=nearest")
        out: dict[int, tuple[Any, Any]] = {}
        for chunk in _gptq_chunks(targets):  # bounded memory: a few K x K Hessians at a time
            inputs = {str(node.inputs[0].name): int(weight.shape[0]) for node, weight, _ in chunk}
            hessians = input_hessians(model, inputs, ctx.calibration, ctx.sessions, progress=ctx.progress)
            for node, weight, _ in chunk:
                out[id(node)] = gptq_blockwise(weight, hessians[str(node.inputs[0].name)], config.block_size)
        report.notes.append(f"int4 weights of {len(out)} MatMul/Gemm rounded by GPTQ (inverse-Hessian updates from "
                            f"{len(ctx.calibration)} --data samples)")
        return out

    def _weight_only(self, model: ir.Model, config: QuantConfig, ctx: PassContext, report: Any) -> PassResult:
        model = _prepare(model, _INT4_OPSET, "int4 block-wise DequantizeLinear", report, ctx)
        targets = self._matmul_targets(model, config, report, "int4 weight-only covers MatMul/Gemm (ONNX Runtime has no int4 Conv)")
        if not targets:
            raise PassSkipped("nothing to quantize to int4: no MatMul/Gemm with a constant float32 weight matrix")
        names, stats = Names(model), WeightOnlyStats()
        rounded = self._gptq(model, targets, config, ctx, report) if config.rounding == "gptq" else {}
        while targets:  # popped, as in _dynamic
            node, weight, bias = targets.pop(0)
            quantize_int4_node(node, weight, bias, config.block_size, names, stats, rounded.pop(id(node), None))
            report.items.append({"node": node.name, "op": node.op_type, "kernel": "MatMulNBits", "weight": list(weight.shape)})
        cleanup(model)
        figures: dict[str, Any] = {"mode": "weight-only int4", "block_size": config.block_size, "rounding": config.rounding,
                                   "quantized_nodes": stats.nodes,
                                   "weight_bytes_float": stats.float_weight_bytes, "weight_bytes_int4": stats.int_weight_bytes}
        self._kernels(model, config, ctx, figures, report)
        report.figures = figures
        report.summary = (f"int4 weight-only (block {config.block_size}): {stats.nodes} MatMul/Gemm, weights "
                          f"{stats.float_weight_bytes / 1e6:.2f} MB -> {stats.int_weight_bytes / 1e6:.2f} MB")
        return PassResult(model, True, report)


def _gptq_chunks(targets: list[tuple[ir.Node, Any, Any]], limit_bytes: int = 256 << 20) -> list[list[tuple[ir.Node, Any, Any]]]:
    """Targets in groups whose Hessians (K x K float64 per distinct input) fit in ``limit_bytes`` together."""
    chunks: list[list[tuple[ir.Node, Any, Any]]] = [[]]
    used = 0
    for target in targets:
        k = int(target[1].shape[0])
        if chunks[-1] and used + 8 * k * k > limit_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(target)
        used += 8 * k * k
    return [c for c in chunks if c]


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(QuantPass)
