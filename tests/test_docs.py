"""The runnable examples of docs/ run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    return [(f"{p.name}#{i}", code) for p in sorted(DOCS.glob("*.md")) for i, code in enumerate(RUNNABLE.findall(p.read_text()))]


@pytest.mark.parametrize("label,code", _examples(), ids=[label for label, _ in _examples()])
def test_runnable_example(label: str, code: str, tmp_path: Path) -> None:
    if "onnxscript" in code:
        pytest.importorskip("onnxscript")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if label.startswith("writing-passes"):  # the onnx-ir example ends with what is left of its model
        assert proc.stdout.strip().splitlines()[-1] == "['Gemm']", proc.stdout


def test_the_ir_example_is_found() -> None:
    assert any(label.startswith("writing-passes.md") for label, _ in _examples())
