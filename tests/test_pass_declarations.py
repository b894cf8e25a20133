"""Passes declare what the tools around them need (search space, search base, corpus runs): the core names none.

The third-party case is real: the probe plugin is installed for a subprocess through an entry point, exactly
as pip would install it, and its pass takes part in `onnxopt search` with the space it declares.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from onnxopt.corpus import corpus_runs
from onnxopt.plugins import load_registry
from onnxopt.search.space import base_pass, build_space, searchable_passes

from tests.helpers import run_cli
from tests.probe_plugin import probe_env

REPO = Path(__file__).resolve().parents[1]


def test_default_search_is_every_installed_pass_that_declares_a_space() -> None:
    registry = load_registry()
    declared = [n for n, cls in registry.passes.items() if cls.search_space() is not None and not cls.search_base]
    default = searchable_passes(registry)
    assert sorted(default) == sorted(declared) and declared
    assert registry.passes[default[-1]].final  # the final pass (quantization) closes the chain
    orders = [registry.passes[n].search_order for n in default if not registry.passes[n].final]
    assert orders == sorted(orders)
    assert base_pass(registry) is not None and registry.passes[base_pass(registry)].lossless


def test_a_declared_space_follows_the_objective() -> None:
    """prune's ladder cuts what the objective counts: parameters for size, MACs for latency."""
    registry = load_registry()
    size = build_space(registry, ["prune"], objective="size").entries["prune"].resolved()
    latency = build_space(registry, ["prune"], objective="latency").entries["prune"].resolved()
    assert all("target_params" in s for s in size) and all("target_macs" in s for s in latency)


def test_the_core_names_no_builtin_pass() -> None:
    """No module of the core spells a built-in pass's name as a string (docstring examples aside)."""
    names = sorted(load_registry().passes)
    offenders = subprocess.run(["grep", "-rnE", "--include=*.py", "[\"'](" + "|".join(names) + ")[\"']", "onnxopt"],
                               cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    # rich's overflow="fold" (a text-wrapping mode) is not the fold pass
    offenders = [line for line in offenders if "e.g." not in line and '``passes = [' not in line
                 and 'overflow="fold"' not in line]
    assert offenders == []


def test_the_plugin_declares_its_own_corpus_variants() -> None:
    pytest.importorskip("onnxopt_fp16_weights")
    runs = corpus_runs("fp16")
    assert runs[0] == ("fp16", {}) and ("fp16[min_elements=1]", {"min_elements": 1}) in runs


def test_a_third_party_pass_takes_part_in_search_with_its_space(digits: Path, tmp_path: Path) -> None:
    # the built-in searchable passes blocked, the default --passes is the probe's pass alone
    env = {**probe_env(tmp_path), "ONNXOPT_DISABLE_PLUGINS": "prune,lowrank,cluster,quant"}
    proc = run_cli("search", digits / "mlp.onnx", "--eval", digits / "eval.npz", "--max-drop", "0.05",
                   "--report", tmp_path / "s.json", "-o", tmp_path / "best.onnx", "--workers", "1", "-q",
                   env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["settings"]["passes"] == ["probe_sparsify"]
    assert doc["settings"]["space"]["entries"]["probe_sparsify"]["settings"] == [{"share": 0.2}, {"share": 0.95}]
    tried = {json.dumps(c["recipe"][-1]["settings"]): c for c in doc["candidates"] if c["recipe"][-1]["pass"] == "probe_sparsify"}
    assert set(tried) == {'{"share": 0.2}', '{"share": 0.95}'}
    light, heavy = tried['{"share": 0.2}'], tried['{"share": 0.95}']
    # 95% of the MLP's weights zeroed breaks it (rejected early or measured over budget), 20% does not
    assert light["status"] == "ok" and heavy["status"] in ("ok", "rejected")
    assert light["drop"] <= 0.05 < heavy["drop"]
    assert doc["best"] != heavy["id"]  # (zeroing keeps the file's size: the base and the light one tie on size)
