"""Hooks go through pluggy: its ordering (tryfirst/trylast), its wrappers and its call monitoring all apply."""

from __future__ import annotations

import types

import pytest

from onnxopt import PassContext, hookimpl
from onnxopt.errors import OnnxoptError
from onnxopt.manager import plan_passes, run_passes
from onnxopt.plugins import get_plugin_manager, load_registry

from tests.graphs import gemm_chain
from tests.helpers import to_ir


def _ordered_plugin(seen: list[str]) -> types.SimpleNamespace:
    """Three observers of one hook (first, plain, last) and a new-style wrapper around them all."""

    @hookimpl(tryfirst=True)
    def first(pass_name, model, config, ctx):
        seen.append(f"first {pass_name}")

    @hookimpl(trylast=True)
    def last(pass_name, model, config, ctx):
        seen.append(f"last {pass_name}")

    @hookimpl(wrapper=True)
    def wrap(pass_name, model, config, ctx):
        seen.append(f"wrap-in {pass_name}")
        result = yield
        seen.append(f"wrap-out {pass_name}")
        return result

    return types.SimpleNamespace(first=first, last=last, wrap=wrap)


def _with_fold(pm):  # noqa: ANN001, ANN202 - the built-in fold plugin, without the other entry points
    import onnxopt_passes.fold

    pm.register(onnxopt_passes.fold, name="fold")
    return pm


def _hook_named(name: str, fn):  # noqa: ANN001, ANN202 - pluggy reads the function's own name
    fn.__name__ = name
    return types.SimpleNamespace(**{name: fn})


def test_hook_order_wrapping_and_monitoring_on_a_real_chain() -> None:
    seen: list[str] = []
    pm = _with_fold(get_plugin_manager(entry_points=False))
    plugin = _ordered_plugin(seen)
    # registered in an order that a hand-written loop over the implementations would run backwards
    pm.register(_hook_named("onnxopt_before_pass", plugin.last), name="last_plugin")
    pm.register(_hook_named("onnxopt_before_pass", plugin.wrap), name="wrap_plugin")

    @hookimpl
    def plain(pass_name, model, config, ctx):
        seen.append(f"plain {pass_name}")

    pm.register(_hook_named("onnxopt_before_pass", plain), name="plain_plugin")
    pm.register(_hook_named("onnxopt_before_pass", plugin.first), name="first_plugin")

    monitored: list[str] = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: monitored.append(f"before {name}"),
                                      lambda outcome, name, impls, kwargs: monitored.append(f"after {name}"))
    try:
        registry = load_registry(pm)
        # the registry is built through the hook too: the built-in metrics arrive through pm.hook
        assert {"cosine", "snr_db"} <= set(registry.metrics)
        model = to_ir(gemm_chain())
        run_passes(model, plan_passes(registry, ["fold"]), PassContext(), registry)
    finally:
        undo()

    assert seen == ["wrap-in fold", "first fold", "plain fold", "last fold", "wrap-out fold"]
    assert monitored == [
        "before onnxopt_register_passes", "after onnxopt_register_passes",
        "before onnxopt_register_metrics", "after onnxopt_register_metrics",
        "before onnxopt_before_pass", "after onnxopt_before_pass",
        "before onnxopt_after_pass", "after onnxopt_after_pass",
    ]


def test_old_style_hookwrapper_sees_registration_and_attribution_stays_right() -> None:
    """A hookwrapper around registration runs around the real implementations, and each pass is
    still recorded under the plugin that registered it (not under the wrapper)."""
    from tests.test_config_and_plugins import DemoPass

    calls: list[str] = []

    @hookimpl(hookwrapper=True)
    def onnxopt_register_passes(register):
        calls.append("around-in")
        yield
        calls.append("around-out")

    @hookimpl
    def demo_register(register):
        calls.append("demo")
        register(DemoPass)

    pm = get_plugin_manager(entry_points=False)
    pm.register(types.SimpleNamespace(onnxopt_register_passes=onnxopt_register_passes), name="wrapper_plugin")
    pm.register(_hook_named("onnxopt_register_passes", demo_register), name="demo_plugin")
    registry = load_registry(pm)
    assert calls == ["around-in", "demo", "around-out"]
    assert registry.origins["pass:demo"].plugin == "demo_plugin"


def test_a_failing_wrapped_hook_names_the_plugin_that_raised() -> None:
    @hookimpl(wrapper=True)
    def wrap(pass_name, model, config, ctx):
        return (yield)

    @hookimpl
    def boom(pass_name, model, config, ctx):
        raise ValueError("boom")

    pm = _with_fold(get_plugin_manager(entry_points=False))
    pm.register(_hook_named("onnxopt_before_pass", wrap), name="wrapping_plugin")
    pm.register(_hook_named("onnxopt_before_pass", boom), name="raising_plugin")
    registry = load_registry(pm)
    with pytest.raises(OnnxoptError, match=r"plugin raising_plugin .*failed in onnxopt_before_pass: ValueError: boom"):
        run_passes(to_ir(gemm_chain()), plan_passes(registry, ["fold"]), PassContext(), registry)


def test_plugins_sharing_one_class_are_told_apart() -> None:
    """Two instances of one plugin class share the hook's code: each pass is still credited to its own."""
    from tests.test_config_and_plugins import DemoPass

    class Plugin:
        def __init__(self, cls: type) -> None:
            self.cls = cls

        @hookimpl
        def onnxopt_register_passes(self, register):  # noqa: ANN001, ANN201
            register(self.cls)

    other = type("OtherDemo", (DemoPass,), {"name": "other", "__doc__": "Another demo."})
    pm = get_plugin_manager(entry_points=False)
    pm.register(Plugin(DemoPass), name="a_plugin")
    pm.register(Plugin(other), name="b_plugin")
    registry = load_registry(pm)
    assert registry.origins["pass:demo"].plugin == "a_plugin"
    assert registry.origins["pass:other"].plugin == "b_plugin"
