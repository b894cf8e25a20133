"""The hooks a plugin implements: this module is the one page a plugin author reads.

A plugin is a module (or object) with functions marked ``@onnxopt.hookimpl``,
published under the entry point group ``onnxopt``::

    [project.entry-points.onnxopt]
    my_plugin = "my_package.plugin"

onnxopt's own passes are registered exactly this way. Every hook is called
through pluggy (``pm.hook.<name>(...)``), so its markers mean what pluggy says:
``@hookimpl(tryfirst=True)``, ``trylast=True``, ``wrapper=True`` (or the older
``hookwrapper=True``), and ``PluginManager.add_hookcall_monitoring`` sees every
call. What the search and the corpus checks need of a pass, the pass class
declares itself (:class:`onnxopt.Pass`: ``search_space``, ``corpus_variants``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnxopt.metrics import Metric
    from onnxopt.pass_api import Pass, PassContext, PassResult

__all__ = ["PROJECT", "hookspec", "hookimpl"]

PROJECT = "onnxopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    """Register pass classes by calling ``register(PassClass)`` once per class.

    A pass class subclasses :class:`onnxopt.Pass`: a ``name`` (its CLI
    spelling, unique across all installed plugins: two plugins claiming one
    name is an error naming both), a frozen dataclass ``Config`` whose fields
    all have defaults and docs, and ``run(model, config, ctx)``.
    """


@hookspec
def onnxopt_register_metrics(register: Callable[[Metric], None]) -> None:
    """Register validation metrics by calling ``register(Metric(...))``.

    A metric compares a reference output with a candidate output (and labels,
    when the data has them) and returns a float, or None where it does not
    apply. Registered metrics appear in every validation table and report.
    """


@hookspec
def onnxopt_before_pass(pass_name: str, model: ir.Model, config: Any, ctx: PassContext) -> None:
    """Called before each pass of a chain runs; observers only (must not change ``model``)."""


@hookspec
def onnxopt_after_pass(pass_name: str, result: PassResult, ctx: PassContext) -> None:
    """Called after each pass with its result (model and report); observers only."""
