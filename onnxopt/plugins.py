"""Plugin discovery and the registries of passes and metrics built from it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from onnxopt import hookspecs
from onnxopt.errors import OnnxoptError
from onnxopt.metrics import Metric
from onnxopt.pass_api import Pass

__all__ = ["DISABLE_ENV", "Registered", "Registry", "get_plugin_manager", "load_registry", "notify"]

#: Comma-separated plugin (entry point) names not to load.
DISABLE_ENV = "ONNXOPT_DISABLE_PLUGINS"


def get_plugin_manager(*, entry_points: bool = True, disabled: list[str] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager: core metrics plus every plugin installed under the ``onnxopt`` group.

    Plugins named in ``$ONNXOPT_DISABLE_PLUGINS`` (or ``disabled``) are blocked.
    """
    from onnxopt import metrics

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()] + list(disabled or [])
    for name in blocked:
        pm.set_blocked(name)
    pm.register(metrics, name="onnxopt.metrics")
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


def _collect(pm: pluggy.PluginManager, hook: Any, kind: str, add: Callable[[Any, Registered], None]) -> None:
    for impl in hook.get_hookimpls():
        origin = _origin(pm, impl.plugin)
        try:
            impl.function(register=lambda obj, _o=origin: add(obj, _o))
        except OnnxoptError:
            raise
        except Exception as err:
            raise OnnxoptError(f"plugin {origin.plugin} ({origin.distribution}) failed registering {kind}: "
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

    _collect(pm, pm.hook.onnxopt_register_passes, "passes", add_pass)
    _collect(pm, pm.hook.onnxopt_register_metrics, "metrics", add_metric)
    return registry


def notify(registry: Registry | None, hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook on every plugin; a plugin that raises is named with its distribution."""
    if registry is None or registry.pm is None:
        return
    pm = registry.pm
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        origin = _origin(pm, impl.plugin)
        try:
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        except OnnxoptError:
            raise
        except Exception as err:
            raise OnnxoptError(f"plugin {origin.plugin} ({origin.distribution}) failed in {hook_name}: "
                               f"{type(err).__name__}: {err}",
                               f"fix or uninstall it, or block it with {DISABLE_ENV}={origin.plugin}") from None
