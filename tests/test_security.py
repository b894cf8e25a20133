"""Security: external data stays in the model's folder, loading runs no code, failing plugins are named, inputs are never overwritten."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnxopt.cli import cli

from tests.graphs import gemm_chain
from tests.helpers import run_cli
from tests.probe_plugin import DISTRIBUTION, PLUGIN_NAME, VERSION, probe_env


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(output: str, mention: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and mention.lower() in lines[0].lower(), output
    assert "Traceback" not in output


# --- external data -----------------------------------------------------------------------------

def _external_model(folder: Path, location: str) -> Path:
    """gemm_chain with its weights in one external file, its location then rewritten to ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(gemm_chain(), str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())
    return path


def _escape_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.data").write_bytes((tmp_path / "model" / "w.data").read_bytes())
    (tmp_path / "model" / "link.data").symlink_to(outside / "w.data")
    (tmp_path / "model" / "linked_dir").symlink_to(outside, target_is_directory=True)
    (tmp_path / "model" / "sub").mkdir()
    return {
        "absolute": (str(outside / "w.data"), "absolute"),
        "dot-dot": ("../outside/w.data", "'..'"),
        "dot-dot inside a path": ("sub/../../outside/w.data", "'..'"),
        "symlinked file": ("link.data", "outside the model's folder"),
        "symlinked folder": ("linked_dir/w.data", "outside the model's folder"),
        "drive letter": ("C:\\Windows\\w.data", "absolute"),
    }


@pytest.mark.parametrize("case", ["absolute", "dot-dot", "dot-dot inside a path", "symlinked file", "symlinked folder",
                                  "drive letter"])
def test_external_data_outside_the_folder_is_refused(case: str, tmp_path: Path) -> None:
    model = _external_model(tmp_path / "model", "w.data")
    location, mention = _escape_cases(tmp_path)[case]
    model = _external_model(tmp_path / "model", location)
    before = model.read_bytes()
    result = _invoke("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    _one_line_error(result.output, mention)
    assert not (tmp_path / "out.onnx").exists() and model.read_bytes() == before


def test_external_data_inside_the_folder_is_read(tmp_path: Path) -> None:
    """The same model with its data in place loads and runs (the refusals above are about the location only)."""
    model = _external_model(tmp_path / "model", "w.data")
    result = _invoke("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(tmp_path / "out.onnx"))


# --- no code runs while loading ----------------------------------------------------------------

TOKEN = "onnxopt_payload_7f3a"

AUDITED_RUN = f"""
import os, sys
seen = []
SPAWN = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen", "pickle.find_class")
def probe_fork(event):
    # onnxopt's own fork (onnxopt.forked: the ORT probe before validation) runs no input: it is not a spawn
    return event == "os.fork" and sys._getframe(2).f_code.co_filename.endswith(os.path.join("onnxopt", "forked.py"))
def hook(event, args):
    # process spawning or unpickling at all, or any source text from the inputs reaching compile()/exec()
    if (event.startswith(SPAWN) and not probe_fork(event)) or (event in ("compile", "exec") and {TOKEN!r} in repr(args[0])):
        seen.append(event + " " + repr(args)[:200])
sys.addaudithook(hook)
from onnxopt.cli import cli
try:
    cli(sys.argv[1:], prog_name="onnxopt", standalone_mode=True)
finally:
    with open(os.environ["AUDIT_LOG"], "w") as fh:
        fh.write("\\n".join(seen))
"""


class _Payload:
    """Unpickling this would create the marker file: proof that data was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _hostile_model(path: Path, marker: Path) -> None:
    """A valid model whose every free-text field is Python that would create ``marker`` if run."""
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()  # {TOKEN}"
    proto = gemm_chain()
    proto.doc_string = code
    proto.producer_name = code
    proto.graph.doc_string = code
    proto.graph.node[0].doc_string = code
    proto.graph.node[0].name = code
    helper.set_model_props(proto, {"python": code, "onnxruntime.custom_op_library": str(marker), TOKEN: code})
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _audited(tmp_path: Path, *args: object) -> tuple[subprocess.CompletedProcess[str], str]:
    log = tmp_path / "audit.log"
    proc = subprocess.run([sys.executable, "-c", AUDITED_RUN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "AUDIT_LOG": str(log)}, timeout=300)
    return proc, log.read_text()


def test_loading_and_running_a_hostile_model_runs_none_of_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    _hostile_model(tmp_path / "m.onnx", marker)
    proc, seen = _audited(tmp_path, "apply", tmp_path / "m.onnx", "--pass", "fold", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert seen == "" and not marker.exists()
    proc, seen = _audited(tmp_path, "inspect", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert seen == "" and not marker.exists()


def test_pickled_data_is_refused_not_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    _hostile_model(tmp_path / "m.onnx", marker)
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(tmp_path / "evil.npz", x=payload)
    assert b"touch" in pickle.dumps(_Payload(marker))  # the file really carries a pickle that would run
    proc, seen = _audited(tmp_path, "apply", tmp_path / "m.onnx", "--pass", "fold", "--eval", tmp_path / "evil.npz",
                          "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc.stderr, "evil.npz")
    assert seen == "" and not marker.exists() and not (tmp_path / "out.onnx").exists()


# --- plugins that fail ---------------------------------------------------------------------------

@pytest.mark.parametrize("hook", ["register", "metrics", "before", "after"])
def test_failing_plugin_is_named_and_the_run_stops_cleanly(hook: str, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(gemm_chain().SerializeToString())
    before = model.read_bytes()
    proc = run_cli("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx", env=probe_env(tmp_path, fail=hook))
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc.stderr, f"plugin {PLUGIN_NAME} ({DISTRIBUTION} {VERSION})")
    assert f"ONNXOPT_DISABLE_PLUGINS={PLUGIN_NAME}" in proc.stderr  # and how to get past it
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "probe-site"]  # no output, no temp file


def test_blocking_the_failing_plugin_lets_the_run_through(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(gemm_chain().SerializeToString())
    env = {**probe_env(tmp_path, fail="import"), "ONNXOPT_DISABLE_PLUGINS": PLUGIN_NAME}
    proc = run_cli("apply", model, "--pass", "fold", "-o", tmp_path / "out.onnx", env=env)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(tmp_path / "out.onnx"))


# --- never overwrite an input ----------------------------------------------------------------------

def _overwrite_cases(tmp_path: Path) -> dict[str, tuple[list[object], str]]:
    model = tmp_path / "m.onnx"
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 16), np.float32))
    fold = ["apply", model, "--pass", "fold"]
    return {
        "same path": ([*fold, "-o", model], "is the input model"),
        "other spelling": ([*fold, "-o", tmp_path / "sub" / ".." / "m.onnx"], "is the input model"),
        "symlink to input": ([*fold, "-o", tmp_path / "link.onnx"], "is the input model"),
        "hard link to input": ([*fold, "-o", tmp_path / "hard.onnx"], "is the input model"),
        "output is the eval data": ([*fold, "--eval", tmp_path / "eval.npz", "-o", tmp_path / "eval.npz"], "--eval file"),
        "report is the input": ([*fold, "-o", tmp_path / "out.onnx", "--report", model], "is the input model"),
        "report is the output": ([*fold, "-o", tmp_path / "out.onnx", "--report", tmp_path / "out.onnx"], "output model"),
        "validate report is the reference": (["validate", model, model, "--report", tmp_path / "link.onnx"], "reference model"),
    }


@pytest.mark.parametrize("case", ["same path", "other spelling", "symlink to input", "hard link to input",
                                  "output is the eval data", "report is the input", "report is the output",
                                  "validate report is the reference"])
def test_inputs_are_never_overwritten(case: str, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(gemm_chain().SerializeToString())
    args, mention = _overwrite_cases(tmp_path)[case]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = _invoke(*args)
    assert result.exit_code == 2
    _one_line_error(result.output, mention)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "out.onnx").exists()


def test_output_data_file_never_replaces_the_inputs_data(tmp_path: Path) -> None:
    """a.onnx keeps its weights in b.onnx.data: writing b.onnx (weights in b.onnx.data) would destroy them."""
    model = tmp_path / "a.onnx"
    onnx.save_model(gemm_chain(), str(model), save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    data = (tmp_path / "b.onnx.data").read_bytes()
    result = _invoke("apply", model, "--pass", "fold", "-o", tmp_path / "b.onnx")
    assert result.exit_code == 2
    _one_line_error(result.output, "a data file of the input model")
    assert (tmp_path / "b.onnx.data").read_bytes() == data and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("where", ["report folder missing", "output folder not writable"])
def test_unusable_destinations_are_one_line_errors(where: str, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(gemm_chain().SerializeToString())
    if where == "report folder missing":
        args, mention = ["-o", tmp_path / "out.onnx", "--report", tmp_path / "none" / "r.json"], "does not exist"
    else:
        if not Path("/proc").is_dir():
            pytest.skip("needs a folder nobody can write to, such as Linux's /proc")
        args, mention = ["-o", "/proc/out.onnx"], "cannot write into /proc"
    result = _invoke("apply", model, "--pass", "fold", *args)
    assert result.exit_code == 2
    _one_line_error(result.output, mention)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
