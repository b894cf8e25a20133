"""Pairing a teacher with a student: which student input feeds each teacher input, and which outputs are logits.

The fused distillation graph (pass ``distill``) and the recovery trainer
(``onnxopt finetune``) pair models the same way, so both live here. Inputs
match by name unless ``input_map`` says otherwise; a teacher input no student
input can feed, or one of another dtype or static shape, is a one-line error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.graph import graph_input_values

__all__ = ["InputPair", "parse_input_map", "pair_inputs", "pick_output", "check_logits"]


@dataclass(frozen=True)
class InputPair:
    """A teacher graph input and the student graph input that feeds it."""

    teacher: ir.Value
    student: ir.Value


def parse_input_map(items: Iterable[str]) -> dict[str, str]:
    """``("teacher_name=student_name", ...)`` as a dict; a malformed item is a one-line error."""
    mapping: dict[str, str] = {}
    for item in items:
        teacher, sep, student = item.partition("=")
        if not sep or not teacher.strip() or not student.strip():
            raise OnnxoptError(f"input map entry {item!r} is not TEACHER_INPUT=STUDENT_INPUT",
                               "e.g. input_map=images=x (comma-separate several)")
        mapping[teacher.strip()] = student.strip()
    return mapping


def _dims(value: ir.Value) -> tuple[int | str | None, ...] | None:
    if value.shape is None:
        return None
    # exporters write -1 or 0 for free dims
    return tuple((d if d > 0 else None) if isinstance(d, int) else d.value for d in value.shape.dims)


def _describe(value: ir.Value) -> str:
    dims = _dims(value)
    shape = "?" if dims is None else "x".join("?" if d is None else str(d) for d in dims)
    return f"{value.name!r} ({value.dtype} [{shape}])"


def pair_inputs(student: ir.Model, teacher: ir.Model, input_map: Mapping[str, str] | None = None) -> list[InputPair]:
    """Each teacher input with the student input that feeds it (by name, or as ``input_map`` says).

    Static dims must agree (a named or free dim agrees with anything) and
    dtypes must be equal; otherwise the error names both inputs.
    """
    mapping = dict(input_map or {})
    student_inputs = {v.name: v for v in graph_input_values(student.graph) if v.name}
    teacher_inputs = {v.name: v for v in graph_input_values(teacher.graph) if v.name}
    unknown = sorted(set(mapping) - set(teacher_inputs))
    if unknown:
        raise OnnxoptError(f"input map names {unknown}, which are not teacher inputs (teacher inputs: {sorted(teacher_inputs)})",
                           "write each entry as TEACHER_INPUT=STUDENT_INPUT")
    pairs = []
    for name, t in teacher_inputs.items():
        source = mapping.get(name, name)
        s = student_inputs.get(source)
        if s is None:
            raise OnnxoptError(f"teacher input {name!r} has no student input {source!r} to read (student inputs: "
                               f"{sorted(student_inputs)})", f"map it: input_map={name}=<student input>")
        if t.dtype != s.dtype:
            raise OnnxoptError(f"teacher input {_describe(t)} and student input {_describe(s)} have different dtypes",
                               "give both models the same input type, or map another student input")
        td, sd = _dims(t), _dims(s)
        if td is not None and sd is not None:
            clash = len(td) != len(sd) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(td, sd))
            if clash:
                raise OnnxoptError(f"teacher input {_describe(t)} and student input {_describe(s)} have different shapes",
                                   "both models must read the same tensor; re-export one of them for the other's input shape")
        pairs.append(InputPair(t, s))
    return pairs


def pick_output(model: ir.Model, name: str, role: str) -> ir.Value:
    """The graph output called ``name`` (the first output when empty); ``role`` names the model in errors."""
    outputs = list(model.graph.outputs)
    if not name:
        return outputs[0]
    for value in outputs:
        if value.name == name:
            return value
    raise OnnxoptError(f"the {role} has no output {name!r} (outputs: {[v.name for v in outputs]})",
                       f"set {role}_output to one of them")


def check_logits(student: ir.Value, teacher: ir.Value) -> None:
    """Student and teacher logits must agree on the class count (last axis) and be floating point."""
    sd, td = _dims(student), _dims(teacher)
    for role, value, dims in (("student", student, sd), ("teacher", teacher, td)):
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise OnnxoptError(f"{role} output {value.name!r} is a {value.type}, not a tensor of logits",
                               f"set {role}_output to the output with class scores")
        if value.dtype is not None and not value.dtype.is_floating_point():
            raise OnnxoptError(f"{role} output {_describe(value)} is not floating point, so it cannot hold logits",
                               f"set {role}_output to the output with class scores")
        if dims is not None and len(dims) == 0:
            raise OnnxoptError(f"{role} output {_describe(value)} is a scalar: it has no class axis",
                               f"set {role}_output to the output with class scores")
        last = value.shape.dims[-1] if value.shape is not None and len(value.shape.dims) else None
        if last == 0:  # no class to take a label from: the losses fail at run time (ORT's GatherElements)
            raise OnnxoptError(f"{role} output {value.name!r} has 0 classes (its last axis is declared 0)",
                               f"set {role}_output to the output with class scores (or declare a free axis "
                               "with a name, not 0)")
    if sd and td and isinstance(sd[-1], int) and isinstance(td[-1], int) and sd[-1] != td[-1]:
        raise OnnxoptError(f"student output {_describe(student)} and teacher output {_describe(teacher)} have "
                           f"different class counts ({sd[-1]} vs {td[-1]})", "distill between models of the same task")
