"""A building block for users: `python -m build` makes a wheel and an sdist, and the wheel alone works.

The wheel is installed into a fresh venv (no site packages of this one, no
editable checkout on the path), which then compresses the bundled digits
example from a folder outside the repository.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, unavailable


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_wheel_and_sdist_build_and_the_wheel_runs_apply(digits: Path, tmp_path: Path) -> None:
    try:
        import build  # noqa: F401
    except ImportError:
        unavailable("build", "the build package is not installed (pip install -e '.[test]')")
    dist = tmp_path / "dist"
    # no --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist (so the sdist is proven
    # complete, and no build/ folder is left in the checkout)
    proc = _run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = list(dist.glob("onnxopt-*.whl")), list(dist.glob("onnxopt-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())

    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert {"onnxopt/cli.py", "onnxopt/report_html.py", "onnxopt_passes/fold.py", "onnxopt_passes/quant/__init__.py"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fold = onnxopt_passes.fold" in zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    with tarfile.open(sdists[0]) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "onnxopt/api.py", "passes/prune/__init__.py"} <= members

    venv = tmp_path / "venv"
    proc = _run(sys.executable, "-m", "venv", venv)
    assert proc.returncode == 0, proc.stderr
    proc = _run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheels[0])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    # the installed package, not this checkout: run from outside the repository with a clean environment
    proc = _run(venv / "bin" / "python", "-c", "import onnxopt, onnxopt_passes; print(onnxopt.__file__)", cwd=work)
    assert proc.returncode == 0 and str(venv) in proc.stdout, proc.stdout + proc.stderr
    proc = _run(venv / "bin" / "onnxopt", "apply", digits / "cnn.onnx", "--pass", "fold,quant", "--data", digits / "calib.npz",
                "--eval", digits / "eval.npz", "--max-drop", "0.02", "-o", work / "cnn_int8.onnx", "--report", work / "r.html",
                cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "cnn_int8.onnx").stat().st_size < 0.5 * (digits / "cnn.onnx").stat().st_size
    assert "within" in proc.stdout and (work / "r.html").read_text().startswith("<!DOCTYPE html>")
