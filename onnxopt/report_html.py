"""The HTML report: one self-contained page (inline CSS, inline SVG charts drawn here, no network, no libraries).

It is rendered from the same dict as the JSON report (``RunReport.to_dict()``, a
search's ``SearchState.to_dict()``), so a field added to the JSON appears in the
page without a change here: known sections get their own layout, anything else
is shown by shape (a dict as a key/value table, a list of dicts as a table with
a bar chart per numeric column, an interval ``{"median", "low", "high"}`` as a
value with its range and error bars).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["render_html"]

#: Keys that name the layer an item (a row of a pass's ``items``) is about, in order of preference.
LAYER_KEYS = ("node", "layer", "weight", "tensor", "name", "group", "target")
#: Keys of an interval: a centre and its two ends.
_CENTRE = ("median", "value", "mean", "estimate", "point")
_ENDS = (("low", "high"), ("lo", "hi"), ("ci_low", "ci_high"), ("lower", "upper"))
#: Most bars in one chart; past it the largest are shown and the chart says how many were left out.
MAX_BARS = 40
PALETTE = ("#3867d6", "#20bf6b", "#fa8231", "#8854d0", "#eb3b5a", "#0fb9b1", "#f7b731", "#4b6584")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1e272e;background:#f5f6fa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #dfe4ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#57606f;margin:0 0 12px}
section{background:#fff;border-radius:8px;padding:12px 18px;margin:14px 0;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px;max-width:100%}
th,td{border-bottom:1px solid #eceff3;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#57606f;font-weight:600;white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#f1f2f6;border-radius:6px;padding:8px 14px;min-width:120px}.card b{display:block;font-size:20px}
.card span{color:#57606f;font-size:12px}.ok{color:#20bf6b}.bad{color:#eb3b5a}.muted{color:#747d8c}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600;color:#fff}
.badge.ok{background:#20bf6b}.badge.bad{background:#eb3b5a}.badge.muted{background:#a4b0be}
svg.chart{display:block;margin:6px 0 14px;max-width:100%;height:auto}svg text{font:11px system-ui,sans-serif;fill:#2f3542}
details>summary{cursor:pointer;color:#3867d6;margin:6px 0}ul{margin:4px 0 8px;padding-left:20px}
.charts{display:flex;flex-wrap:wrap;gap:8px 28px}
"""

#: After load, count the charts whose marks have a size on screen (a browser test reads the attributes).
CHECK_SCRIPT = """
window.addEventListener('load',function(){var c=document.querySelectorAll('svg.chart'),n=0;
c.forEach(function(s){var m=s.querySelectorAll('.mark'),ok=m.length>0;
m.forEach(function(e){var b=e.getBBox();if(!(b.width>=0&&b.height>=0&&(b.width>0||b.height>0)))ok=false;});
if(ok)n++;else console.error('chart not drawn: '+(s.getAttribute('aria-label')||'?'));});
document.body.setAttribute('data-charts',String(c.length));document.body.setAttribute('data-charts-drawn',String(n));});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _bytes(n: Any) -> str:
    if not _is_num(n):
        return _fmt(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def interval(value: Any) -> tuple[float, float, float] | None:
    """``(centre, low, high)`` when ``value`` is an interval dict, else None."""
    if not isinstance(value, Mapping):
        return None
    centre = next((value[k] for k in _CENTRE if _is_num(value.get(k))), None)
    for lo, hi in _ENDS:
        if _is_num(value.get(lo)) and _is_num(value.get(hi)):
            low, high = float(value[lo]), float(value[hi])
            return (float(centre) if centre is not None else (low + high) / 2, low, high)
    return None


def _scalar(value: Any) -> float | None:
    """A number to chart: the value, or an interval's centre."""
    if _is_num(value):
        return float(value)
    iv = interval(value)
    return iv[0] if iv else None


def _cell(value: Any, key: str = "") -> str:
    iv = interval(value)
    if iv is not None:
        return f"{_fmt(iv[0])} <span class=muted>[{_fmt(iv[1])}, {_fmt(iv[2])}]</span>"
    if _is_num(value) and "bytes" in key:
        return _e(_bytes(value))
    if isinstance(value, Mapping):
        if len(value) <= 6 and all(not isinstance(v, (Mapping, list)) for v in value.values()):
            return ", ".join(f"{_e(k)}: {_e(_fmt(v))}" for k, v in value.items()) or "–"
        return f"<details><summary>{len(value)} keys</summary>{_any(value)}</details>"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value) and len(value) <= 12:
            return _e(", ".join(_fmt(v) for v in value)) or "–"
        return f"<details><summary>{len(value)} items</summary>{_any(list(value))}</details>"
    return _e(_fmt(value))


def _td(value: Any, key: str = "") -> str:
    cls = " class=n" if _is_num(value) or interval(value) is not None else ""
    return f"<td{cls}>{_cell(value, key)}</td>"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A table of dicts; columns are the union of their keys (in first-seen order) unless given."""
    if not rows:
        return "<p class=muted>none</p>"
    cols = list(columns or _columns(rows))
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_td(row.get(c), c) for c in cols) + "</tr>" for row in rows)
    return f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"


def key_values(data: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th>{_td(v, k)}</tr>" for k, v in data.items())
    return f"<div class=scroll><table>{rows}</table></div>"


def _any(value: Any) -> str:
    """Render any JSON value by its shape."""
    if isinstance(value, Mapping):
        return key_values(value) if value else "<p class=muted>empty</p>"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            return rows_view(value)
        if not value:
            return "<p class=muted>none</p>"
        return "<ul>" + "".join(f"<li>{_cell(v)}</li>" for v in value) + "</ul>"
    return f"<p>{_cell(value)}</p>"


# --- charts -------------------------------------------------------------------------------------------------

def bar_chart(title: str, labels: Sequence[str], values: Sequence[Any], *, unit: str = "", line: float | None = None,
              color: str = PALETTE[0]) -> str:
    """Horizontal bars, one per label; interval values get error bars; ``line`` marks a reference (e.g. 1.0×)."""
    points = [(str(lab), _scalar(v), interval(v)) for lab, v in zip(labels, values)]
    points = [p for p in points if p[1] is not None]
    if not points:
        return ""
    left_out = 0
    if len(points) > MAX_BARS:
        left_out = len(points) - MAX_BARS
        points = sorted(points, key=lambda p: -abs(p[1]))[:MAX_BARS]
    ends = [p[1] for p in points] + [e for p in points if p[2] for e in p[2][1:]] + ([line] if line is not None else []) + [0.0]
    lo, hi = min(ends), max(ends)
    if hi == lo:
        hi = lo + 1.0
    label_w = min(260, 12 + 6.6 * max(len(p[0]) for p in points))
    plot_w, row_h, top = 420, 18, 22
    width, height = label_w + plot_w + 90, top + row_h * len(points) + 22

    def x(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    parts = [f'<text x="0" y="14" font-weight="600">{_e(title)}</text>']
    for i, (lab, v, iv) in enumerate(points):
        y = top + i * row_h
        short = lab if len(lab) <= 38 else lab[:17] + "…" + lab[-18:]
        x0, x1 = sorted((x(0.0), x(v)))
        parts.append(f'<text x="{label_w - 6:.1f}" y="{y + 12}" text-anchor="end"><title>{_e(lab)}</title>{_e(short)}</text>')
        parts.append(f'<rect class="mark" x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 1.0):.1f}" height="{row_h - 5}" '
                     f'fill="{color}" rx="2"><title>{_e(lab)}: {_e(_fmt(v))}{_e(unit)}</title></rect>')
        if iv is not None:
            parts.append(f'<line x1="{x(iv[1]):.1f}" x2="{x(iv[2]):.1f}" y1="{y + 8}" y2="{y + 8}" stroke="#2f3542" stroke-width="1.5"/>')
        after = max(x1, x(iv[2])) if iv is not None else x1  # the label clears the error bar
        parts.append(f'<text x="{after + 4:.1f}" y="{y + 12}">{_e(_fmt(v))}{_e(unit)}</text>')
    axis_y = top + row_h * len(points) + 2
    parts.append(f'<line x1="{x(0.0):.1f}" x2="{x(0.0):.1f}" y1="{top}" y2="{axis_y}" stroke="#a4b0be"/>')
    if line is not None:
        parts.append(f'<line x1="{x(line):.1f}" x2="{x(line):.1f}" y1="{top - 4}" y2="{axis_y}" stroke="#eb3b5a" '
                     f'stroke-dasharray="4 3"/><text x="{x(line) + 3:.1f}" y="{axis_y + 14}" fill="#eb3b5a">{_e(_fmt(line))}{_e(unit)}</text>')
    if left_out:
        parts.append(f'<text x="0" y="{axis_y + 14}" class="muted">{left_out} smaller bars not shown</text>')
    return (f'<svg class="chart" role="img" aria-label="{_e(title)}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def scatter_chart(title: str, points: Sequence[Mapping[str, Any]], x_key: str, y_key: str, *, x_label: str, y_label: str,
                  front: set[Any] = frozenset(), best: Any = None, x_line: float | None = None,
                  x_scale: float = 1.0, y_scale: float = 1.0) -> str:
    """Candidates as dots (x: ``x_key`` × x_scale, y: ``y_key`` × y_scale); the front joined by a line, the best ringed."""
    pts = [(p, _scalar(p.get(x_key)), _scalar(p.get(y_key))) for p in points]
    pts = [(p, xv * x_scale, yv * y_scale) for p, xv, yv in pts if xv is not None and yv is not None]
    if not pts:
        return ""
    xs, ys = [p[1] for p in pts] + ([x_line] if x_line is not None else []), [p[2] for p in pts]
    x0, x1, y0, y1 = min(xs + [0.0]), max(xs), min(ys + [0.0]), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    w, h, ml, mb, mt = 520, 300, 64, 40, 24

    def sx(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (w - ml - 16)

    def sy(v: float) -> float:
        return mt + (1 - (v - y0) / (y1 - y0)) * (h - mt - mb)

    parts = [f'<text x="0" y="14" font-weight="600">{_e(title)}</text>',
             f'<line x1="{ml}" x2="{w - 10}" y1="{h - mb}" y2="{h - mb}" stroke="#a4b0be"/>',
             f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{h - mb}" stroke="#a4b0be"/>']
    for xv in _ticks(x0, x1):
        parts.append(f'<text x="{sx(xv):.1f}" y="{h - mb + 14}" text-anchor="middle">{_e(_fmt(xv))}</text>')
    for yv in _ticks(y0, y1):
        parts.append(f'<text x="{ml - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{_e(_fmt(yv))}</text>')
    parts.append(f'<text x="{(ml + w) / 2:.0f}" y="{h - 6}" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text x="12" y="{(mt + h - mb) / 2:.0f}" transform="rotate(-90 12 {(mt + h - mb) / 2:.0f})" '
                 f'text-anchor="middle">{_e(y_label)}</text>')
    if x_line is not None:
        parts.append(f'<line x1="{sx(x_line):.1f}" x2="{sx(x_line):.1f}" y1="{mt}" y2="{h - mb}" stroke="#eb3b5a" '
                     f'stroke-dasharray="4 3"/><text x="{sx(x_line) + 3:.1f}" y="{mt + 10}" fill="#eb3b5a">budget</text>')
    on_front = sorted((p for p in pts if p[0].get("id") in front), key=lambda p: p[1])
    if len(on_front) > 1:
        path = " ".join(f"{sx(xv):.1f},{sy(yv):.1f}" for _, xv, yv in on_front)
        parts.append(f'<polyline class="mark" points="{path}" fill="none" stroke="{PALETTE[2]}" stroke-width="1.5"/>')
    for p, xv, yv in pts:
        is_front = p.get("id") in front
        fill = PALETTE[2] if is_front else "#a4b0be"
        tip = f"#{p.get('id')} {p.get('label', '')}: {x_label} {_fmt(xv)}, {y_label} {_fmt(yv)}"
        parts.append(f'<circle class="mark" cx="{sx(xv):.1f}" cy="{sy(yv):.1f}" r="{4.5 if is_front else 3.5}" fill="{fill}" '
                     f'fill-opacity="0.85"><title>{_e(tip)}</title></circle>')
        if best is not None and p.get("id") == best:
            parts.append(f'<circle cx="{sx(xv):.1f}" cy="{sy(yv):.1f}" r="9" fill="none" stroke="{PALETTE[1]}" stroke-width="2"/>'
                         f'<text x="{sx(xv) + 11:.1f}" y="{sy(yv) - 6:.1f}" fill="{PALETTE[1]}">best #{_e(best)}</text>')
    return (f'<svg class="chart" role="img" aria-label="{_e(title)}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def _layer(row: Mapping[str, Any]) -> str | None:
    """The layer a row is about: a known key, else its first text field."""
    for key in LAYER_KEYS:
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
    return next((v for v in row.values() if isinstance(v, str) and v), None)


def _by_shape(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Rows split where their keys change (a pass may list groups, then refits): one table per kind."""
    groups: list[list[Mapping[str, Any]]] = []
    for row in rows:
        if groups and set(groups[-1][0]) == set(row):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def rows_view(rows: Sequence[Mapping[str, Any]]) -> str:
    """Tables (one per kind of row) and a bar chart per numeric column."""
    return "".join(table(g) + numeric_charts(g) for g in _by_shape(rows))


def numeric_charts(rows: Sequence[Mapping[str, Any]], *, limit: int = 4) -> str:
    """A bar chart per numeric column of ``rows`` (labelled by each row's layer), sensitivity and drops first."""
    if len(rows) < 2:
        return ""
    labels = [(f"#{r['id']} " if "id" in r else "") + (_layer(r) or "") or str(i) for i, r in enumerate(rows)]
    numeric = [c for c in _columns(rows) if c not in LAYER_KEYS and c != "id"
               and sum(_scalar(r.get(c)) is not None for r in rows) >= 2
               and len({_scalar(r.get(c)) for r in rows} - {None}) > 1]
    numeric.sort(key=lambda c: (not any(w in c for w in ("sensitiv", "drop", "error", "snr")), 0))
    charts = [bar_chart(c, labels, [r.get(c) for r in rows], color=PALETTE[i % len(PALETTE)])
              for i, c in enumerate(numeric[:limit])]
    return f'<div class="charts">{"".join(charts)}</div>' if charts else ""


# --- the run report (apply, validate) ------------------------------------------------------------------------

_FIGURES = (("size", "size_bytes", _bytes), ("parameters", "parameters", _fmt), ("weights stored", "weight_bytes", _bytes),
            ("MACs", "macs", _fmt), ("latency ms", "latency_ms", _fmt))
_PASS_KEYS = {"pass", "summary", "config", "modified", "figures", "items", "skipped", "notes", "seconds"}
_RUN_KEYS = {"input", "output", "written", "load_notes", "passes", "validation", "validation_note", "max_drop",
             "gate_passed", "notes", "environment", "command", "candidate"}


def _card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card"><b class="{cls}">{_e(value)}</b><span>{_e(label)}</span></div>'


def _verdict(data: Mapping[str, Any]) -> str:
    if data.get("gate_passed") is True:
        return f'<span class="badge ok">within --max-drop {_e(data.get("max_drop"))}</span>'
    if data.get("gate_passed") is False:
        return f'<span class="badge bad">over --max-drop {_e(data.get("max_drop"))}</span>'
    return '<span class="badge muted">no budget given</span>'


def _run_summary(data: Mapping[str, Any]) -> str:
    v = data.get("validation") or {}
    written = data.get("written")
    out = data.get("output")
    where = (f"wrote <b>{_e(out)}</b>" if written else f"<b class=bad>did not write {_e(out)}</b>") if out else "no file written"
    if data.get("candidate"):  # validate: two files compared, nothing written
        where = f"candidate <b>{_e(data['candidate'])}</b>"
    cards = []
    if v:
        cards.append(_card(f"drop ({v.get('drop_basis', '')})", f"{(_scalar(v.get('drop')) or 0.0) * 100:.2f} pt",
                           "bad" if data.get("gate_passed") is False else "ok"))
        acc = v.get("accuracy") or {}
        if acc:
            cards.append(_card("accuracy, reference → candidate",
                               f"{acc.get('reference', 0) * 100:.2f}% → {acc.get('candidate', 0) * 100:.2f}%"))
        for label, key, _ in _FIGURES:
            ratio = (v.get("ratios") or {}).get(key)
            if _is_num(ratio):
                cards.append(_card(f"{label}, candidate / reference", f"{ratio:.3f}×"))
    return (f'<section><p class=sub>{_e(data.get("input", ""))} → {where} · {_verdict(data)}</p>'
            f'<div class="cards">{"".join(cards)}</div>'
            + (f'<p>validation: {_e(data.get("validation_note"))}</p>' if data.get("validation_note") else "") + "</section>")


def _validation(v: Mapping[str, Any]) -> str:
    parts = [f'<h2>Validation</h2><section><p class=sub>on {_e(v.get("dataset"))} · {_e(v.get("samples"))} samples'
             + (" · fidelity only" if v.get("fidelity_only") else "")
             + f' · providers {_e(", ".join(v.get("providers") or []))} · {_e(v.get("threads"))} thread'
             + ("s" if (v.get("threads") or 1) != 1 else "") + "</p>"]
    ref, cand, ratios = v.get("reference") or {}, v.get("candidate") or {}, v.get("ratios") or {}
    known = [key for _, key, _ in _FIGURES]
    # the known figures first, then any other a newer report carries (e.g. latency intervals), by the same layout
    keys = [k for k in known if k in ref or k in cand] + [k for k in _columns([ref, cand]) if k not in known]
    labels = {key: label for label, key, _ in _FIGURES}
    fig = "".join(f"<tr><th>{_e(labels.get(k, k))}</th>{_td(fmt_cell(ref.get(k), k), k)}{_td(fmt_cell(cand.get(k), k), k)}"
                  f"<td class=n>{f'{ratios[k]:.3f}×' if _is_num(ratios.get(k)) else '–'}</td></tr>" for k in keys)
    parts.append(f"<h3>Model figures</h3><table><tr><th></th><th>reference</th><th>candidate</th><th>ratio</th></tr>{fig}</table>")
    shown = [(labels.get(k, k), ratios[k]) for k in ratios if _is_num(ratios.get(k))]
    if shown:
        parts.append(bar_chart("candidate / reference (1.0 = unchanged)", [s[0] for s in shown], [s[1] for s in shown],
                               unit="×", line=1.0))
    outputs = v.get("outputs") or {}
    if outputs:
        rows_out = [{"output": name, **metrics} for name, metrics in outputs.items()]
        parts.append("<h3>Metrics per output</h3>" + table(rows_out) + numeric_charts(rows_out, limit=3))
    rest = {k: val for k, val in v.items() if k not in {"dataset", "samples", "fidelity_only", "outputs", "reference",
                                                          "candidate", "ratios", "providers", "threads", "accuracy",
                                                          "drop", "drop_basis"}}
    if rest:
        parts.append(f"<h3>Also measured</h3>{_any(rest)}")
    return "".join(parts) + "</section>"


def fmt_cell(value: Any, key: str) -> Any:
    return _bytes(value) if key.endswith("bytes") and _is_num(value) else value


def _ledger(passes: Sequence[Mapping[str, Any]], ledger: Any) -> str:
    rows = []
    for p in passes:
        row = {"pass": p.get("pass"), "result": p.get("summary") or ("changed" if p.get("modified") else "no change"),
               "layers": len(p.get("items") or []), "skipped": len(p.get("skipped") or []), "seconds": p.get("seconds")}
        row.update({k: v for k, v in p.items() if k not in _PASS_KEYS})  # e.g. a per-pass drop, size, latency
        rows.append(row)
    out = "<h2>Passes</h2><section>" + table(rows)
    if isinstance(ledger, list) and ledger and all(isinstance(r, Mapping) for r in ledger):
        labels = [str(r.get("pass") or r.get("step") or r.get("name") or i) for i, r in enumerate(ledger)]
        out += "<h3>Ledger: what each pass cost and won</h3>" + table(ledger)
        cols = [c for c in _columns(ledger) if sum(_scalar(r.get(c)) is not None for r in ledger) >= 1 and c not in ("pass", "step")]
        out += '<div class="charts">' + "".join(bar_chart(c, labels, [r.get(c) for r in ledger], color=PALETTE[i % 8])
                                                for i, c in enumerate(cols[:6])) + "</div>"
    elif ledger is not None:
        out += "<h3>Ledger</h3>" + _any(ledger)
    extra = [c for c in _columns(rows) if c not in ("pass", "result", "layers", "skipped", "seconds")
             and any(_scalar(r.get(c)) is not None for r in rows)]
    if extra:  # per-pass figures a newer report carries (drop, size, latency, with intervals): a chart each
        out += '<div class="charts">' + "".join(bar_chart(f"{c} per pass", [str(r["pass"]) for r in rows],
                                                          [r.get(c) for r in rows], color=PALETTE[(i + 4) % 8])
                                                for i, c in enumerate(extra[:6])) + "</div>"
    charted = [r for r in rows if _is_num(r.get("seconds"))]
    if len(charted) > 1:
        out += bar_chart("seconds per pass", [r["pass"] for r in charted], [r["seconds"] for r in charted], unit=" s",
                         color=PALETTE[3])
    return out + "</section>"


def _layers_matrix(passes: Sequence[Mapping[str, Any]]) -> str:
    """One row per layer, one column per pass: what each pass did to it (from the passes' items)."""
    matrix: dict[str, dict[str, str]] = {}
    for p in passes:
        for item in p.get("items") or []:
            layer = _layer(item) if isinstance(item, Mapping) else None
            if layer is None:
                continue
            bits = [f"{k} {_fmt(v) if not interval(v) else _fmt(interval(v)[0])}" for k, v in item.items()
                    if k not in LAYER_KEYS and (not isinstance(v, (Mapping, list)) or interval(v))][:4]
            cells = matrix.setdefault(layer, {})
            text = ", ".join(bits) or "changed"
            name = str(p.get("pass"))
            cells[name] = f"{cells[name]}; {text}" if name in cells else text  # a pass may list a layer twice
        for skip in p.get("skipped") or []:
            if isinstance(skip, Mapping) and skip.get("target"):
                matrix.setdefault(str(skip["target"]), {})[str(p.get("pass"))] = f"skipped: {skip.get('reason', '')}"
    if not matrix:
        return ""
    names = [str(p.get("pass")) for p in passes]
    rows = [{"layer": layer, **{n: cells.get(n, "") for n in names}} for layer, cells in matrix.items()]
    return "<h2>Layers</h2><section><p class=sub>what each pass did to each layer</p>" + table(rows, ["layer", *names]) + "</section>"


def _pass_detail(p: Mapping[str, Any]) -> str:
    parts = [f'<h3>{_e(p.get("pass"))} <span class=muted>— {_e(p.get("summary", ""))}</span></h3>']
    if p.get("figures"):
        parts.append(_any(p["figures"]))
    items = p.get("items") or []
    if items:
        parts.append(f"<p class=sub>{len(items)} row(s), per layer</p>" + rows_view(items))
    if p.get("skipped"):
        parts.append("<p class=sub>skipped</p>" + table(p["skipped"]))
    if p.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in p["notes"]) + "</ul>")
    if p.get("config"):
        parts.append(f"<details><summary>config</summary>{key_values(p['config'])}</details>")
    return "<section>" + "".join(parts) + "</section>"


def _notes(title: str, notes: Iterable[Any]) -> str:
    notes = list(notes)
    return f"<h2>{_e(title)}</h2><section><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>" if notes else ""


def _run_page(data: Mapping[str, Any]) -> tuple[str, str]:
    passes = [p for p in data.get("passes") or [] if isinstance(p, Mapping)]
    title = "onnxopt " + (" → ".join(str(p.get("pass")) for p in passes) if passes else "validate")
    body = [_run_summary(data)]
    if data.get("validation"):
        body.append(_validation(data["validation"]))
    if passes or data.get("ledger") is not None:
        body.append(_ledger(passes, data.get("ledger")))
        body.append(_layers_matrix(passes))
        if passes:
            body.append("<h2>Each pass</h2>" + "".join(_pass_detail(p) for p in passes))
    body.append(_notes("Load notes", data.get("load_notes") or []))
    body.append(_notes("Notes", data.get("notes") or []))
    for key, value in data.items():  # fields this page has no layout for (an arm64 target, new figures...)
        if key not in _RUN_KEYS and key != "ledger" and value not in (None, [], {}):
            body.append(f"<h2>{_e(key)}</h2><section>{_any(value)}</section>")
    body.append(_environment(data.get("environment")))
    return title, "".join(body)


# --- the search report ---------------------------------------------------------------------------------------

_SEARCH_KEYS = {"schema", "fingerprint", "settings", "reference", "complete", "best", "output", "notes", "fronts",
                "sessions", "candidates", "environment"}
_CANDIDATE_COLUMNS = ("id", "label", "status", "drop", "within_budget", "size_bytes", "size_ratio", "latency_ms", "speedup",
                      "front", "stage", "error")


def _search_page(data: Mapping[str, Any]) -> tuple[str, str]:
    settings = data.get("settings") or {}
    candidates = [c for c in data.get("candidates") or [] if isinstance(c, Mapping)]
    ok = [c for c in candidates if c.get("status") == "ok"]
    best = data.get("best")
    budget = settings.get("max_drop")
    ref = data.get("reference") or {}
    chosen = next((c for c in candidates if c.get("id") == best), None)
    cards = [_card("candidates measured", str(len(ok))), _card("budget (max drop)", f"{(budget or 0) * 100:.2f} pt")]
    if chosen is not None:
        cards.append(_card(f"best #{best}: drop", f"{chosen.get('drop', 0) * 100:.2f} pt", "ok"))
        if _is_num(chosen.get("size_ratio")):
            cards.append(_card("best: smaller by", f"{chosen['size_ratio']:.2f}×"))
        if _is_num(chosen.get("speedup")):
            cards.append(_card("best: faster by", f"{chosen['speedup']:.2f}×"))
    status = "complete" if data.get("complete") else "not complete (resumable)"
    head = (f'<section><p class=sub>{_e(ref.get("path", ""))} · objective {_e(settings.get("objective", ""))} · '
            f'passes {_e(", ".join(settings.get("passes") or []))} · {status}'
            + (f' · wrote <b>{_e(data.get("output"))}</b>' if data.get("output") else "")
            + (' · <span class="badge bad">nothing within budget</span>' if best is None and data.get("complete") else "")
            + f'</p><div class="cards">{"".join(cards)}</div></section>')
    fronts = data.get("fronts") or {}
    charts = []
    for axis, key, scale, label in (("size", "size_bytes", 1 / 1024, "size KB"), ("latency", "latency_ms", 1.0, "latency ms")):
        charts.append(scatter_chart(f"Pareto front: drop against {axis}", ok, "drop", key, x_label="drop (pt)",
                                    y_label=label, front=set(fronts.get(axis) or []), best=best,
                                    x_line=None if budget is None else budget * 100, x_scale=100.0, y_scale=scale))
    body = [head, "<h2>Pareto fronts</h2><section><p class=sub>every measured candidate; the front (orange) is what no "
            "other candidate beats on both axes; the dashed line is the budget</p>"
            f'<div class="charts">{"".join(charts)}</div></section>']
    rows = [{k: c.get(k) for k in _CANDIDATE_COLUMNS if k in c} for c in sorted(candidates, key=lambda c: (c.get("status") != "ok", c.get("drop") or 0))]
    body.append(f"<h2>Candidates</h2><section>{table(rows)}")
    more = [{"id": c.get("id"), **{k: v for k, v in c.items() if k not in _CANDIDATE_COLUMNS}} for c in candidates]
    if more:
        body.append(f"<details><summary>every field of every candidate</summary>{table(more)}</details>")
    body.append("</section>")
    body.append(f"<h2>Reference</h2><section>{_any(ref)}</section>")
    body.append(_notes("Notes", data.get("notes") or []))
    for key, value in data.items():
        if key not in _SEARCH_KEYS and value not in (None, [], {}):
            body.append(f"<h2>{_e(key)}</h2><section>{_any(value)}</section>")
    body.append(f"<h2>Settings</h2><section><details><summary>search settings</summary>{_any(settings)}</details>"
                f"<details><summary>sessions</summary>{_any(data.get('sessions') or [])}</details></section>")
    body.append(_environment(data.get("environment")))
    return "onnxopt search", "".join(body)


def _environment(env: Any) -> str:
    if not isinstance(env, Mapping) or not env:
        return ""
    return "<h2>Environment</h2><section><p class=sub>" + " · ".join(f"{_e(k)} {_e(v)}" for k, v in env.items()) + "</p></section>"


def render_html(data: Mapping[str, Any]) -> str:
    """The page for a report dict: a search's (it has ``candidates``) or a run's (apply, validate)."""
    title, body = _search_page(data) if "candidates" in data and "fingerprint" in data else _run_page(data)
    raw = html.escape(json.dumps(data, indent=1, default=str)[:2_000_000])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{_e(title)}</title><style>{CSS}</style></head>'
            f'<body><main><h1>{_e(title)}</h1>{body}<h2>Raw</h2><section><details><summary>the JSON this page was '
            f'made from</summary><pre>{raw}</pre></details></section></main><script>{CHECK_SCRIPT}</script></body></html>\n')
