"""The probe plugin (see ``tests.probe_plugin``): a slow pass, observer hooks, and points to pause at.

Pausing lets a test interrupt a real ``onnxopt`` process at a known point
instead of sleeping and hoping: the probe appends ``<point>`` to the marker
file, then waits (at most ``PAUSE_LIMIT`` seconds). ``save`` pauses when the
output has been written to its temporary folder and is being checked;
``commit`` pauses inside the renames that put it in place.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx.checker
import onnx_ir as ir

from onnxopt import Pass, PassResult, PassSpace, hookimpl, option
from onnxopt.graph import constant_array, iter_graphs

PAUSE_LIMIT = 60.0
MARKER = os.environ.get("ONNXOPT_PROBE_MARKER", "")
PAUSE = os.environ.get("ONNXOPT_PROBE_PAUSE", "")
FAIL = os.environ.get("ONNXOPT_PROBE_FAIL", "")


def reached(point: str) -> None:
    if MARKER:
        with open(MARKER, "a") as fh:
            fh.write(point + "\n")


def wait(seconds: float = PAUSE_LIMIT) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)


def fail_if(hook: str) -> None:
    if FAIL == hook:
        raise RuntimeError(f"probe failure in {hook}")


fail_if("import")


@dataclass(frozen=True)
class SlowConfig:
    """The slow pass has no keys."""


class SlowPass(Pass[SlowConfig]):
    """Waits to be interrupted (with ONNXOPT_PROBE_PAUSE=pass); otherwise returns the model unchanged."""

    name = "probe_slow"
    Config = SlowConfig

    def run(self, model, config, ctx):  # type: ignore[no-untyped-def]
        if PAUSE == "pass":
            reached("pass")
            wait()
        return PassResult(model, False, self.new_report(config))


@dataclass(frozen=True)
class SparsifyConfig:
    """Keys of the probe's sparsify pass."""

    share: float = option(0.5, "share of each 2-D float weight's entries set to zero, the smallest first")


class SparsifyPass(Pass[SparsifyConfig]):
    """Zeroes the smallest entries of 2-D float weights: a third-party pass with its own search space."""

    name = "probe_sparsify"
    Config = SparsifyConfig

    @classmethod
    def search_space(cls, objective="size"):  # type: ignore[no-untyped-def]
        return PassSpace("ladder", ({"share": 0.2}, {"share": 0.95}))

    def run(self, model, config, ctx):  # type: ignore[no-untyped-def]
        report = self.new_report(config)
        zeroed = 0
        for graph in iter_graphs(model):
            for value in graph.initializers.values():
                array = constant_array(value)
                if array is None or array.ndim != 2 or array.dtype != np.float32:
                    continue
                small = np.abs(array) < np.quantile(np.abs(array), config.share)
                value.const_value = ir.tensor(np.where(small, np.float32(0), array), name=value.name)
                zeroed += int(small.sum())
        report.figures = {"zeroed": zeroed}
        report.summary = f"{zeroed} weight entries set to zero"
        return PassResult(model, zeroed > 0, report)


@hookimpl
def onnxopt_register_passes(register):  # type: ignore[no-untyped-def]
    fail_if("register")
    register(SlowPass)
    register(SparsifyPass)


@hookimpl
def onnxopt_register_metrics(register):  # type: ignore[no-untyped-def]
    fail_if("metrics")


@hookimpl
def onnxopt_before_pass(pass_name, model, config, ctx):  # type: ignore[no-untyped-def]
    reached(f"before {pass_name}")
    fail_if("before")


@hookimpl
def onnxopt_after_pass(pass_name, result, ctx):  # type: ignore[no-untyped-def]
    reached(f"after {pass_name}")
    fail_if("after")


if PAUSE == "save":
    _check_model = onnx.checker.check_model

    def _check_then_pause(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        _check_model(model, *args, **kwargs)
        if isinstance(model, (str, os.PathLike)) and Path(model).parent.name.endswith(".tmp"):
            reached("save")  # the output is complete in its temporary folder, not yet in place
            wait()

    onnx.checker.check_model = _check_then_pause

if PAUSE == "commit":
    _replace = os.replace

    def _replace_after_pause(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the data file moving from the temporary folder to its place (not a rename inside that folder)
        if str(dst).endswith(".data") and not Path(dst).parent.name.endswith(".tmp"):
            reached("commit")  # the data file is next: signals are held until the model follows it
            wait(1.0)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_after_pause
