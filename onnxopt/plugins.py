"""Plugin discovery and the registries of passes and metrics built from it.

Which plugins load: every entry point of the ``onnxopt`` group (onnxopt's own passes included), less those
named in ``$ONNXOPT_DISABLE_PLUGINS``; with ``$ONNXOPT_PLUGINS`` (``--no-plugins`` sets it empty) only the
third-party plugins it names. A plugin that cannot be imported is skipped with a warning, not fatal.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from onnxopt import hookspecs
from onnxopt.errors import OnnxoptError
from onnxopt.metrics import BUILTIN_METRICS, Metric
from onnxopt.pass_api import Pass

__all__ = ["DISABLE_ENV", "ALLOW_ENV", "CORE_DISTRIBUTION", "InstalledPlugin", "Registered", "Registry",
           "call_hook", "installed_plugins", "get_plugin_manager", "load_registry", "notify"]

#: Comma-separated plugins not to load: entry point names or distribution names.
DISABLE_ENV = "ONNXOPT_DISABLE_PLUGINS"
#: When set, the only third-party plugins to load (entry point or distribution names); empty or "none": none.
#: onnxopt's own passes come through the same entry point group and always load (unless disabled by name).
ALLOW_ENV = "ONNXOPT_PLUGINS"
#: The distribution whose entry points are the built-in passes.
CORE_DISTRIBUTION = "onnxopt"


class _CoreMetrics:
    """The built-in metrics, registered through the same hook a plugin uses."""

    @hookspecs.hookimpl
    def onnxopt_register_metrics(self, register: Callable[[Metric], None]) -> None:
        for metric in BUILTIN_METRICS:
            register(metric)


def _norm(name: str) -> str:
    # distribution names compare the way pip compares them: case, "-", "_" and "." do not matter
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class InstalledPlugin:
    """One entry point of the ``onnxopt`` group: its name and the distribution that installed it."""

    name: str
    distribution: str
    version: str

    @property
    def core(self) -> bool:
        return _norm(self.distribution) == CORE_DISTRIBUTION

    def matches(self, names: set[str]) -> bool:
        return _norm(self.name) in names or _norm(self.distribution) in names

    def __str__(self) -> str:
        return f"{self.name} ({self.distribution} {self.version})"


def installed_plugins() -> list[InstalledPlugin]:
    """Every entry point of the ``onnxopt`` group, in the order pluggy would load them."""
    import importlib.metadata

    found = []
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == hookspecs.PROJECT:
                found.append(InstalledPlugin(ep.name, dist.metadata["Name"] or "?", dist.version))
    return found


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def get_plugin_manager(*, entry_points: bool = True, disabled: list[str] | None = None,
                       allowed: list[str] | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager: core metrics plus the plugins installed under the ``onnxopt`` group.

    Plugins named in ``$ONNXOPT_DISABLE_PLUGINS`` (or ``disabled``), by entry point or distribution name,
    are blocked; when ``$ONNXOPT_PLUGINS`` (or ``allowed``) is given, third-party plugins outside it are too.
    A name that matches no installed plugin is a warning. A plugin that fails to import is skipped with a
    warning naming it (the passes of the others still work); asking for one of its passes is then an error
    that names it.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_CoreMetrics(), name="onnxopt.metrics")
    pm.onnxopt_failed = {}  # type: ignore[attr-defined]  # entry point name -> why it did not load
    if not entry_points:
        for name in _names(os.environ.get(DISABLE_ENV, "")) + list(disabled or []):
            pm.set_blocked(name)
        return pm
    installed = installed_plugins()
    blocked_names = _names(os.environ.get(DISABLE_ENV, "")) + list(disabled or [])
    allow_text = os.environ.get(ALLOW_ENV) if allowed is None else ",".join(allowed)
    allow_names = None if allow_text is None else [n for n in _names(allow_text) if n.lower() != "none"]
    known = {_norm(p.name) for p in installed} | {_norm(p.distribution) for p in installed}
    for env, given in ((DISABLE_ENV, blocked_names), (ALLOW_ENV, allow_names or [])):
        unknown = [n for n in given if _norm(n) not in known]
        if unknown:
            names = ", ".join(str(p) for p in installed if not p.core) or "none besides onnxopt's own"
            warnings.warn(f"{env} names {', '.join(unknown)}, which no installed plugin is called (installed: {names})",
                          stacklevel=2)
    blocked = {_norm(n) for n in blocked_names}
    allow = None if allow_names is None else {_norm(n) for n in allow_names}
    for plugin in installed:
        if plugin.matches(blocked) or (allow is not None and not plugin.core and not plugin.matches(allow)):
            pm.set_blocked(plugin.name)
    for plugin in installed:
        if pm.is_blocked(plugin.name) or pm.has_plugin(plugin.name):
            continue
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT, name=plugin.name)
        except Exception as err:  # an import error inside someone's plugin: the others still work
            why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            pm.onnxopt_failed[plugin.name] = f"{plugin} failed to load: {why}"  # type: ignore[attr-defined]
            pm.set_blocked(plugin.name)
            warnings.warn(f"plugin {plugin} failed to load and is skipped: {why} "
                          f"(fix or uninstall it, or silence this with {DISABLE_ENV}={plugin.name} or --no-plugins)",
                          stacklevel=2)
    return pm


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
    #: plugins that failed to load: entry point name -> why (they were skipped)
    failed: dict[str, str] = field(default_factory=dict)

    def get_pass(self, name: str) -> type[Pass[Any]]:
        if name.startswith("ir:") and name not in self.passes:  # an onnx-ir pass class by its import path
            from onnxopt.ir_bridge import pass_from_path

            return pass_from_path(name)
        if name not in self.passes:
            if self.failed:  # the pass may well be the broken plugin's: say so rather than "unknown"
                first = next(iter(self.failed))
                raise OnnxoptError(f"no pass {name!r}; plugin {'; '.join(self.failed.values())}",
                                   f"fix or reinstall it (or, if {name!r} is not its pass, check the name; "
                                   f"{DISABLE_ENV}={first} silences it)")
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
    registry = Registry(pm=pm, failed=dict(getattr(pm, "onnxopt_failed", {})))

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
