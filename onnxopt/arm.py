"""Validation on arm64: ONNX Runtime's aarch64 build, run from this x86 machine under qemu-user emulation.

`scripts/setup_arm64.sh` builds the environment (Debian's qemu-user-static,
an aarch64 sysroot with Debian's python3, PyPI's aarch64 onnxruntime and
numpy wheels). `onnxopt validate ref.onnx cand.onnx --eval data.npz --target
arm64` then runs both models there through :mod:`onnxopt.arm_runner` in a
subprocess, and compares the aarch64 outputs and accuracy with the x86 run:
the int8 kernels ORT picks on Arm (dot-product U8S8/S8S8 paths) differ from
x86's, and this is where a user sees whether that matters. Emulated wall
time is kept apart and never reported as latency: it says nothing about a
device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.metrics import top1_agreement
from onnxopt.sessions import PROVIDER_ALIASES
from onnxopt.validate import gated_drop

__all__ = ["Arm64Runtime", "ArmComparison", "ArmModelRun", "find_runtime", "run_models", "compare_on_arm64",
           "validate_on_arm64", "format_comparison", "SETUP_SCRIPT", "SYSROOT_ENV", "TARGETS"]

TARGETS = ("host", "arm64")
SYSROOT_ENV = "ONNXOPT_ARM64_SYSROOT"
SETUP_SCRIPT = "scripts/setup_arm64.sh"
MARKER = "onnxopt-arm64.json"
#: Emulation is some 10-50x slower than native: generous, but a hung emulator must not hang validation.
TIMEOUT_SECONDS = 3600


def _candidates() -> list[Path]:
    env = os.environ.get(SYSROOT_ENV)
    if env:
        return [Path(env)]
    return [Path("/opt/onnxopt-arm64"), Path.home() / ".cache" / "onnxopt" / "arm64"]


@dataclass(frozen=True)
class Arm64Runtime:
    """A set-up aarch64 environment: its launcher and what the setup installed."""

    sysroot: Path
    launcher: Path
    info: dict[str, Any]

    @property
    def providers(self) -> list[str]:
        return list(self.info.get("runtime", {}).get("providers", []))


def find_runtime() -> Arm64Runtime:
    """The aarch64 environment, or a one-line error naming the setup script."""
    looked = _candidates()
    for root in looked:
        marker, launcher = root / MARKER, root / "bin" / "python"
        if marker.is_file() and launcher.is_file() and os.access(launcher, os.X_OK):
            try:
                info = json.loads(marker.read_text())
            except ValueError:
                continue
            return Arm64Runtime(root, launcher, info)
    where = " or ".join(str(p) for p in looked)
    raise OnnxoptError(f"no arm64 environment set up (looked in {where})",
                       f"run `bash {SETUP_SCRIPT}` (qemu-user-static + aarch64 onnxruntime; or set {SYSROOT_ENV})")


def _arm_providers(runtime: Arm64Runtime, names: Sequence[str] | None) -> list[str]:
    """User spellings to provider names, checked against the aarch64 build (not this machine's)."""
    wanted = [PROVIDER_ALIASES.get(n.strip().lower(), n.strip()) for n in (names or []) if n.strip()]
    have = runtime.providers
    missing = [p for p in wanted if have and p not in have]
    if missing:
        raise OnnxoptError(f"execution provider {', '.join(missing)} is not offered by the aarch64 onnxruntime "
                           f"(it has {', '.join(have)})",
                           "drop --providers, or install an aarch64 onnxruntime build with it into the sysroot")
    return [*[p for p in wanted if p != "CPUExecutionProvider"], "CPUExecutionProvider"]


@dataclass
class ArmModelRun:
    """One model run on aarch64 against the same model on x86."""

    model: str
    providers: list[str]
    max_abs_diff: float | None
    top1_agreement: float | None
    accuracy_arm: float | None = None
    accuracy_x86: float | None = None
    emulated_wall_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ArmComparison:
    """What the aarch64 runs showed: each model against its x86 run, and the candidate's drop on arm64."""

    target: str
    onnxruntime: str
    machine: str
    qemu_cpu: str
    runs: dict[str, ArmModelRun] = field(default_factory=dict)
    drop: float | None = None
    drop_basis: str = ""
    note: str = ("under qemu-user emulation: outputs and accuracy are those of the aarch64 onnxruntime; emulated wall "
                 "time is not a device latency and is not reported as one (any latency above is this x86 machine's)")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "onnxruntime": self.onnxruntime, "machine": self.machine, "qemu_cpu": self.qemu_cpu,
                "runs": {k: v.to_dict() for k, v in self.runs.items()}, "drop": self.drop, "drop_basis": self.drop_basis,
                "note": self.note}


def run_models(runtime: Arm64Runtime, models: Sequence[str | os.PathLike[str]], dataset: Dataset,
               output_names: Sequence[str], *, providers: Sequence[str] | None = None,
               threads: int = 1) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Run each model over ``dataset`` on the aarch64 onnxruntime; its outputs per model and what it ran on."""
    arm_providers = _arm_providers(runtime, providers)
    runner = Path(__file__).with_name("arm_runner.py")
    tmp = Path(tempfile.mkdtemp(prefix="onnxopt-arm64-"))
    try:
        arrays: dict[str, np.ndarray] = {}
        feeds = []
        for i, batch in enumerate(dataset.batches()):
            feed = {}
            for name, value in batch.items():
                key = f"b{i}_{len(arrays)}"
                arrays[key] = value
                feed[name] = key
            feeds.append(feed)
        np.savez(tmp / "inputs.npz", **arrays)
        request = {"models": [str(Path(m).resolve()) for m in models], "inputs": str(tmp / "inputs.npz"), "feeds": feeds,
                   "outputs": [str(tmp / f"out{i}.npz") for i in range(len(models))], "output_names": list(output_names),
                   "providers": arm_providers, "threads": threads, "report": str(tmp / "report.json")}
        (tmp / "request.json").write_text(json.dumps(request))
        try:
            proc = subprocess.run([str(runtime.launcher), str(runner), str(tmp / "request.json")], capture_output=True,
                                  text=True, timeout=TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise OnnxoptError(f"the aarch64 run took over {TIMEOUT_SECONDS} s under emulation",
                               "validate on fewer samples (a smaller --eval file)") from None
        if proc.returncode != 0 or not (tmp / "report.json").exists():
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise OnnxoptError(f"the aarch64 onnxruntime failed under emulation: {last[:300]}",
                               f"check the environment: {runtime.launcher} -c 'import onnxruntime' (or rerun {SETUP_SCRIPT})")
        report = json.loads((tmp / "report.json").read_text())
        if "error" in report:
            raise OnnxoptError(report["error"], "drop --providers, or install an aarch64 onnxruntime build with it")
        outputs = []
        for path in request["outputs"]:
            with np.load(path) as npz:
                outputs.append({n: npz[n] for n in output_names})
        return outputs, report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_on_arm64(reference: str | os.PathLike[str], candidate: str | os.PathLike[str], dataset: Dataset,
                     x86_outputs: Mapping[str, Mapping[str, np.ndarray]], output_names: Sequence[str], *,
                     providers: Sequence[str] | None = None, threads: int = 1,
                     runtime: Arm64Runtime | None = None, declared: Mapping[str, str] | None = None) -> ArmComparison:
    """Run both models on aarch64 and compare with their x86 outputs (``{"reference"|"candidate": {name: array}}``).

    The drop on arm64 is validate's: every output by its metric (``declared``, i.e. ``--metric``, else chosen
    from the output), the worst gated.
    """
    runtime = runtime or find_runtime()
    outputs, info = run_models(runtime, [reference, candidate], dataset, output_names, providers=providers, threads=threads)
    result = ArmComparison("arm64", info.get("onnxruntime", "?"), info.get("machine", "?"),
                           info.get("qemu_cpu") or "neoverse-n1 (default)")
    first = output_names[0]
    for role, arm, meta in zip(("reference", "candidate"), outputs, info["models"]):
        x86 = x86_outputs[role]
        diffs = [float(np.max(np.abs(arm[n].astype(np.float64) - x86[n].astype(np.float64)))) for n in output_names
                 if arm[n].size and arm[n].shape == x86[n].shape and np.issubdtype(arm[n].dtype, np.number)]
        run = ArmModelRun(str(reference if role == "reference" else candidate), meta["providers"],
                          max(diffs) if diffs else None, top1_agreement(x86[first], arm[first]),
                          emulated_wall_seconds=meta.get("emulated_wall_seconds"))
        if dataset.labels is not None:
            run.accuracy_arm = _accuracy(arm, dataset.labels, declared)
            run.accuracy_x86 = _accuracy(x86, dataset.labels, declared)
        result.runs[role] = run
    result.drop, result.drop_basis, _, _ = gated_drop(outputs[0], outputs[1], dataset.labels, declared)
    return result


def _accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray, declared: Mapping[str, str] | None) -> float | None:
    """The accuracy against the labels of the output they describe (the one validate gives them to), if any."""
    rows = gated_drop(outputs, outputs, labels, declared)[3]
    return next((r["accuracy"]["candidate"] for r in rows if r.get("accuracy")), None)


def validate_on_arm64(reference: str | os.PathLike[str], candidate: str | os.PathLike[str], *,
                      eval_data: str | os.PathLike[str] | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                      providers: Sequence[str] | None = None, threads: int = 1, seed: int = 0,
                      metrics: Mapping[str, str] | None = None) -> ArmComparison:
    """`onnxopt validate --target arm64`: both models on x86 (CPU) and on aarch64, compared."""
    from onnxopt.api import load_data
    from onnxopt.io import load_model
    from onnxopt.sessions import SessionFactory
    from onnxopt.validate import collect_outputs

    runtime = find_runtime()  # before any work: a missing environment is the likeliest failure
    _arm_providers(runtime, providers)
    ref = load_model(reference)
    dataset = load_data(ref, eval_data, shapes, synthetic_ok=True, seed=seed)
    if dataset is None:
        from onnxopt.data import input_specs, shape_hint

        raise OnnxoptError("no data to validate on and the inputs have free dims",
                           f"give --eval data.npz (or an ONNX test-data folder), or {shape_hint(input_specs(ref))}")
    sessions = SessionFactory(threads=threads)
    ref_s, cand_s = sessions.create(ref), sessions.create(load_model(candidate))
    cand_names = {o.name for o in cand_s.get_outputs()}
    names = [o.name for o in ref_s.get_outputs() if o.name in cand_names]
    if not names:
        raise OnnxoptError("the candidate has none of the reference's outputs", "compare models with the same outputs")
    x86 = {"reference": collect_outputs(ref_s, dataset, names), "candidate": collect_outputs(cand_s, dataset, names)}
    return compare_on_arm64(reference, candidate, dataset, x86, names, providers=providers, threads=threads, runtime=runtime,
                            declared=metrics)


def format_comparison(result: ArmComparison) -> list[str]:
    """Lines for the terminal: each model on aarch64 against x86, and the candidate's drop on arm64."""
    lines = [f"arm64 (aarch64 onnxruntime {result.onnxruntime}, qemu cpu {result.qemu_cpu}):"]
    for role, run in result.runs.items():
        acc = ""
        if run.accuracy_arm is not None and run.accuracy_x86 is not None:
            acc = (f", accuracy {run.accuracy_arm * 100:.2f}% on arm64 vs {run.accuracy_x86 * 100:.2f}% on x86 "
                   f"({(run.accuracy_arm - run.accuracy_x86) * 100:+.2f} pt)")
        agree = "-" if run.top1_agreement is None else f"{run.top1_agreement * 100:.2f}%"
        diff = "-" if run.max_abs_diff is None else f"{run.max_abs_diff:.3g}"
        lines.append(f"  {role}: top-1 agreement with x86 {agree}, max abs diff {diff}{acc}  [{', '.join(run.providers)}]")
    if result.drop is not None:
        lines.append(f"  drop on arm64 {result.drop * 100:.2f} pt ({result.drop_basis})")
    lines.append(f"  note: {result.note}")
    return lines
