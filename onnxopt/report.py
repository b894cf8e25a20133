"""The run report: what each pass did, what validation measured, and whether the budget held.

Printed as tables in the terminal and written as JSON with ``--report``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from onnxopt.errors import OnnxoptError
from onnxopt.pass_api import PassReport
from onnxopt.validate import ValidationResult

__all__ = ["RunReport", "environment", "write_json", "write_report", "report_paths", "is_html", "print_report", "format_bytes"]


def environment() -> dict[str, str]:
    """Versions that explain the figures: onnxopt, onnx, onnxruntime, numpy, Python, CPU."""
    import numpy
    import onnx
    import onnxruntime

    from onnxopt import __version__

    return {
        "onnxopt": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
    }


@dataclass
class RunReport:
    """Everything one ``onnxopt apply`` did."""

    input: str
    output: str | None = None
    written: bool = False
    load_notes: list[str] = field(default_factory=list)
    passes: list[PassReport] = field(default_factory=list)
    validation: ValidationResult | None = None
    validation_note: str = ""
    max_drop: float | None = None
    gate_passed: bool | None = None
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=environment)
    #: how --eval was split into selection and confirmation (None: no split)
    split: dict[str, Any] | None = None
    #: the final model's drop on the selection part (the validation's drop is on the confirmation part)
    drop_selection: float | None = None
    #: one row per pass of the chain: drops on both parts, size, latency, kept / rolled back
    ledger: list[dict[str, Any]] = field(default_factory=list)
    #: warnings that must not be missed (printed first)
    warnings: list[str] = field(default_factory=list)

    @property
    def optimism(self) -> float | None:
        """Confirmation drop minus selection drop: how much the choices flattered the data they were made on."""
        if self.drop_selection is None or self.validation is None:
            return None
        return self.validation.drop - self.drop_selection

    def budget_choices(self) -> list[dict[str, Any]]:
        """What --max-drop chose per pass: setting, ladder, tried rungs, why."""
        return [{"pass": p.pass_name, **p.figures["budget"]} for p in self.passes if "budget" in p.figures]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "load_notes": self.load_notes,
            "passes": [p.to_dict() for p in self.passes],
            "validation": self.validation.to_dict() if self.validation else None,
            "validation_note": self.validation_note,
            "max_drop": self.max_drop,
            "gate_passed": self.gate_passed,
            "notes": self.notes,
            "environment": self.env,
            "warnings": self.warnings,
            "split": self.split,
            "drop_selection": self.drop_selection,
            "drop_confirmation": self.validation.drop if self.validation is not None else None,
            "optimism": self.optimism,
            "ledger": self.ledger,
            "budget_choices": self.budget_choices(),
        }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _write_text(text: str, path: Path, what: str) -> None:
    """Write atomically (temp file in the same folder, then rename), with the mode any new file gets here."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    except OSError as err:
        raise OnnxoptError(f"cannot write the {what} {path}: {err.strerror or err}",
                           "give --report a path in a folder that exists and that you can write to") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an output gets the mode any new file would
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    _write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n", Path(path), "report")


#: ``--report`` names ending so get the HTML page; any other name gets the JSON.
HTML_SUFFIXES = (".html", ".htm")


def is_html(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in HTML_SUFFIXES


def report_paths(report: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    """``--report`` as a list of paths (it may be given twice: JSON and HTML); two of one format is an error."""
    if report is None:
        return []
    paths = [Path(report)] if isinstance(report, (str, os.PathLike)) else [Path(p) for p in report]
    for kind, same in (("HTML", [p for p in paths if is_html(p)]), ("JSON", [p for p in paths if not is_html(p)])):
        if len(same) > 1:
            raise OnnxoptError(f"--report is given {len(same)} {kind} paths ({', '.join(map(str, same))})",
                               "give at most one .json and one .html")
    return paths


def write_report(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """The report at ``path``: the HTML page for a ``.html`` name, else JSON; both from the same dict."""
    if is_html(path):
        from onnxopt.report_html import render_html

        _write_text(render_html(_json_safe(data)), Path(path), "report")
    else:
        write_json(data, path)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _pt(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f} pt"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


#: Past this many outputs the metrics table turns: one row per output, one column per metric.
_OUTPUTS_AS_COLUMNS = 3


def _print_metrics(console: Console, v: ValidationResult) -> None:
    """Per-output metrics, never cut: rows fold long names, and the table may run wider than the terminal."""
    metric_names = sorted({m for row in v.outputs.values() for m in row})
    title = f"validation on {escape(v.dataset)} ({v.samples} samples{', fidelity only' if v.fidelity_only else ''})"
    table = Table(title=title, title_justify="left")
    if len(v.outputs) <= _OUTPUTS_AS_COLUMNS:
        cells = {name: [_fmt(row.get(m)) for m in metric_names] for name, row in v.outputs.items()}
        table.add_column("metric", no_wrap=True)
        for name, column in cells.items():
            table.add_column(escape(name), overflow="fold", min_width=max(len(c) for c in column) if column else None)
        for i, m in enumerate(metric_names):
            table.add_row(m, *(cells[name][i] for name in cells))
    else:
        table.add_column("output", overflow="fold", min_width=min(24, max(len(n) for n in v.outputs)))
        for m in metric_names:
            table.add_column(m, no_wrap=True, min_width=max(len(_fmt(row.get(m))) for row in v.outputs.values()))
        for name, row in v.outputs.items():
            table.add_row(escape(name), *(_fmt(row.get(m)) for m in metric_names))
    # a table wider than the terminal is printed at its own width (the terminal wraps it) instead of cut with "…"
    needed = console.measure(table).minimum
    console.print(table, width=max(console.width, needed))


def print_report(report: RunReport, console: Console | None = None) -> None:
    """Tables: passes, per-output metrics, model figures; then the verdict."""
    console = console or Console(soft_wrap=True)
    for warning in report.warnings:
        # wrapped inside the panel (soft wrap would crop it): every word of the command must show
        console.print(Panel(escape(warning), title="[bold]WARNING[/bold]", border_style="bold red", style="bold red"),
                      soft_wrap=False)
    for p in report.passes:  # first, so they cannot be missed
        for warning in p.warnings:
            console.print(f"[bold red]WARNING ({p.pass_name}): {escape(warning)}[/bold red]")
    for note in report.load_notes:
        console.print(f"[dim]load: {escape(note)}[/dim]")
    table = Table(title="passes", title_justify="left")
    for col in ("pass", "result", "skipped", "seconds"):
        table.add_column(col)
    for p in report.passes:
        table.add_row(p.pass_name, p.summary or ("changed" if p.modified else "no change"), str(len(p.skipped)), f"{p.seconds:.2f}")
    console.print(table)
    for p in report.passes:
        for note in p.notes:
            console.print(f"[dim]{p.pass_name}: {escape(note)}[/dim]")
    for choice in report.budget_choices():
        tried = ", ".join(f"{t['setting']}: {t['drop'] * 100:.2f} pt{'' if t['within'] else ' (over)'}" for t in choice["tried"])
        console.print(f"{escape(choice['pass'])}: --max-drop {choice['limit']:g} chose "
                      f"{escape(str(choice['chosen'] or 'nothing (pass not applied)'))}; tried {escape(tried)}")
        refined = choice.get("refinement")
        if refined:
            tried = ", ".join(f"{t['setting']}: {t['drop'] * 100:.2f} pt{'' if t['within'] else ' (over)'}"
                              for t in refined["tried"])
            console.print(f"{escape(choice['pass'])}: refinement of {escape(str(refined['from']))} "
                          f"{'kept' if refined['kept'] else 'not kept'}: {escape(refined['reason'])}; tried {escape(tried)}")
    if report.ledger:
        ledger = Table(title="ledger (the chain against the original after each pass)", title_justify="left")
        # margin: one standard error of the selection drop; keep or roll back is decided on drop + margin
        for col in ("pass", "action", "drop selection", "margin", "drop confirmation", "size", "latency ms"):
            ledger.add_column(col)
        for row in report.ledger:
            action = row["action"] if row["action"] != "rolled back" else "[bold red]rolled back[/bold red]"
            ledger.add_row(escape(row["pass"]), action, _pt(row.get("drop_selection")), _pt(row.get("margin_selection")),
                           _pt(row.get("drop_confirmation")), format_bytes(row.get("size_bytes")),
                           _fmt(row.get("latency_ms")))
        console.print(ledger)
        for row in report.ledger:
            if row["action"] == "rolled back":
                console.print(f"[bold]{escape(row['pass'])} rolled back[/bold]: {escape(str(row.get('reason', '')))}")
    v = report.validation
    if v is None:
        console.print(f"validation: {escape(report.validation_note or 'not run')}")
    else:
        _print_metrics(console, v)
        figures = Table(title="model", title_justify="left")
        for col in ("", "reference", "candidate", "ratio"):
            figures.add_column(col)
        rows = [("size", "size_bytes", format_bytes), ("parameters", "parameters", _fmt),
                ("weights stored", "weight_bytes", format_bytes), ("MACs", "macs", _fmt),
                (f"latency ms ({v.threads} thread{'s' if v.threads > 1 else ''})", "latency_ms", _fmt)]
        for label, attr, fmt in rows:
            ratio = v.ratio(attr)
            if attr == "latency_ms" and v.latency is not None:  # candidate ÷ reference with its interval
                shown = escape(v.latency.text())
            else:
                shown = "-" if ratio is None else f"{ratio:.3f}x"
            figures.add_row(label, fmt(getattr(v.reference, attr)), fmt(getattr(v.candidate, attr)), shown)
        console.print(figures)
        if v.latency is not None:
            lat = v.latency
            console.print(f"[dim]latency: candidate ÷ reference, median of {lat.pairs} "
                          f"{'paired blocks' if lat.paired else 'runs each'} in {lat.seconds:.2f} s, 95% interval[/dim]")
            for warning in lat.warnings:
                console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        for row in v.drop_outputs if len(v.drop_outputs) > 1 or any(r["metric"] != "top1" for r in v.drop_outputs) else []:
            console.print(f"[dim]drop of {escape(row['output'])}: {row['drop'] * 100:.2f} pt, metric {row['metric']} "
                          f"({escape(row['reason'])})[/dim]")
        part = " on the confirmation part" if report.split is not None else ""
        drop = f"drop {v.drop * 100:.2f} pt{part} ({escape(v.drop_basis)})"
        if v.accuracy:
            drop += f": {v.accuracy['reference'] * 100:.2f}% -> {v.accuracy['candidate'] * 100:.2f}%"
        console.print(drop)
        if report.drop_selection is not None:
            console.print(f"drop {report.drop_selection * 100:.2f} pt on the selection part (what the choices were made on); "
                          f"optimism of the choice {report.optimism * 100:+.2f} pt  [dim]{escape(report.split['how'])}[/dim]")
    if report.max_drop is not None and report.gate_passed is not None:
        verdict = "within" if report.gate_passed else "[bold red]over[/bold red]"
        console.print(f"budget --max-drop {report.max_drop}: {verdict}")
    for note in report.notes:
        console.print(escape(note))
    if report.output:
        console.print(f"wrote {report.output}" if report.written else f"[bold]did not write {report.output}[/bold]")
