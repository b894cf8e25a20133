"""The commands in the README and the examples walk-through run as written (so they never rot)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import run_cli


def _commands(doc: Path) -> list[str]:
    """`onnxopt ...` lines of the ```bash blocks, joining backslash continuations."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("onnxopt "):
                    commands.append(part)
    return commands


WALKTHROUGH = _commands(ROOT / "examples" / "README.md")
QUICKSTART = [c for c in _commands(ROOT / "README.md") if "examples/digits" in c][:1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch copy of the examples so the commands' outputs land outside the repo; commands run in order."""
    work = tmp_path_factory.mktemp("walkthrough")
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return work


def test_walkthrough_has_commands() -> None:
    assert len(WALKTHROUGH) >= 5 and QUICKSTART


@pytest.mark.parametrize("command", QUICKSTART + WALKTHROUGH, ids=lambda c: " ".join(c.split()[:3]))
def test_command_runs(command: str, workdir: Path) -> None:
    proc = run_cli(*shlex.split(command)[1:], cwd=workdir)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    out = re.search(r"(?:-o|--output) (\S+)", command)
    if out:
        assert (workdir / out.group(1)).is_file()


def _python_blocks(doc: Path) -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S) if "examples/digits" in b]


@pytest.mark.parametrize("snippet", _python_blocks(ROOT / "README.md"), ids=lambda s: s.splitlines()[1][:30])
def test_readme_python_runs(snippet: str, workdir: Path) -> None:
    """The README's Python API snippet runs as written, and checks ``written`` (so an over-budget run is not silent)."""
    import subprocess
    import sys

    assert "run.written" in snippet
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = re.search(r'"(\w+\.onnx)"', snippet.split("examples/digits/cnn.onnx", 1)[1])
    assert out and (workdir / out.group(1)).is_file()
    # over budget (a budget no int8 model meets on this data), the same check stops the script and nothing is written
    strict = snippet.replace("max_drop=0.01", "max_drop=-1.0").replace('"cnn_int8.onnx"', '"strict.onnx"')
    proc = subprocess.run([sys.executable, "-c", strict], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and not (workdir / "strict.onnx").exists(), proc.stderr[-2000:]
