"""Bridges between onnxopt passes and onnx-ir's pass infrastructure (:mod:`onnx_ir.passes`), each way.

* :func:`as_ir_pass`: an onnxopt pass as an ``onnx_ir.passes`` functional pass,
  to run in an ``onnx_ir.passes.PassManager`` or ``Sequential`` beside
  onnx-ir's and onnxscript's passes.
* :func:`from_ir_pass`: an onnx-ir (or onnxscript) pass as an onnxopt pass
  class, to register from a plugin like any other pass; and the spelling
  ``ir:<module>.<Class>`` in a chain (``--pass fold,ir:onnx_ir.passes.common.RemoveUnusedNodesPass``)
  for a pass class that needs no constructor arguments.

Both work on ``onnx_ir.Model``, the model type onnxopt's passes already
take, so nothing is converted on the way.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import onnx_ir.passes as ir_passes

from onnxopt.errors import OnnxoptError
from onnxopt.pass_api import Pass, PassContext, PassReport, PassResult

__all__ = ["IR_PREFIX", "OnnxoptIrPass", "as_ir_pass", "from_ir_pass", "pass_from_path"]

#: How a chain names an onnx-ir pass class by its import path.
IR_PREFIX = "ir:"

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class OnnxoptIrPass(ir_passes.FunctionalPass):
    """An onnxopt pass with its config and context, as an onnx-ir functional pass.

    Functional, as onnxopt's passes are: the input model is left as it was and
    a new one is returned. The last run's :class:`~onnxopt.PassReport` stays in
    ``report``.
    """

    def __init__(self, pass_: Pass[Any], config: Any = None, ctx: PassContext | None = None) -> None:
        super().__init__()
        self.pass_ = pass_
        self.config = config if config is not None else pass_.Config()
        self.ctx = ctx if ctx is not None else PassContext()
        self.report: PassReport | None = None

    def call(self, model: ir.Model) -> ir_passes.PassResult:
        result = self.pass_.apply(model, self.config, self.ctx)
        self.report = result.report
        # a skipped pass hands back the model it was given; onnx-ir's contract wants a new one from a functional pass
        out = result.model.clone() if result.model is model else result.model
        return ir_passes.PassResult(out, result.modified)


def as_ir_pass(pass_: Pass[Any] | type[Pass[Any]], config: Any = None, ctx: PassContext | None = None) -> OnnxoptIrPass:
    """An onnxopt pass (class or instance) with ``config`` (default: its defaults) as an ``onnx_ir.passes`` pass."""
    return OnnxoptIrPass(pass_() if isinstance(pass_, type) else pass_, config, ctx)


@dataclasses.dataclass(frozen=True)
class IrPassConfig:
    """A bridged onnx-ir pass has no keys: it is built the way its factory builds it."""


def from_ir_pass(factory: Callable[[], ir_passes.PassBase], name: str, summary: str = "",
                 *, lossless: bool = False) -> type[Pass[IrPassConfig]]:
    """An onnxopt pass class that runs the onnx-ir pass ``factory()`` makes.

    ``factory`` is an ``onnx_ir.passes.PassBase`` subclass or any callable
    that returns an instance (use a ``lambda`` or ``functools.partial`` for a
    pass that takes arguments). ``lossless=True`` promises the outputs do not
    change, as for onnxopt's own lossless passes: validation then checks it.
    The class is registered from a plugin like any other pass.
    """
    what = getattr(factory, "__qualname__", repr(factory))

    class _IrPass(Pass[IrPassConfig]):
        Config = IrPassConfig

        def run(self, model: ir.Model, config: IrPassConfig, ctx: PassContext) -> PassResult:
            report = self.new_report(config)
            inner = factory()
            if not isinstance(inner, ir_passes.PassBase):
                raise OnnxoptError(f"pass {self.name}: {what}() made {type(inner).__name__}, not an onnx_ir.passes.PassBase",
                                   "give a factory that returns an onnx-ir pass")
            before = _node_count(model)
            result = inner(model)  # the model is this pass's own copy: an in-place onnx-ir pass may change it
            after = _node_count(result.model)
            report.figures = {"nodes_before": before, "nodes_after": after}
            report.summary = f"{type(inner).__name__}: {'changed the model' if result.modified else 'no change'}" + (
                f", {before} -> {after} nodes" if before != after else "")
            return PassResult(result.model, bool(result.modified), report)

    _IrPass.__name__ = _IrPass.__qualname__ = f"IrPass_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
    _IrPass.__doc__ = summary or f"onnx-ir pass {what}."
    _IrPass.name = name
    _IrPass.lossless = lossless
    return _IrPass


def pass_from_path(name: str) -> type[Pass[IrPassConfig]]:
    """The pass ``ir:<module>.<Class>``: an ``onnx_ir.passes.PassBase`` subclass built with no arguments."""
    path = name[len(IR_PREFIX):]
    if not _DOTTED.match(path):
        raise OnnxoptError(f"pass {name!r}: {path!r} is not an import path like onnx_ir.passes.common.RemoveUnusedNodesPass",
                           "give ir:<module>.<Class>")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OnnxoptError(f"pass {name!r}: cannot import {module_name} ({err})", "install the package that provides it") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, ir_passes.PassBase)):
        raise OnnxoptError(f"pass {name!r}: {path} is not an onnx_ir.passes.PassBase subclass",
                           "name a pass class; a pass that needs arguments is registered from a plugin with from_ir_pass")
    try:
        cls()
    except TypeError as err:
        raise OnnxoptError(f"pass {name!r}: {path} needs constructor arguments ({err})",
                           "register it from a plugin: from_ir_pass(lambda: Pass(...), name=...)") from None
    return from_ir_pass(cls, name, f"onnx-ir pass {path}, run as a step of the chain.")


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
