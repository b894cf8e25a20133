"""The search's summary in the terminal: the fronts, the pick, and where the JSON and plot are."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from onnxopt.report import format_bytes
from onnxopt.search.driver import SearchResult
from onnxopt.timing import format_ratio

__all__ = ["print_search", "latency_text", "size_text"]


def latency_text(c: dict) -> str:
    """A candidate's latency as candidate ÷ reference with its interval; "faster" only when the interval says so."""
    return format_ratio(c.get("latency_ratio"), c.get("latency_low"), c.get("latency_high"))


def size_text(c: dict) -> str:
    """A candidate's file size as candidate ÷ reference, with how many times smaller."""
    ratio = c.get("size_ratio")
    if not ratio:
        return "-"
    return f"{ratio:.3f}× ({1 / ratio:.1f}× smaller)" if ratio < 1 else f"{ratio:.3f}×"


def print_search(result: SearchResult, console: Console | None = None) -> None:
    """A table of the front members (either front), then the pick against the reference."""
    console = console or Console(soft_wrap=True, highlight=False)
    state = result.state
    ref = state.reference
    max_drop = state.settings.get("max_drop", 0.0)
    statuses = [c.get("status") for c in state.candidates]
    console.print(f"search: {len(state.candidates)} candidates ({result.evaluated} evaluated now, {result.reused} from "
                  f"the JSON; {statuses.count('rejected')} rejected early, {statuses.count('failed')} failed)")
    console.print("Pareto fronts (L: accuracy drop against latency, S: against size); * = the pick, dim = over budget; "
                  "ratios are candidate ÷ reference (95% interval)")
    front = [c for c in state.candidates if c.get("front", {}).get("latency") or c.get("front", {}).get("size")]
    for c in sorted(front, key=lambda c: (c["drop"], c["size_bytes"])):
        marks = ("L" if c["front"]["latency"] else " ") + ("S" if c["front"]["size"] else " ")
        line = (f"{'*' if c['id'] == state.best else ' '}#{c['id']:<3} {marks}  drop {c['drop'] * 100:5.2f} pt  "
                f"{format_bytes(c['size_bytes']):>9} ({c.get('size_ratio') or 0:5.3f}×)  "
                f"{c['latency_ms']:.4f} ms ({escape(latency_text(c))})  {escape(c.get('label', ''))}")
        console.print(line, style="bold" if c["id"] == state.best else ("dim" if not c.get("within_budget") else None),
                      highlight=False)
    for note in state.notes:
        console.print(escape(note))
    best = result.best
    if best is None:
        console.print(f"[bold red]no candidate within --max-drop {max_drop}[/bold red]; nothing written")
        return
    acc = ""
    if ref.get("accuracy") is not None and best.get("accuracy") is not None:
        acc = f": {ref['accuracy'] * 100:.2f}% -> {best['accuracy'] * 100:.2f}%"
    console.print(f"best ({state.settings.get('objective')}): #{best['id']} {escape(best.get('label', ''))}")
    console.print(f"  size {format_bytes(ref['size_bytes'])} -> {format_bytes(best['size_bytes'])} ({size_text(best)}), "
                  f"latency {ref.get('latency_ms') or 0:.4f} -> {best['latency_ms']:.4f} ms ({escape(latency_text(best))}; "
                  f"{state.settings.get('threads', 1)} thread{'' if state.settings.get('threads', 1) == 1 else 's'}, batch {state.settings.get('latency_batch', 1)}), drop {best['drop'] * 100:.2f} pt{acc}")
    for warning in dict.fromkeys(best.get("latency_warnings") or []):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if best.get("drop_confirmation") is not None:
        split = state.settings.get("split", {})
        over = "" if best.get("within_budget_confirmation", True) else " [bold red](over --max-drop)[/bold red]"
        margin = best.get("drop_selection_margin")
        rule = f" + {margin * 100:.2f} pt margin" if margin else ""
        same = best.get("drop_confirmation_agreement")
        console.print(f"  picked on the selection part ({split.get('selection_samples', '?')} samples, drop "
                      f"{best['drop_selection'] * 100:.2f} pt{rule}, the budget's rule); on the confirmation part "
                      f"({split.get('confirmation_samples', '?')} samples no candidate was measured on): drop "
                      f"{best['drop_confirmation'] * 100:.2f} pt as apply's gate measures it{over}"
                      + (f", {same * 100:.2f} pt by the budget's rule" if same is not None else "")
                      + f", optimism {best['optimism'] * 100:+.2f} pt")
    if state.output and result.written:
        console.print(f"wrote {escape(state.output)}")
