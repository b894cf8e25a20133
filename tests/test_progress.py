"""Progress of long work when stderr is a log: plain lines now and then, nothing for short work."""

from __future__ import annotations

import pytest

from onnxopt import progress as progress_module
from onnxopt.progress import Progress


def test_a_log_gets_plain_lines_of_a_long_task_and_nothing_of_a_short_one(monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(enabled=False, lines=True).task("quant: sensitivity per node", total=3) as task:
        task.advance()
    assert capsys.readouterr().err == ""  # well under LINE_SECONDS: a log is not cluttered

    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)  # every step is "long"
    with Progress(enabled=False, lines=True).task("quant: sensitivity per node", total=3) as task:
        for _ in range(3):
            task.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == [f"onnxopt: quant: sensitivity per node: {i}/3 (0s)" for i in (1, 2, 3)]
    assert lines[3] == "onnxopt: quant: sensitivity per node: 3/3 done (0s)" and len(lines) == 4

    with Progress(enabled=False).task("quiet", total=2) as task:  # --quiet, or the Python API: nothing
        task.advance()
    assert capsys.readouterr().err == ""
