"""distill: fuse a teacher and a student into one graph that computes the distillation losses.

The fused model reads the student's inputs (the teacher reads them too,
matched by name or by ``input_map``) plus an optional ``labels`` input
(int64 class ids, the logits' shape without the class axis), and outputs:

- the student's own outputs, unchanged (its logits among them);
- ``soft_labels`` = softmax(t / T), the teacher's soft labels;
- ``kd_loss`` = T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over the class
  axis (the last) and averaged over the other positions (PyTorch's
  ``batchmean``, Hinton et al.);
- ``ce_loss`` = cross-entropy of softmax(s) against ``labels``, averaged;
- ``total_loss`` = alpha · kd_loss + (1 − alpha) · ce_loss (kd_loss alone
  when there is no labels input).

Names and frozen weights: the student keeps every name, so trained weights go
back to it by name. Every teacher node, value and initializer is renamed
``<prefix><old name>`` (default prefix ``teacher/``; ``_1``, ``_2``... is
appended on a collision with a student name), and the loss nodes and their
constants are called ``distill/...``. The model's ``metadata_props`` say what
a trainer must not update and where the outputs are:

- ``onnxopt.distill.frozen``: JSON list of the frozen initializers (teacher
  weights and loss constants); every other float initializer is the student's;
- ``onnxopt.distill.outputs``: JSON object, role -> output name (``student``,
  ``soft_labels``, ``kd_loss``, ``ce_loss``, ``total_loss``);
- ``onnxopt.distill.inputs``: JSON object, ``labels`` -> its input name;
- ``onnxopt.distill.teacher_prefix``, ``.temperature``, ``.alpha``.

The losses need opset 13 (ReduceSum and Unsqueeze take axes as inputs); the
model with the lower opset is upgraded to the other's (at least 13).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, hookimpl, option
from onnxopt.finetune.pairing import check_logits, pair_inputs, parse_input_map, pick_output
from onnxopt.graph import Names, add_initializer, cleanup, iter_graphs, make_node, opset_version
from onnxopt.io import infer_shapes, load_model
from onnxopt.opset import ensure_opset

__all__ = ["DistillConfig", "DistillPass", "LOSS_OPSET", "METADATA_PREFIX", "fuse"]

#: ReduceSum and Unsqueeze take their axes as inputs from opset 13; the loss subgraph is written for that.
LOSS_OPSET = 13
METADATA_PREFIX = "onnxopt.distill."
LOSS_PREFIX = "distill/"


@dataclass(frozen=True)
class DistillConfig:
    """Keys of the distill pass."""

    teacher: str = option("", "teacher model (.onnx); a relative path is resolved against the student's folder")
    temperature: float = option(4.0, "temperature T that softens both models' logits in the KD loss")
    alpha: float = option(0.5, "weight of the KD loss: total = alpha*KD + (1-alpha)*CE", unit="share")
    student_output: str = option("", "student output holding the logits (empty: its first output)")
    teacher_output: str = option("", "teacher output holding the logits (empty: its first output)")
    input_map: tuple[str, ...] = option((), "teacher inputs fed by a student input of another name, as TEACHER=STUDENT")
    labels: str | None = option("labels", "name of the hard-label input (int64 class ids); none: no cross-entropy")
    prefix: str = option("teacher/", "prefix of the teacher's node, value and initializer names")

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha}")
        if not self.prefix:
            raise ValueError("prefix must not be empty: teacher names would clash with the student's")
        parse_input_map(self.input_map)


def _prefix_teacher(teacher: ir.Model, names: Names, prefix: str) -> list[str]:
    """Rename every teacher node and value ``prefix + name`` (fresh against ``names``); return its initializers' new names."""
    main_inputs = set(teacher.graph.inputs)
    frozen: list[str] = []
    for graph in iter_graphs(teacher):
        for value in list(graph.initializers.values()):
            value.name = names.fresh(prefix + (value.name or "weight"))
            frozen.append(value.name)
        for value in graph.inputs:
            if value not in main_inputs and value.const_value is None:
                value.name = names.fresh(prefix + (value.name or "input"))
        for node in graph:
            node.name = names.fresh(prefix + (node.name or node.op_type))
            for value in node.outputs:
                value.name = names.fresh(prefix + (value.name or f"{node.name}_out"))
    return frozen


def _merge_imports(student: ir.Model, teacher: ir.Model) -> None:
    for domain, version in teacher.opset_imports.items():
        have = student.opset_imports.get(domain)
        if have is not None and have != version and domain not in ("", "ai.onnx"):
            raise OnnxoptError(f"student and teacher import domain {domain!r} at versions {have} and {version}",
                               "export both models against the same version of that domain")
        student.opset_imports.setdefault(domain, version)
    for key, function in teacher.functions.items():
        if key in student.functions:
            raise OnnxoptError(f"student and teacher both define function {key[1]!r} of domain {key[0]!r}",
                               "rename the function in one of the models")
        student.functions[key] = function
    student.ir_version = max(student.ir_version, teacher.ir_version)


def _same_opset(student: ir.Model, teacher: ir.Model) -> tuple[ir.Model, ir.Model, list[str]]:
    target = max(opset_version(student), opset_version(teacher), LOSS_OPSET)
    notes = []
    student, note = ensure_opset(student, target, why="distillation losses and teacher")
    if note:
        notes.append(f"student {note}")
    teacher, note = ensure_opset(teacher, target, why="distillation losses and student")
    if note:
        notes.append(f"teacher {note}")
    return student, teacher, notes


@dataclass
class _LossBuilder:
    """Appends loss nodes named ``distill/...`` to the fused graph."""

    graph: ir.Graph
    names: Names
    frozen: list[str]

    def const(self, hint: str, array: np.ndarray) -> ir.Value:
        value = add_initializer(self.graph, array, self.names.fresh(LOSS_PREFIX + hint))
        self.frozen.append(value.name)  # type: ignore[arg-type]
        return value

    def op(self, op_type: str, inputs: list[ir.Value | None], hint: str, **attrs: Any) -> ir.Value:
        node = make_node(op_type, inputs, attrs, names=self.names, name_hint=LOSS_PREFIX + hint)
        self.graph.append(node)
        return node.outputs[0]

    def output(self, value: ir.Value, name: str, dims: ir.Shape | None) -> ir.Value:
        out = self.op("Identity", [value], name)
        out.name = self.names.fresh(name)
        if dims is not None:  # typed here: shape inference cannot always see through the models (e.g. sequence ops)
            out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), dims
        self.graph.outputs.append(out)
        return out


def _add_losses(model: ir.Model, names: Names, student: ir.Value, teacher: ir.Value, labels: ir.Value | None,
                config: DistillConfig, frozen: list[str]) -> dict[str, str]:
    b = _LossBuilder(model.graph, names, frozen)
    shape = student.shape  # the logits' (a cast below has none yet)
    if student.dtype != ir.DataType.FLOAT:
        student = b.op("Cast", [student], "student_float", to=int(ir.DataType.FLOAT))
    if teacher.dtype != ir.DataType.FLOAT:
        teacher = b.op("Cast", [teacher], "teacher_float", to=int(ir.DataType.FLOAT))
    t_const = b.const("temperature", np.array(config.temperature, np.float32))
    last = b.const("class_axis", np.array([-1], np.int64))
    s_t = b.op("Div", [student, t_const], "student_soft")
    t_t = b.op("Div", [teacher, t_const], "teacher_soft")
    log_q = b.op("LogSoftmax", [s_t], "student_log_probs", axis=-1)
    log_p = b.op("LogSoftmax", [t_t], "teacher_log_probs", axis=-1)
    p = b.op("Softmax", [t_t], "teacher_probs", axis=-1)
    kl_terms = b.op("Mul", [p, b.op("Sub", [log_p, log_q], "log_ratio")], "kl_terms")
    kl_rows = b.op("ReduceSum", [kl_terms, last], "kl_rows", keepdims=0)
    kl = b.op("ReduceMean", [kl_rows], "kl", keepdims=0)  # no axes: every remaining axis, opset 13 and 18 alike
    kd = b.op("Mul", [kl, b.const("t_squared", np.array(config.temperature**2, np.float32))], "kd")
    scalar = ir.Shape([])
    soft_dims = ir.Shape(shape.dims) if shape is not None else None
    outputs = {"soft_labels": b.output(p, "soft_labels", soft_dims).name, "kd_loss": b.output(kd, "kd_loss", scalar).name}
    if labels is None:
        outputs["total_loss"] = b.output(kd, "total_loss", scalar).name
        return outputs  # type: ignore[return-value]
    log_s = b.op("LogSoftmax", [student], "student_log_softmax", axis=-1)
    # a non-negative axis where the rank is known: ONNX's reference evaluator mishandles axis=-1 here
    axis = len(shape) - 1 if shape is not None else -1
    picked = b.op("GatherElements", [log_s, b.op("Unsqueeze", [labels, last], "label_index")], "label_log_probs", axis=axis)
    ce = b.op("Neg", [b.op("ReduceMean", [picked], "mean_label_log_prob", keepdims=0)], "ce")
    total = b.op("Add", [b.op("Mul", [kd, b.const("alpha", np.array(config.alpha, np.float32))], "weighted_kd"),
                         b.op("Mul", [ce, b.const("one_minus_alpha", np.array(1.0 - config.alpha, np.float32))], "weighted_ce")],
                 "total")
    outputs["ce_loss"] = b.output(ce, "ce_loss", scalar).name
    outputs["total_loss"] = b.output(total, "total_loss", scalar).name
    return outputs  # type: ignore[return-value]


def _labels_input(model: ir.Model, student: ir.Value, name: str) -> ir.Value:
    taken = {v.name for v in model.graph.inputs}
    if name in taken:
        raise OnnxoptError(f"the student already has an input called {name!r}", "set distill.labels to another name")
    dims = list(student.shape.dims[:-1]) if student.shape is not None else ["batch"]
    value = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.append(value)
    return value


def fuse(student: ir.Model, teacher: ir.Model, config: DistillConfig) -> tuple[ir.Model, dict[str, Any]]:
    """One model computing the student, the teacher (renamed, frozen) and the losses; plus what was done.

    ``student`` and ``teacher`` are consumed (the student is edited in place,
    the teacher's nodes move into it).
    """
    student, teacher, notes = _same_opset(student, teacher)
    pairs = pair_inputs(student, teacher, parse_input_map(config.input_map))
    s_out = pick_output(student, config.student_output, "student")
    t_out = pick_output(teacher, config.teacher_output, "teacher")
    check_logits(s_out, t_out)
    teacher_nodes = sum(1 for _ in teacher.graph)

    names = Names(student)
    names.reserve(teacher)
    frozen = _prefix_teacher(teacher, names, config.prefix)
    for pair in pairs:
        pair.teacher.replace_all_uses_with(pair.student)
    teacher.graph.inputs.clear()
    teacher.graph.outputs.clear()
    for name in list(teacher.graph.initializers):
        student.graph.register_initializer(teacher.graph.initializers.pop(name))
    nodes = list(teacher.graph)
    teacher.graph.remove(nodes)
    student.graph.extend(nodes)
    _merge_imports(student, teacher)

    labels = _labels_input(student, s_out, config.labels) if config.labels else None
    outputs = {"student": s_out.name, **_add_losses(student, names, s_out, t_out, labels, config, frozen)}
    cleanup(student)
    notes += infer_shapes(student)
    untyped = [v.name for v in student.graph.outputs if v.type is None or v.shape is None]
    if untyped:
        raise OnnxoptError(f"cannot tell the shape of the fused outputs {untyped}: the student's logits have no known rank",
                           "re-export the student with its output shapes declared")
    kept = {name for graph in iter_graphs(student) for name in graph.initializers}
    frozen = [n for n in frozen if n in kept]
    meta = student.metadata_props
    meta[METADATA_PREFIX + "frozen"] = json.dumps(frozen)
    meta[METADATA_PREFIX + "outputs"] = json.dumps(outputs)
    meta[METADATA_PREFIX + "inputs"] = json.dumps({"labels": labels.name} if labels is not None else {})
    meta[METADATA_PREFIX + "teacher_prefix"] = config.prefix
    meta[METADATA_PREFIX + "temperature"] = repr(config.temperature)
    meta[METADATA_PREFIX + "alpha"] = repr(config.alpha)
    facts = {"outputs": outputs, "frozen": len(frozen), "teacher_nodes": teacher_nodes,
             "shared_inputs": {p.student.name: p.teacher.name for p in pairs}, "notes": notes}
    return student, facts


def _teacher_path(config: DistillConfig, ctx: PassContext) -> Path:
    if not config.teacher:
        raise OnnxoptError("pass distill needs a teacher model", "give it with --set distill.teacher=teacher.onnx")
    path = Path(config.teacher).expanduser()
    return path if path.is_absolute() else ctx.base_dir / path


class DistillPass(Pass[DistillConfig]):
    """Fuse a teacher and the student into one graph with soft-label, KD, cross-entropy and total loss outputs."""

    name = "distill"
    Config = DistillConfig
    final = True
    comparable = False  # the fused model has a labels input and loss outputs

    @classmethod
    def corpus_settings(cls, model_path: Path) -> dict[str, Any]:
        return {"teacher": str(model_path)}  # the model itself is the one teacher every corpus model has

    def run(self, model: ir.Model, config: DistillConfig, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        teacher = load_model(_teacher_path(config, ctx))
        student_nodes = sum(1 for _ in model.graph)
        fused, facts = fuse(model, teacher, config)
        report.notes += facts["notes"]
        outputs = facts["outputs"]
        report.figures = {"student_nodes": student_nodes, "teacher_nodes": facts["teacher_nodes"],
                          "fused_nodes": sum(1 for _ in fused.graph), "frozen_initializers": facts["frozen"],
                          "temperature": config.temperature, "alpha": config.alpha}
        report.items = [{"role": role, "output": name} for role, name in outputs.items()]
        shared = ", ".join(f"{s}->{t}" if s != t else s for s, t in facts["shared_inputs"].items())
        report.summary = (f"student + teacher ({facts['teacher_nodes']} nodes, prefix {config.prefix!r}, "
                          f"{facts['frozen']} frozen initializers) share {shared or 'no inputs'}; "
                          f"outputs {', '.join(outputs.values())}")
        return PassResult(fused, True, report)


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(DistillPass)
