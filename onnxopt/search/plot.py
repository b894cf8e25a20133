"""The Pareto plot of a search: accuracy against latency and against size, the budget, the pick.

Two panels share the accuracy axis; up and to the left is better. Every
candidate is a grey dot (hollow: over budget), each front a blue line
through its points labelled with candidate ids (as in the JSON), the
reference a black star and the pick a red ring with its figures.
Needs matplotlib (``pip install 'onnxopt[plot]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onnxopt.errors import OnnxoptError
from onnxopt.search.state import SearchState
from onnxopt.search.strategy import within_budget
from onnxopt.timing import format_ratio

__all__ = ["plot_search"]

def plot_search(state: SearchState, path: str | os.PathLike[str]) -> Path:
    """Draw the fronts of ``state`` to a PNG at ``path`` (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxoptError("--plot needs matplotlib, which is not installed", "pip install 'onnxopt[plot]'") from None
    path = Path(path)
    ref = state.reference
    max_drop = float(state.settings.get("max_drop", 0.0))
    labels = ref.get("accuracy") is not None
    ok = [c for c in state.candidates if c.get("status") == "ok" and c.get("latency_ms") and c.get("size_bytes")]

    def y(c: dict[str, Any]) -> float:  # accuracy in % when labels exist, else agreement with the reference in %
        if labels:  # a candidate's drop is the budget's (1 - agreement): its accuracy is stored on its own
            return 100.0 * (c["accuracy"] if c.get("accuracy") is not None else ref["accuracy"] - c["drop"])
        return 100.0 * (1.0 - c["drop"])

    ref_y = 100.0 * (ref["accuracy"] if labels else 1.0)
    best = next((c for c in ok if c["id"] == state.best), None)
    within = [c for c in ok if within_budget(c, max_drop)]
    over = [c for c in ok if not within_budget(c, max_drop)]

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    batch, threads = state.settings.get("latency_batch", 1), state.settings.get("threads", 1)
    timing = f"latency, ms per run (batch {batch}, {threads} thread{'s' if threads > 1 else ''}; bars: 95% interval)"
    panels = (("latency", "latency_ms", timing, ref.get("latency_ms")),
              ("size", "size_bytes", "model file size, KB", ref.get("size_bytes")))
    for ax, (axis, attr, xlabel, ref_x) in zip(axes, panels):
        scale = 1 / 1024 if attr == "size_bytes" else 1.0
        first = axis == "latency"  # the legend is drawn once, from the left panel's handles
        ax.scatter([c[attr] * scale for c in within], [y(c) for c in within], s=20, color="#7f7f7f", alpha=0.6,
                   edgecolors="none", label="candidate within budget" if first else None)
        ax.scatter([c[attr] * scale for c in over], [y(c) for c in over], s=20, facecolors="none", edgecolors="#7f7f7f",
                   alpha=0.6, label="candidate over budget" if first else None)
        if axis == "latency":  # the measured interval of each candidate, on its own ms scale
            measured = [c for c in ok if c.get("latency_ratio") and c.get("latency_low") and c.get("latency_high")]
            if measured:
                xs_ = [c[attr] for c in measured]
                lows = [c[attr] * (1 - c["latency_low"] / c["latency_ratio"]) for c in measured]
                highs = [c[attr] * (c["latency_high"] / c["latency_ratio"] - 1) for c in measured]
                ax.errorbar(xs_, [y(c) for c in measured], xerr=[lows, highs], fmt="none", ecolor="#7f7f7f",
                            elinewidth=0.8, alpha=0.6, zorder=1)
        front = sorted((c for c in ok if c.get("front", {}).get(axis)), key=lambda c: c[attr])
        if front:
            ax.step([c[attr] * scale for c in front], [y(c) for c in front], where="post", color="#1f77b4", lw=1.4,
                    label="Pareto front" if first else None)
            ax.scatter([c[attr] * scale for c in front], [y(c) for c in front], s=44, color="#1f77b4",
                       edgecolors="black", linewidths=0.7, zorder=3)
            for c in front:
                ax.annotate(f"#{c['id']}", (c[attr] * scale, y(c)), xytext=(4, 4), textcoords="offset points",
                            fontsize=7, color="#1f4e79", clip_on=True)
        if ref_x:
            ax.scatter([ref_x * scale], [ref_y], marker="*", s=220, color="black", zorder=4,
                       label="reference (input model)" if first else None)
        ax.axhline(ref_y - 100.0 * max_drop, color="#d62728", ls="--", lw=1,
                   label=f"budget: -{100 * max_drop:g} pt" if first else None)
        if best is not None:
            bx, by = best[attr] * scale, y(best)
            ax.scatter([bx], [by], s=260, facecolors="none", edgecolors="#d62728", linewidths=2.2, zorder=5,
                       label="pick" if first else None)
            if axis == "latency":  # candidate ÷ reference with its interval: "faster" only when it is below 1
                text = f"pick #{best['id']}: " + format_ratio(best.get("latency_ratio"), best.get("latency_low"),
                                                              best.get("latency_high"))
            else:
                ratio = (best[attr] / ref_x) if ref_x else None
                text = f"pick #{best['id']}" + (f": {ratio:.2f}× size" if ratio else "") + \
                    (f" ({1 / ratio:.1f}× smaller)" if ratio and ratio < 1 else "")
            ax.annotate(text, (bx, by), xytext=(14, -24), textcoords="offset points", fontsize=9, color="#d62728",
                        arrowprops={"arrowstyle": "-", "color": "#d62728", "lw": 0.8})
        xs = [c[attr] for c in ok] + ([ref_x] if ref_x else [])
        if attr == "size_bytes" or (xs and max(xs) > 4 * min(xs)):  # a wide spread reads better on a log axis
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            xlabel += " (log scale)"
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.25)
        ax.set_title(f"accuracy vs {axis}  (better: up and left)", fontsize=11)
    axes[0].set_ylabel("top-1 accuracy on --eval, %" if labels else "top-1 agreement with the reference, %")
    # show the budget line and what is near it; candidates far below it are counted in the title instead
    floor = ref_y - 100.0 * max(2.5 * max_drop, 0.01)
    shown = [y(c) for c in ok if y(c) >= floor] + [ref_y, ref_y - 100.0 * max_drop]
    pad = 0.08 * (max(shown) - min(shown) or 1.0)
    axes[0].set_ylim(min(shown) - pad, max(shown) + pad)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    hidden = sum(1 for c in ok if y(c) < axes[0].get_ylim()[0])
    model = Path(str(ref.get("path", "model"))).name
    title = f"onnxopt search: {model}, {len(state.candidates)} candidates, budget {100 * max_drop:g} pt"
    if hidden:
        title += f" ({hidden} far below the budget not shown)"
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
