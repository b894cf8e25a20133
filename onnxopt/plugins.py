"""Plugin discovery and the registries of passes and metrics built from it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from collections.abc import Callable

import pluggy

from onnxopt import hookspecs
from onnxopt.errors import OnnxoptError
from onnxopt.metrics import BUILTIN_METRICS, Metric
from onnxopt.pass_api import Pass

__all__ = ["DISABLE_ENV", "Registered", "Registry", "call_hook", "get_plugin_manager", "load_registry", "notify"]

#: Comma-separated plugin (entry point) names not to load.
DISABLE_ENV = "ONNXOPT_DISABLE_PLUGINS"


class _CoreMetrics:
    """The built-in metrics, registered through the same hook a plugin uses."""

    @hookspecs.hookimpl
    def onnxopt_register_metrics(self, register: Callable[[Metric], None]) -> None:
        for metric in BUILTIN_METRICS:
            register(metric)


def get_plugin_manager(*, entry_points: bool = True, disabled: list[str] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager: core metrics plus every plugin installed under the ``onnxopt`` group.

    Plugins named in ``$ONNXOPT_DISABLE_PLUGINS`` (or ``disabled``) are blocked.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()] + list(disabled or [])
    for name in blocked:
        pm.set_blocked(name)
    pm.register(_CoreMetrics(), name="onnxopt.metrics")
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as err:  # an import error inside someone's plugin
            name, distribution = _first_unloaded(pm)
            raise OnnxoptError(f"plugin {name} ({distribution}) failed to load: {type(err).__name__}: "
                               f"{' '.join(str(err).split())[:300]}",
                               f"fix or uninstall it, or block it with {DISABLE_ENV}={name}") from None
    return pm


def _first_unloaded(pm: pluggy.PluginManager) -> tuple[str, str]:
    """The entry point pluggy stopped at: it loads them in this order and stops at the first that fails."""
    import importlib.metadata

    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == hookspecs.PROJECT and not pm.has_plugin(ep.name) and not pm.is_blocked(ep.name):
                return ep.name, f"{dist.metadata['Name']} {dist.version}"
    return "<unknown>", "(unknown distribution)"


@dataclass(frozen=True)
class Registered:
    """Who registered something: the plugin name and its distribution (name and version)."""

    plugin: str
    distribution: str


@dataclass
class Registry:
    """Passes and metrics by name, each with where it came from."""

    passes: dict[str, type[Pass[Any]]] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    origins: dict[str, Registered] = field(default_factory=dict)
    pm: pluggy.PluginManager | None = None

    def get_pass(self, name: str) -> type[Pass[Any]]:
        if name.startswith("ir:") and name not in self.passes:  # an onnx-ir pass class by its import path
            from onnxopt.ir_bridge import pass_from_path

            return pass_from_path(name)
        if name not in self.passes:
            known = ", ".join(sorted(self.passes)) or "none (is onnxopt installed? run `pip install -e .`)"
            raise OnnxoptError(f"unknown pass {name!r}", f"available passes: {known}")
        return self.passes[name]


def _origin(pm: pluggy.PluginManager, plugin: object) -> Registered:
    name = pm.get_name(plugin) or repr(plugin)
    for plug, dist in pm.list_plugin_distinfo():
        if plug is plugin:
            return Registered(name, f"{dist.project_name} {dist.version}")
    return Registered(name, "onnxopt (core)" if name.startswith("onnxopt.") else "(not installed)")


def _runs(frame: Any, fn: Any) -> bool:
    """Whether ``frame`` is a call of ``fn``: its code, and for closures and bound methods (which share
    code between plugins made by one factory or class) the same cells or the same ``self``."""
    func = getattr(fn, "__func__", fn)
    if getattr(func, "__code__", None) is not frame.f_code:
        return False
    local = frame.f_locals
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        names = frame.f_code.co_varnames
        return bool(names) and local.get(names[0]) is owner
    for name, cell in zip(frame.f_code.co_freevars, func.__closure__ or ()):
        try:
            if local.get(name) is not cell.cell_contents:
                return False
        except ValueError:  # an empty cell
            return False
    return True


def _impl_of(frame: Any, impls: list[Any]) -> Any:
    return next((impl for impl in impls if _runs(frame, impl.function)), None)


def _calling_impl(pm: pluggy.PluginManager, hook: Any) -> Registered:
    """The plugin whose implementation is calling us now.

    Every implementation gets the same ``register`` in one pluggy call, so the
    implementation's frame on the stack is what says who registers: a wrapper
    is suspended at its ``yield`` while the others run, so it is never mistaken
    for the caller.
    """
    impls = hook.get_hookimpls()
    frame = sys._getframe(1)
    while frame is not None:
        impl = _impl_of(frame, impls)
        if impl is not None:
            return _origin(pm, impl.plugin)
        frame = frame.f_back
    return Registered("<unknown>", "(called outside a hook)")


def _raising_impl(pm: pluggy.PluginManager, hook: Any, err: BaseException) -> Registered:
    """The plugin whose implementation raised: the innermost implementation frame in the traceback."""
    impls = hook.get_hookimpls()
    found = None
    tb = err.__traceback__
    while tb is not None:
        found = _impl_of(tb.tb_frame, impls) or found
        tb = tb.tb_next
    return _origin(pm, found.plugin) if found is not None else Registered("<unknown>", "(unknown distribution)")


def call_hook(pm: pluggy.PluginManager, hook_name: str, what: str, **kwargs: Any) -> list[Any]:
    """``pm.hook.<hook_name>(**kwargs)``, so ordering, wrappers and monitoring are pluggy's;
    a plugin that raises is named with its distribution."""
    hook = getattr(pm.hook, hook_name)
    try:
        return hook(**kwargs)
    except OnnxoptError:
        raise
    except Exception as err:
        origin = _raising_impl(pm, hook, err)
        raise OnnxoptError(f"plugin {origin.plugin} ({origin.distribution}) failed {what}: "
                           f"{type(err).__name__}: {err}",
                           f"fix or uninstall it, or block it with {DISABLE_ENV}={origin.plugin}") from None


def load_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Ask every plugin to register its passes and metrics; a name claimed twice is an error naming both."""
    pm = pm or get_plugin_manager()
    registry = Registry(pm=pm)

    def add_pass(cls: Any, origin: Registered) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Pass)) or not getattr(cls, "name", None):
            raise OnnxoptError(f"plugin {origin.plugin} ({origin.distribution}) registered {cls!r}, not a named Pass subclass",
                               "register classes that subclass onnxopt.Pass and set `name`")
        key = f"pass:{cls.name}"
        if cls.name in registry.passes and registry.passes[cls.name] is not cls:
            first = registry.origins[key]
            raise OnnxoptError(f"pass {cls.name!r} is registered by two plugins: {first.plugin} ({first.distribution}) "
                               f"and {origin.plugin} ({origin.distribution})",
                               f"uninstall one, or block one with {DISABLE_ENV}=<plugin name>")
        registry.passes[cls.name] = cls
        registry.origins[key] = origin

    def add_metric(metric: Any, origin: Registered) -> None:
        if not isinstance(metric, Metric):
            raise OnnxoptError(f"plugin {origin.plugin} ({origin.distribution}) registered {metric!r}, not a Metric",
                               "register onnxopt.Metric objects")
        key = f"metric:{metric.name}"
        if metric.name in registry.metrics and registry.metrics[metric.name] is not metric:
            first = registry.origins[key]
            raise OnnxoptError(f"metric {metric.name!r} is registered by two plugins: {first.plugin} ({first.distribution}) "
                               f"and {origin.plugin} ({origin.distribution})", "uninstall or block one of them")
        registry.metrics[metric.name] = metric
        registry.origins[key] = origin

    for hook_name, kind, add in (("onnxopt_register_passes", "passes", add_pass),
                                 ("onnxopt_register_metrics", "metrics", add_metric)):
        hook = getattr(pm.hook, hook_name)
        call_hook(pm, hook_name, f"registering {kind}",
                  register=lambda obj, _hook=hook, _add=add: _add(obj, _calling_impl(pm, _hook)))
    return registry


def notify(registry: Registry | None, hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook through pluggy; a plugin that raises is named with its distribution."""
    if registry is None or registry.pm is None:
        return
    call_hook(registry.pm, hook_name, f"in {hook_name}", **kwargs)
