"""Configs from text, recipes and Python; plugin discovery, clashes, blocking, and the pass meta-test."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Literal

import pluggy
import pytest

from onnxopt import Pass, PassContext, PassResult, hookimpl, option
from onnxopt.config import build_config, config_fields, load_recipe, parse_settings
from onnxopt.errors import OnnxoptError
from onnxopt.manager import plan_passes
from onnxopt.plugins import get_plugin_manager, load_registry, notify

from tests.helpers import run_cli


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Keys of the demo pass."""

    ratio: float = option(0.5, "share removed")
    rounds: int = option(1, "rounds")
    mode: Literal["a", "b"] = option("a", "which mode")
    names: tuple[str, ...] = option((), "globs")
    cap: float | None = option(None, "optional cap")


class DemoPass(Pass[DemoConfig]):
    """A demo pass."""

    name = "demo"
    Config = DemoConfig

    def run(self, model, config, ctx):  # pragma: no cover - never run
        return PassResult(model, False, self.new_report(config))


def test_build_config_coerces_text() -> None:
    config = build_config(DemoConfig, {"ratio": "0.25", "rounds": "3", "mode": "b", "names": "conv*,fc", "cap": "none"}, pass_name="demo")
    assert config == DemoConfig(0.25, 3, "b", ("conv*", "fc"), None)


@pytest.mark.parametrize("values,message", [
    ({"ratio": "half"}, "not a number"), ({"rounds": "1.5"}, "not an integer"), ({"mode": "c"}, "not one of"),
    ({"colour": "red"}, "unknown config key demo.colour"), ({"rounds": True}, "not an integer"),
])
def test_build_config_refuses(values: dict, message: str) -> None:
    with pytest.raises(OnnxoptError, match=message):
        build_config(DemoConfig, values, pass_name="demo")


def test_settings_and_recipe_agree(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["demo"]\n[demo]\nratio = 0.25\nrounds = 3\nnames = ["conv*", "fc"]\n')
    passes, settings = load_recipe(recipe)
    from_recipe = build_config(DemoConfig, settings["demo"], pass_name="demo")
    from_cli = build_config(DemoConfig, parse_settings(["demo.ratio=0.25", "demo.rounds=3", "demo.names=conv*,fc"])["demo"], pass_name="demo")
    assert passes == ["demo"] and from_recipe == from_cli


def _plugin(pass_cls: type) -> types.SimpleNamespace:
    @hookimpl
    def onnxopt_register_passes(register):
        register(pass_cls)

    return types.SimpleNamespace(onnxopt_register_passes=onnxopt_register_passes)


def test_name_clash_names_both_plugins() -> None:
    pm = get_plugin_manager(entry_points=False)
    other = type("OtherDemo", (DemoPass,), {"__doc__": "Another demo."})
    pm.register(_plugin(DemoPass), name="first_plugin")
    pm.register(_plugin(other), name="second_plugin")
    with pytest.raises(OnnxoptError, match="registered by two plugins") as err:
        load_registry(pm)
    # pluggy calls the later-registered plugin first; the message names both
    assert "first_plugin" in str(err.value) and "second_plugin" in str(err.value)


def test_plugin_hook_error_names_plugin() -> None:
    pm = get_plugin_manager(entry_points=False)

    @hookimpl
    def onnxopt_before_pass(pass_name, model, config, ctx):
        raise RuntimeError("boom")

    pm.register(types.SimpleNamespace(onnxopt_before_pass=onnxopt_before_pass), name="noisy_plugin")
    registry = load_registry(pm)
    with pytest.raises(OnnxoptError, match="noisy_plugin.*boom"):
        notify(registry, "onnxopt_before_pass", pass_name="x", model=None, config=None, ctx=PassContext())


def test_final_pass_must_be_last() -> None:
    pm = get_plugin_manager(entry_points=False)
    last = type("LastDemo", (DemoPass,), {"name": "last", "final": True, "__doc__": "Runs last."})
    pm.register(_plugin(DemoPass), name="a")
    pm.register(_plugin(last), name="b")
    registry = load_registry(pm)
    assert [p.name for p in plan_passes(registry, ["demo", "last"])] == ["demo", "last"]
    with pytest.raises(OnnxoptError, match="must be the last"):
        plan_passes(registry, ["last", "demo"])


def test_builtin_passes_come_from_entry_points() -> None:
    registry = load_registry()
    assert "fold" in registry.passes
    assert registry.origins["pass:fold"].distribution.startswith("onnxopt ")


def test_every_registered_pass_is_documented() -> None:
    """Meta-test: each pass has a summary and a frozen config whose fields all have defaults and docs."""
    registry = load_registry()
    for name, cls in registry.passes.items():
        assert cls.summary(), f"{name} has no docstring"
        assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen, name
        for f in config_fields(cls.Config):
            assert f.default is not dataclasses.MISSING, f"{name}.{f.name} has no default"
            assert f.doc, f"{name}.{f.name} has no doc"
        cls.Config()  # defaults form a valid config


def test_disable_env_blocks_a_plugin() -> None:
    listing = json.loads(run_cli("passes", "--json", env={"ONNXOPT_DISABLE_PLUGINS": "fold"}).stdout)
    assert "fold" not in [e["name"] for e in listing]
    listing = json.loads(run_cli("passes", "--json").stdout)
    fold = next(e for e in listing if e["name"] == "fold")
    assert fold["lossless"] and fold["distribution"].startswith("onnxopt ")
