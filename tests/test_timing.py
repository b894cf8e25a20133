"""onnxopt.timing measures what it claims, on real ORT sessions under real load.

These tests check the measurement's correctness (an interval that covers the
truth, a verdict that follows the interval), never our own speed; every
timing is bounded by the module's time cap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import pytest
from rich.console import Console

from onnxopt.errors import OnnxoptError
from onnxopt.search.driver import SearchResult, _finish
from onnxopt.search.evaluate import latency_fields
from onnxopt.search.report import print_search
from onnxopt.search.state import SearchState
from onnxopt.sessions import SessionFactory
from onnxopt.timing import (
    SESSION_FLOOR,
    TimingConfig,
    compare_latency,
    compare_latency_isolated,
    compare_unpaired,
    format_ratio,
    ratio_interval,
    sample_latency_ms,
)
from tests.graphs import conv_stack
from tests.helpers import run_cli

FEED = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
#: every timing in this file stops at this cap (seconds), precise or not
CAP = 4.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("timing")
    paths = {"narrow": folder / "narrow.onnx", "wide": folder / "wide.onnx"}
    onnx.save(conv_stack(16), paths["narrow"])
    onnx.save(conv_stack(32), paths["wide"])  # the same network, Conv widths doubled
    np.savez(folder / "eval.npz", x=FEED["x"])
    return paths


@pytest.fixture()
def busy_core() -> Iterator[None]:
    """One core kept busy by a spinning child process for the test's duration."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it reach the scheduler before the timing starts
        yield
    finally:
        spinner.kill()
        spinner.wait()


def test_session_against_itself_under_load_gets_an_interval_that_covers_1(models: dict[str, Path], busy_core: None) -> None:
    """One session timed against itself: the true ratio is exactly 1, and the interval must cover it."""
    session = SessionFactory(threads=1).create(models["narrow"])
    result = compare_latency(session, session, FEED, TimingConfig(time_budget=CAP))
    assert result.low <= 1.0 <= result.high, result.to_dict()
    assert result.verdict == "same" and "no measurable difference" in result.text()
    assert result.seconds < CAP + 2.0  # the cap holds (plus at most one block and the warm-up)


def test_two_sessions_of_one_model_under_load_are_never_called_different(models: dict[str, Path],
                                                                          busy_core: None) -> None:
    """Two sessions of one model differ by where their buffers landed (CI measured 1.017, interval 1.007–1.027,
    with a core busy), a real but steady gap no timing can average away: the verdict must still be "same"."""
    factory = SessionFactory(threads=1)
    a, b = factory.create(models["narrow"]), factory.create(models["narrow"])
    result = compare_latency(a, b, FEED, TimingConfig(time_budget=CAP))
    assert 0.9 <= result.ratio <= 1.1, result.to_dict()
    assert result.verdict == "same" and "no measurable difference" in result.text(), result.to_dict()


def test_wider_model_is_reported_slower(models: dict[str, Path], busy_core: None) -> None:
    factory = SessionFactory(threads=1)
    narrow, wide = factory.create(models["narrow"]), factory.create(models["wide"])
    result = compare_latency(narrow, wide, FEED, TimingConfig(time_budget=CAP))
    assert result.low > 1.0 and result.verdict == "slower", result.to_dict()
    assert result.candidate_ms > result.reference_ms
    assert "slower" in result.text() and "faster" not in result.text()
    # the other way round, the same pair is faster: candidate ÷ reference, below 1
    back = compare_latency(wide, narrow, FEED, TimingConfig(time_budget=CAP))
    assert back.high < 1.0 and back.verdict == "faster" and "faster" in back.text()


def test_models_timed_apart_get_an_interval_and_a_warning(models: dict[str, Path]) -> None:
    """Validation of models too large for two sessions times them one after the other: no pairing, said so."""
    factory = SessionFactory(threads=1)
    narrow = sample_latency_ms(factory.create(models["narrow"]), FEED, runs=200, seconds=1.0)
    wide = sample_latency_ms(factory.create(models["wide"]), FEED, runs=200, seconds=1.0)
    result = compare_unpaired(narrow, wide)
    assert result.low > 1.0 and result.verdict == "slower" and not result.paired
    assert result.ratio == pytest.approx(np.median(wide) / np.median(narrow), rel=0.01)
    assert any("not interleaved" in w for w in result.warnings)
    # what the report prints as "runs each in N s": the timed runs' own total, not 0.00
    assert result.seconds == pytest.approx((narrow.sum() + wide.sum()) / 1e3) and result.seconds > 0


def test_interval_and_wording_follow_the_order_statistics() -> None:
    rng = np.random.default_rng(1)
    logs = rng.normal(np.log(0.62), 0.05, 400)
    ratio, low, high = ratio_interval(logs)
    s = np.sort(logs)
    assert ratio == pytest.approx(np.exp(np.median(logs)))
    assert np.exp(s[0]) < low < ratio < high < np.exp(s[-1])
    assert format_ratio(0.62, 0.60, 0.64) == "0.62× (0.60–0.64), 1.6× faster"
    assert format_ratio(0.83, 0.70, 1.02).endswith("no measurable difference")
    assert format_ratio(1.2, 1.1, 1.3) == "1.20× (1.10–1.30), 1.2× slower"
    # an interval that excludes 1 by less than the timing resolves (two sessions of one model can differ by ~1%)
    assert format_ratio(0.99, 0.985, 0.995) == "0.99× (0.98–0.99), no measurable difference (under 3%)"


def test_interval_is_never_narrower_than_the_session_floor() -> None:
    """Two sessions of one model differ steadily by a few tenths of a percent; no interval may claim finer."""
    rng = np.random.default_rng(2)
    reference = np.exp(rng.normal(0.0, 1e-4, 4000))  # ms, almost no spread
    candidate = reference * 1.004  # 0.4% slower every single run
    result = compare_unpaired(reference, candidate)
    assert result.ratio == pytest.approx(1.004, rel=1e-3)
    assert result.low <= result.ratio * (1 - SESSION_FLOOR) + 1e-12 and result.low < 1.0 < result.high
    assert result.verdict == "same"
    with pytest.raises(OnnxoptError, match="precision"):
        TimingConfig(precision=SESSION_FLOOR / 2)


def test_validate_cli_reports_the_interval_in_text_and_json(models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "v.json"
    proc = run_cli("validate", models["narrow"], models["wide"], "--eval", models["narrow"].parent / "eval.npz",
                   "--time-budget", str(CAP), "--report", report)
    assert proc.returncode == 0, proc.stderr
    lat = json.loads(report.read_text())["validation"]["latency"]
    assert lat["low"] > 1.0 and lat["verdict"] == "slower"
    assert lat["ratio"] == pytest.approx(json.loads(report.read_text())["validation"]["ratios"]["latency_ms"])
    assert "slower" in proc.stdout and "faster" not in proc.stdout


def test_isolated_timing_matches_in_process_verdict(models: dict[str, Path]) -> None:
    result = compare_latency_isolated(models["narrow"], models["wide"], FEED, TimingConfig(time_budget=CAP))
    assert result.verdict == "slower" and result.pairs >= 20


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")
def test_pinned_timing_restores_the_affinity(models: dict[str, Path]) -> None:
    before = os.sched_getaffinity(0)
    factory = SessionFactory(threads=1)
    cpu = min(before)
    result = compare_latency(factory.create(models["narrow"]), factory.create(models["wide"]), FEED,
                             TimingConfig(time_budget=CAP, cpus=(cpu,)))
    assert result.verdict == "slower"
    assert os.sched_getaffinity(0) == before


def test_bad_timing_options_are_one_line(models: dict[str, Path]) -> None:
    proc = run_cli("validate", models["narrow"], models["narrow"], "--eval", models["narrow"].parent / "eval.npz",
                   "--repeat", "0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "--repeat 0" in proc.stderr


def _spawned_children(pid: int) -> list[int]:
    """Child processes of ``pid`` that multiprocessing's spawn started (not its resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd:
                out.append(int(child))
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the child through /proc (Linux)")
def test_crash_in_isolated_child_is_one_error_line(models: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "onnxopt", "validate", str(models["narrow"]), str(models["wide"]), "--eval",
           str(models["narrow"].parent / "eval.npz"), "--isolate", "--repeat", "1000000", "--time-budget", "600", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        children: list[int] = []
        while not children and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            children = _spawned_children(proc.pid)
        assert children, "the timing child never started"
        time.sleep(1.0)  # into ORT's runs
        os.kill(children[0], signal.SIGSEGV)  # what a segfault in ORT does to the child
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the timing child process died (SIGSEGV)"), err
    assert "Traceback" not in err


def test_search_never_calls_a_slower_candidate_faster(models: dict[str, Path], busy_core: None) -> None:
    """The size pick is slower than the reference: the table, the pick line and the JSON must say so."""
    factory = SessionFactory(threads=1)
    ref = factory.create(models["narrow"])
    same = compare_latency(ref, factory.create(models["narrow"]), FEED, TimingConfig(time_budget=CAP))
    slower = compare_latency(ref, factory.create(models["wide"]), FEED, TimingConfig(time_budget=CAP))
    assert slower.verdict == "slower"
    state = SearchState(None, {})
    state.settings = {"max_drop": 0.01, "objective": "size", "threads": 1, "latency_batch": 1, "space": {}, "base": None}
    state.reference = {"size_bytes": 1000, "accuracy": 0.9}
    for i, (timed, size) in enumerate(((same, 900), (slower, 500))):  # the slower one is the smaller: the pick
        state.candidates.append({"id": i, "key": str(i), "status": "ok", "recipe": [], "drop": 0.0, "accuracy": 0.9,
                                 "size_bytes": size, "latency_source": "serial", **latency_fields(timed)})
    best = _finish(state, None, state.candidates, 0.01, "size", 30, None)  # type: ignore[arg-type]
    assert best is not None and best["id"] == 1
    out = StringIO()
    print_search(SearchResult(state, best, 2, 0, False), Console(file=out, width=400, highlight=False))
    text = out.getvalue()
    pick_lines = [line for line in text.splitlines() if line.lstrip().startswith("*#1") or "latency" in line and "->" in line]
    assert pick_lines and all("faster" not in line and "slower" in line for line in pick_lines), text
    assert best["latency_ratio"] > 1 and best["latency_low"] > 1 and "slower" in best["latency_text"]
    assert "speedup" not in best and best["size_ratio"] == pytest.approx(0.5)
    # the same candidate timed as no different must not be called faster either
    assert "faster" not in state.candidates[0]["latency_text"]
