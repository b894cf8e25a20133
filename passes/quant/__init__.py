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
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxopt import Pass, PassContext, PassResult, PassSkipped, hookimpl, option
from onnxopt.graph import Names, cleanup, is_onnx_op, iter_graphs, iter_nodes, opset_version
from onnxopt.opset import ensure_opset

from onnxopt_passes.fold import FoldConfig, FoldPass
from onnxopt_passes.quant.calibration import Method, collect_ranges
from onnxopt_passes.quant.dynamic import CONV_REASON, DynamicStats, dynamic_target, quantize_dynamic_node
from onnxopt_passes.quant.exact import exact_nodes
from onnxopt_passes.quant.exposure import if_of
from onnxopt_passes.quant.fallback import run_fallback
from onnxopt_passes.quant.handlers import ABSORBED_ACTIVATIONS, RULES, PlaceContext, place, rescale_factor
from onnxopt_passes.quant.kernels import ort_kernels
from onnxopt_passes.quant.plan import Plan, build_plan
from onnxopt_passes.quant.qdq import InsertionStats, insert_qdq
from onnxopt_passes.quant.rewrites import fold_bias_add, fold_hardsigmoid
from onnxopt_passes.quant.weight_only import WeightOnlyStats, int8_weight_targets, quantize_int4_node, quantize_int8_weight

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

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile {self.percentile} is not in (0, 100]")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} is not a power of two >= 16 (ONNX Runtime's MatMulNBits needs that)")
        if self.bins < 128:
            raise ValueError(f"bins {self.bins} is under 128")
        if self.fallback_samples < 1 or self.fallback_steps < 1:
            raise ValueError("fallback_samples and fallback_steps must be positive")


def _name_nodes(model: ir.Model) -> None:
    """Give unnamed nodes unique names: exclusions and the fallback address nodes by name."""
    names = Names(model)
    seen: set[str] = set()
    for node in iter_nodes(model):
        if not node.name or node.name in seen:
            node.name = names.fresh(node.op_type)
        seen.add(node.name)


def _prepare(model: ir.Model, opset: int, why: str, report: Any, ctx: PassContext, *, rewrite: bool = False) -> ir.Model:
    """Weights as initializers, opset high enough, constants and BatchNorm folded (the fold pass), every node
    named; for static mode also the float-exact rewrites that keep more of the graph in integer kernels."""
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    model, note = ensure_opset(model, opset, why=why)
    if note:
        report.notes.append(note)
    # BatchNorm must be in the weights before they are quantized; constant folding turns computed biases into weights
    folded = FoldPass().apply(model, FoldConfig(), PassContext(sessions=ctx.sessions))
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
    _name_nodes(model)
    return model


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


class QuantPass(Pass[QuantConfig]):
    """int8 QDQ quantization placed where ONNX Runtime fuses it into integer kernels (static, dynamic, int4 weight-only)."""

    name = "quant"
    Config = QuantConfig
    requires = frozenset()  # static mode asks for --data itself; dynamic and int4 weight-only need none
    final = True

    def run(self, model: ir.Model, config: QuantConfig, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        if config.weight_bits == 4:
            return self._weight_only(model, config, ctx, report)
        if config.mode == "dynamic":
            return self._dynamic(model, config, ctx, report)
        return self._static(model, config, ctx, report)

    # -- static ---------------------------------------------------------------------------------------------

    def _static(self, model: ir.Model, config: QuantConfig, ctx: PassContext, report: Any) -> PassResult:
        data = ctx.require_calibration(self.name)
        reference = model.clone()
        pc = PlaceContext(config.activation_type, config.per_channel)
        prepared = _prepare(model, _PER_CHANNEL_OPSET, "per-channel QDQ needs DequantizeLinear with axis", report, ctx,
                            rewrite=True)
        excluded = _explicit_exclusions(prepared, config, pc)
        for target in int8_weight_targets(prepared, {})[0]:  # what static QDQ does not cover, said per weight
            report.skip(f"{target.readers[0].op_type} weight {target.value.name}",
                        "static int8 quantizes Conv/MatMul/Gemm only: recurrent and embedding weights stay float "
                        "(quant.mode=dynamic stores them int8 weight-only)")
        anchors_total = Counter(n.op_type for n in iter_nodes(prepared) if n.op_type in _ANCHORS)

        def plan_for(model_: ir.Model, extra: Mapping[str, str]) -> Plan:
            by_name = {n.name: n for n in iter_nodes(model_)}
            reasons = {**excluded, **extra}
            excl = {id(by_name[k]): (by_name[k], r) for k, r in reasons.items() if k in by_name}
            return build_plan(model_, excl, pc, _loop_bodies(model_))

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

        def build(kept_float: frozenset[str]) -> tuple[ir.Model, Plan, InsertionStats]:
            clone = prepared.clone()
            p = settle(clone, {k: "kept float by the accuracy fallback" for k in kept_float})
            stats = insert_qdq(clone, p, ranges, config.activation_type, Names(clone))
            cleanup(clone)
            return clone, p, stats

        quantized, plan, stats = build(frozenset())
        fallback = None
        if config.fallback and ctx.evaluation is not None and ctx.max_drop is not None:
            candidates = [(p.node.name or "", p.node.op_type) for p in plan.nodes.values()
                          if p.rule.role not in ("passthrough", "rescale")]
            fallback = run_fallback(lambda kept: build(kept)[0], candidates, reference, ctx, ctx.max_drop,
                                    samples=config.fallback_samples, max_steps=config.fallback_steps)
            kept = frozenset(str(k["node"]) for k in fallback.kept_float)
            quantized, plan, stats = build(kept) if kept else (quantized, plan, stats)

        for node, reason in [*((n, r) for n, r in plan.skipped.values())]:
            report.skip(f"{node.op_type} {node.name}", reason)
        by_name = {n.name: n for n in iter_nodes(prepared)}
        for name, reason in {**excluded, **unreached}.items():
            node = by_name.get(name)
            if node is not None and not isinstance(place(node, pc), str):
                report.skip(f"{node.op_type} {name}", reason)
        for planned in plan.nodes.values():
            out = planned.output
            params = stats.params.get(out.name) if out is not None and out.name else None
            report.items.append({"node": planned.node.name, "op": planned.node.op_type, "kernel": planned.rule.kernel,
                                 "output": None if params is None else {"scale": params.scale, "zero_point": params.zero_point},
                                 "relu_folded": planned.absorbed is not None})
        quantized_ops = _count_ops(plan.nodes)
        figures: dict[str, Any] = {
            "mode": "static", "method": config.method, "activation_type": config.activation_type,
            "per_channel": config.per_channel, "quantized_nodes": quantized_ops,
            "anchor_ops_total": dict(anchors_total), "activation_qdq_pairs": stats.activation_pairs,
            "weights_quantized": stats.weights, "biases_int32": stats.biases,
            "weight_bytes_float": stats.float_weight_bytes, "weight_bytes_int8": stats.int_weight_bytes,
            "calibrated_tensors": len(ranges), "calibration_samples": len(data),
        }
        if fallback is not None:
            figures["fallback"] = {"initial_drop": fallback.initial_drop, "final_drop": fallback.final_drop,
                                   "within_budget": fallback.within_budget, "kept_float": fallback.kept_float}
            if fallback.kept_float:
                report.notes.append("accuracy fallback kept float: " + ", ".join(
                    f"{k['node']} ({k['op']}, drop {float(k['drop_before']):.4f} -> {float(k['drop_after']):.4f})"
                    for k in fallback.kept_float))
            if not fallback.within_budget:
                report.notes.append(f"accuracy fallback could not reach the budget: drop {fallback.final_drop:.4f} after "
                                    f"{len(fallback.kept_float)} nodes back to float (raise fallback_steps or exclude more)")
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
                          + (f"; {len(fallback.kept_float)} kept float by fallback" if fallback and fallback.kept_float else ""))
        report.figures = figures
        return PassResult(quantized, True, report)

    def _kernels(self, model: ir.Model, config: QuantConfig, ctx: PassContext, figures: dict[str, Any], report: Any) -> None:
        if not config.check_kernels:
            return
        found = ort_kernels(model, ctx.sessions)
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
            raise PassSkipped("nothing to quantize dynamically: no MatMul/Gemm with a constant float32 weight matrix, "
                              "and no LSTM/GRU/RNN or Gather weight")
        names, cache, stats = Names(model), {}, DynamicStats()
        while targets:  # popped: each weight is let go once quantized, so a large model is never all in memory
            node, weight, bias = targets.pop(0)
            quantize_dynamic_node(node, weight, bias, config.per_channel, names, cache, stats)
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
        self._kernels(model, config, ctx, figures, report)
        report.figures = figures
        report.summary = (f"dynamic int8: {stats.nodes} MatMul/Gemm"
                          + (f", {int8.nodes} recurrent/embedding weights weight-only" if int8.nodes else "")
                          + f", weights {figures['weight_bytes_float'] / 1e6:.2f} MB -> {figures['weight_bytes_int8'] / 1e6:.2f} MB")
        return PassResult(model, True, report)

    def _weight_only(self, model: ir.Model, config: QuantConfig, ctx: PassContext, report: Any) -> PassResult:
        model = _prepare(model, _INT4_OPSET, "int4 block-wise DequantizeLinear", report, ctx)
        targets = self._matmul_targets(model, config, report, "int4 weight-only covers MatMul/Gemm (ONNX Runtime has no int4 Conv)")
        if not targets:
            raise PassSkipped("nothing to quantize to int4: no MatMul/Gemm with a constant float32 weight matrix")
        names, stats = Names(model), WeightOnlyStats()
        while targets:  # popped, as in _dynamic
            node, weight, bias = targets.pop(0)
            quantize_int4_node(node, weight, bias, config.block_size, names, stats)
            report.items.append({"node": node.name, "op": node.op_type, "kernel": "MatMulNBits", "weight": list(weight.shape)})
        cleanup(model)
        figures: dict[str, Any] = {"mode": "weight-only int4", "block_size": config.block_size, "quantized_nodes": stats.nodes,
                                   "weight_bytes_float": stats.float_weight_bytes, "weight_bytes_int4": stats.int_weight_bytes}
        self._kernels(model, config, ctx, figures, report)
        report.figures = figures
        report.summary = (f"int4 weight-only (block {config.block_size}): {stats.nodes} MatMul/Gemm, weights "
                          f"{stats.float_weight_bytes / 1e6:.2f} MB -> {stats.int_weight_bytes / 1e6:.2f} MB")
        return PassResult(model, True, report)


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(QuantPass)
