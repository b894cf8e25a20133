"""The HTML report (`--report x.html`): one self-contained page, checked in a real headless Chromium.

Chromium renders each page (no network: the page must need none), takes a
screenshot, and dumps the DOM after load, where the page's own check has
counted the charts whose marks have a size on screen. Console errors fail the
test. Skipped where no chromium is installed (CI installs Debian's).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from onnxopt.report_html import interval, render_html
from tests.conftest import unavailable
from tests.helpers import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def chromium() -> str:
    if CHROMIUM is None:
        unavailable("chromium", "chromium is not installed (apt-get install chromium)")
    return CHROMIUM


needs_chromium = pytest.mark.usefixtures("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


def check_in_browser(page: Path, tmp: Path) -> tuple[int, str]:
    """Render ``page``: screenshot it, and return (charts drawn, DOM). Fails on console errors or a network request."""
    html = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html), "the page loads something from the network"
    assert "<svg" in html and "<style>" in html
    shot = tmp / (page.stem + ".png")
    proc = _chromium(page, tmp, "--window-size=1280,2400", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    dom = _chromium(page, tmp, "--dump-dom", "--virtual-time-budget=5000")
    # chromium logs every console message (whatever its level) as ":CONSOLE"; the page itself writes none unless
    # a chart failed to draw, so any is a failure
    errors = [line for line in (proc.stderr + dom.stderr).splitlines() if ":CONSOLE" in line]
    assert not errors, errors
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:2000]
    charts = re.search(r'data-charts="(\d+)"', body.group(0))
    drawn = re.search(r'data-charts-drawn="(\d+)"', body.group(0))
    assert charts and drawn, f"the page's check did not run: {body.group(0)}"
    assert charts.group(1) == drawn.group(1), f"only {drawn.group(1)} of {charts.group(1)} charts drew"
    return int(drawn.group(1)), dom.stdout


@pytest.fixture(scope="module")
def apply_pages(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("html")
    proc = run_cli("apply", digits / "cnn.onnx", "--pass", "fold,prune,quant", "--set", "prune.saliency=reconstruct",
                   "--data", digits / "calib.npz",
                   "--eval", digits / "eval.npz", "--max-drop", "0.05", "-o", work / "c.onnx",
                   "--report", work / "run.json", "--report", work / "run.html", "-q")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("validate", digits / "cnn.onnx", work / "c.onnx", "--eval", digits / "eval.npz", "--report", work / "v.html")
    assert proc.returncode == 0, proc.stderr
    return work


def test_apply_page_is_rendered_from_the_json(apply_pages: Path) -> None:
    data = json.loads((apply_pages / "run.json").read_text())
    html = (apply_pages / "run.html").read_text()
    assert render_html(data) == html
    for p in data["passes"]:
        assert p["summary"].replace("->", "-&gt;") in html
        for item in p["items"]:  # every layer each pass touched has its row
            name = item.get("node") or item.get("group") or item.get("refit")
            assert name and name in html
    assert f'{data["validation"]["drop"] * 100:.2f} pt' in html


@needs_chromium
def test_apply_and_validate_pages_render_in_chromium(apply_pages: Path, tmp_path: Path) -> None:
    drawn, dom = check_in_browser(apply_pages / "run.html", tmp_path)
    # the model-figure ratios, seconds per pass, and per-layer charts of prune and quant
    assert drawn >= 5
    assert "Layers" in dom and "node_Conv_120" in dom
    drawn, dom = check_in_browser(apply_pages / "v.html", tmp_path)
    assert drawn >= 1 and "Metrics per output" in dom and f"candidate <b>{apply_pages / 'c.onnx'}</b>" in dom


def test_new_fields_render_generically() -> None:
    """Fields this module has never heard of (a per-pass ledger, latency intervals) still show, intervals with ends."""
    data = {"input": "m.onnx", "output": None, "written": False, "passes": [
        {"pass": "prune", "summary": "s", "items": [{"node": "conv1", "sensitivity": 0.02}, {"node": "conv2", "sensitivity": 0.001}],
         "drop": {"median": 0.004, "low": 0.001, "high": 0.008}}],
        "ledger": [{"pass": "prune", "drop": 0.004, "latency_ms": {"median": 1.5, "low": 1.4, "high": 1.7}},
                   {"pass": "quant", "drop": 0.006, "latency_ms": {"median": 0.9, "low": 0.85, "high": 0.97}}],
        "validation": None, "validation_note": "skipped", "brand_new_section": {"answer": 42}}
    html = render_html(data)
    assert interval(data["ledger"][0]["latency_ms"]) == (1.5, 1.4, 1.7)
    assert "1.5 <span class=muted>[1.4, 1.7]</span>" in html and "0.004 <span class=muted>[0.001, 0.008]</span>" in html
    assert "brand_new_section" in html and "42" in html
    assert html.count('class="chart"') >= 3 and "sensitivity" in html
    assert '<line x1=' in html  # error bars


@needs_chromium
def test_generic_page_renders_in_chromium(tmp_path: Path) -> None:
    data = {"input": "m.onnx", "passes": [{"pass": "p", "summary": "s", "items": [
        {"node": f"layer{i}", "sensitivity": 0.01 * i, "kept": 16 - i} for i in range(12)]}],
        "ledger": [{"pass": "p", "drop": 0.01, "latency_ms": {"median": 1.0, "low": 0.9, "high": 1.2}},
                   {"pass": "q", "drop": 0.02, "latency_ms": {"median": 0.7, "low": 0.6, "high": 0.8}}]}
    page = tmp_path / "g.html"
    page.write_text(render_html(data))
    drawn, _ = check_in_browser(page, tmp_path)
    assert drawn >= 3


@needs_chromium
def test_search_page_renders_in_chromium(digits: Path, tmp_path: Path) -> None:
    proc = run_cli("search", digits / "cnn.onnx", "--eval", digits / "eval.npz", "--data", digits / "calib.npz",
                   "--passes", "quant,cluster", "--max-candidates", "4", "--workers", "1", "--max-drop", "0.02",
                   "--report", tmp_path / "s.json", "--report", tmp_path / "s.html", "-q")
    assert proc.returncode in (0, 3), proc.stderr
    state = json.loads((tmp_path / "s.json").read_text())
    html = (tmp_path / "s.html").read_text()
    ok = [c for c in state["candidates"] if c.get("status") == "ok"]
    assert len(ok) >= 2
    assert html.count("<circle") >= len(ok)  # a dot per candidate on each front chart
    drawn, dom = check_in_browser(tmp_path / "s.html", tmp_path)
    assert drawn >= 2 and "Pareto front: drop against size" in dom


@needs_chromium
def test_the_browser_check_catches_errors_and_undrawn_charts(tmp_path: Path) -> None:
    """The checker itself: a script error, and a chart with nothing drawn, each fail it."""
    page = tmp_path / "bad.html"
    good = render_html({"input": "m.onnx", "passes": [{"pass": "p", "items": [{"node": "a", "x": 1}, {"node": "b", "x": 2}]}]})
    page.write_text(good.replace("<main>", "<main><script>undefined_function();</script>"))
    with pytest.raises(AssertionError, match="CONSOLE"):
        check_in_browser(page, tmp_path)
    page.write_text(good.replace("<main>", '<main><svg class="chart"><rect class="mark" width="0" height="0"/></svg>'))
    with pytest.raises(AssertionError, match="chart not drawn|charts drew"):
        check_in_browser(page, tmp_path)


def test_report_paths_one_of_each_format(tmp_path: Path) -> None:
    from onnxopt.errors import OnnxoptError
    from onnxopt.report import is_html, report_paths

    assert [is_html(p) for p in report_paths([tmp_path / "a.json", tmp_path / "a.HTML"])] == [False, True]
    assert report_paths(None) == [] and report_paths(tmp_path / "r.json") == [tmp_path / "r.json"]
    with pytest.raises(OnnxoptError, match="2 HTML paths"):
        report_paths([tmp_path / "a.html", tmp_path / "b.htm"])
    with pytest.raises(OnnxoptError, match="2 JSON paths"):
        report_paths([tmp_path / "a.json", tmp_path / "b.txt"])
