"""Benchmark of the budget machinery: each lossy pass and the chain prune,cluster,quant under --max-drop.

For every digits model, every lossy pass (and the chain) at --max-drop 0.01
and 0.02, ``onnxopt.apply`` is run the way a user runs it (--data calib.npz,
--eval EVAL, --max-drop B). Reported per run:

- the settings each pass chose (its budget choice) and the ledger's rollbacks;
- the drop on the *selection* part of EVAL (what the choices were made on);
- the drop on the *confirmation* part of EVAL (what the gate is measured on);
- size and latency against the original (validate's figures, 1 thread);
- the drop on *fresh* inputs neither part contained: eval.npz is cut before
  the run, its last FRESH samples never reach onnxopt until the end.

All drops are top-1 accuracy lost against the labels (the automatic metric of
a [N, 10] logits output with labels); PP-OCR (``--ocr``): cls on rendered text crops
with their orientation as labels, det on rendered text pages by ``--metric ...=textmap``
(1 - F-score of the text map binarized at 0.3 against the original's). Written models that the gate refused
(exit 3) are measured all the same (--force), and marked.

Run by hand: ``python benchmarks/budget.py`` (a few minutes on 2 cores);
writes benchmarks/results/budget.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import onnxopt
from onnxopt.io import load_model
from onnxopt.measure import file_size
from onnxopt.metrics import top1_accuracy
from onnxopt.sessions import SessionFactory
from onnxopt.validate import collect_outputs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mlp", "cnn", "transformer")
RUNS = ("prune", "cluster", "lowrank", "quant", "prune,cluster,quant")
BUDGETS = (0.01, 0.02)
#: The last samples of eval.npz, kept from every run: the fresh inputs.
FRESH = 180


def accuracy(path: Path, x: np.ndarray, labels: np.ndarray) -> float:
    session = SessionFactory().create(load_model(path))
    name = session.get_outputs()[0].name
    from onnxopt.data import Dataset

    out = collect_outputs(session, Dataset("fresh", {"x": x}), [name])[name]
    value = top1_accuracy(out, labels)
    assert value is not None
    return value


def chosen(run: onnxopt.RunReport) -> str:
    parts = []
    for p, row in zip(run.passes, run.ledger or [{}] * len(run.passes)):
        budget = p.figures.get("budget")
        if row.get("action") == "rolled back":
            parts.append(f"{p.pass_name}: rolled back")
        elif budget is not None and budget.get("refinement"):
            refined = budget["refinement"]
            # the per-layer label's middle: "6 to k=16" of "per layer at 4x the weight error of k=32 (tensor): ..."
            what = refined["chosen"].split("): ", 1)[-1].split(" (")[0] if refined["kept"] else "not kept"
            parts.append(f"{p.pass_name}: {refined['from']} ({len(budget['tried'])} tried), per layer: {what} "
                         f"({len(refined['tried'])} tried)")
        elif budget is not None:
            parts.append(f"{p.pass_name}: {budget['chosen'] or 'none within'} ({len(budget['tried'])} tried)")
        else:
            parts.append(f"{p.pass_name}: {p.summary[:40]}")
    return "; ".join(parts)


def text_lines(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Synthetic text-line images for PP-OCR (no real images ship with the models): light paper, dark glyph-sized
    strokes in rows, every second image turned 180 degrees; normalised as PP-OCR expects ((x - 0.5) / 0.5)."""
    img = np.full((n, h, w), 0.9, np.float32) + 0.05 * rng.standard_normal((n, h, w)).astype(np.float32)
    rows = max(1, h // 48)
    for i in range(n):
        for r in range(rows):
            y0, x = r * (h // rows) + h // (rows * 4), int(rng.integers(2, 12))
            while x < w - 12:
                gw, gh = int(rng.integers(3, 10)), int(rng.integers(8, max(9, h // (rows * 2))))
                top = y0 + int(rng.integers(0, 6))
                img[i, top:top + gh, x:x + gw] = 0.1 + 0.1 * rng.random()
                if rng.random() < 0.3:  # descenders: orientation is visible
                    img[i, top + gh:top + gh + 6, x:x + 2] = 0.15
                x += gw + int(rng.integers(1, 6))
        if i % 2:
            img[i] = img[i, ::-1, ::-1]
    return ((np.repeat(img[:, None], 3, axis=1) - 0.5) / 0.5).astype(np.float32)


#: Words the rendered crops are made of (PP-OCR's classifier only tells upright text from text turned 180 degrees).
WORDS = ("invoice", "total", "amount", "date", "Street", "Berlin", "ORDER", "No.", "Tel:", "2024-05-17", "EUR",
         "quantity", "price", "Hello", "World", "receipt", "page", "Chapter", "the", "and", "of", "Name:", "ID",
         "0123456789", "Road", "London", "Paris", "VAT", "12.50", "$3.99", "Monday", "shipping", "address", "code")


def text_crops(rng: np.random.Generator, n: int, h: int = 48, w: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """Rendered text-line crops as PP-OCR's classifier sees them, and their labels (0 upright, 1 turned 180 degrees).

    Words in the system's TrueType fonts (DejaVu, Liberation), dark on light paper with some noise and blur, cut
    to the line, resized to height ``h`` keeping the aspect (at most ``w`` wide), normalised ((x / 255 - 0.5) /
    0.5) and padded right with zeros, as PP-OCR's preprocessing does. Every second crop is turned 180 degrees.
    Needs Pillow (``pip install pillow``; a benchmark dependency only).
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = sorted(p for p in Path("/usr/share/fonts").rglob("*.ttf")
                   if not any(s in p.name for s in ("Math", "Mono", "ExtraLight")))
    if not fonts:
        raise RuntimeError("no TrueType fonts under /usr/share/fonts to render text crops with")
    x = np.zeros((n, 3, h, w), np.float32)
    labels = np.arange(n) % 2
    for i in range(n):
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(22, 40)))
        text = " ".join(WORDS[int(j)] for j in rng.integers(0, len(WORDS), int(rng.integers(1, 4))))
        box = font.getbbox(text)
        pad = int(rng.integers(2, 8))
        paper = int(rng.integers(190, 256))
        img = Image.new("L", (box[2] - box[0] + 2 * pad, box[3] - box[1] + 2 * pad), paper)
        ImageDraw.Draw(img).text((pad - box[0], pad - box[1]), text, font=font, fill=int(rng.integers(0, 90)))
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
        if labels[i]:
            img = img.rotate(180)
        width = min(w, max(1, int(round(img.width * h / img.height))))
        arr = np.asarray(img.convert("RGB").resize((width, h), Image.BILINEAR), np.float32)
        arr = arr + rng.normal(0, 4, arr.shape)
        x[i, :, :, :width] = ((np.clip(arr, 0, 255) / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return x, labels


def text_pages(rng: np.random.Generator, n: int, h: int = 320, w: int = 320) -> np.ndarray:
    """Rendered document-like pages as PP-OCR's text detector sees them: lines of words in the system's TrueType
    fonts (DejaVu, Liberation) at random sizes and places, dark on light paper, some lines slightly rotated, with
    noise and blur; RGB normalised with ImageNet's mean and std, as PP-OCR's det preprocessing does. No labels: the
    det rows compare the candidate's text map with the original's (``--metric OUTPUT=textmap``).
    Needs Pillow (``pip install pillow``; a benchmark dependency only).
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = sorted(p for p in Path("/usr/share/fonts").rglob("*.ttf")
                   if not any(s in p.name for s in ("Math", "ExtraLight")))
    if not fonts:
        raise RuntimeError("no TrueType fonts under /usr/share/fonts to render text pages with")
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = np.zeros((n, 3, h, w), np.float32)
    for i in range(n):
        paper = tuple(int(v) for v in rng.integers(185, 256, 3))
        page = Image.new("RGB", (w, h), paper)
        y = int(rng.integers(2, 20))
        while y < h - 12:
            size = int(rng.integers(11, 30))
            font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
            text = " ".join(WORDS[int(j)] for j in rng.integers(0, len(WORDS), int(rng.integers(1, 5))))
            ink = tuple(int(v) for v in rng.integers(0, 90, 3))
            x0 = int(rng.integers(0, max(1, w // 3)))
            if rng.random() < 0.25:  # a slightly rotated line, drawn on its own layer
                line = Image.new("L", (w, size * 2), 0)
                ImageDraw.Draw(line).text((x0, size // 2), text, font=font, fill=255)
                line = line.rotate(float(rng.uniform(-6, 6)), resample=Image.BILINEAR)
                page.paste(Image.new("RGB", line.size, ink), (0, y), line)
            else:
                ImageDraw.Draw(page).text((x0, y), text, font=font, fill=ink)
            y += int(size * rng.uniform(1.3, 2.6))
        if rng.random() < 0.5:
            page = page.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
        arr = np.asarray(page, np.float32) + rng.normal(0, 4, (h, w, 3))
        x[i] = ((np.clip(arr, 0, 255) / 255 - mean) / std).transpose(2, 0, 1)
    return x


#: PP-OCR runs: model file, image size, eval/fresh/calib counts, runs (det is heavy: its prune scan took 8 min here).
OCR = {
    "ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192), (240, 200, 64),
                  ("cluster", "quant", "lowrank", "prune,cluster,quant", "prune")),
    "ppocr_det": ("ch_PP-OCRv4_det_infer.onnx", (256, 256), (192, 96, 16),
                  ("cluster", "quant", "prune", "lowrank", "prune,cluster,quant")),
}
#: det's drop: its text map binarized at DBNet's 0.3, F-score against the original's (onnxopt.metrics.text_map_f1).
DET_METRICS = {"sigmoid_0.tmp_0": "textmap"}
#: Fresh rendered crops for PP-OCR cls (labelled: its drop is a share of them, so more than the unlabelled 80).
CLS_FRESH = 200


def fresh_drop(src: Path, out: Path, x: np.ndarray, metrics: dict[str, str] | None = None) -> float:
    """The gate's drop (the declared metrics, else the automatic one per output; no labels) of ``out`` against
    ``src`` on fresh inputs."""
    from onnxopt.data import Dataset
    from onnxopt.validate import measure_drop

    return measure_drop(load_model(src), load_model(out), Dataset("fresh", {"x": x}, batch_size=16), SessionFactory(),
                        declared=metrics)


def run_ocr(real: Path, names: list[str], done: Callable[[list[dict[str, Any]]], None],
            only: set[str] | None = None, budgets: tuple[float, ...] = BUDGETS,
            settings: dict[str, dict[str, str]] | None = None, keep: Path | None = None) -> list[dict[str, Any]]:
    """The PP-OCR rows; ``done`` gets the rows so far after each one (runs are minutes long: nothing is lost).

    cls runs on rendered text crops with their orientation as labels (:func:`text_crops`, needs Pillow): its drop
    is top-1 accuracy lost, on fresh crops too. det (and cls without Pillow) runs on synthetic text lines without
    labels (:func:`text_lines`): the automatic metric against the original.
    """
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            file, (h, w), (n_eval, n_fresh, n_calib), runs = OCR[name]
            src = real / file
            crops = name == "ppocr_cls" and _have_pillow()
            pages = name == "ppocr_det" and _have_pillow()
            metrics = DET_METRICS if pages else None
            if pages:
                np.savez(folder / "eval.npz", x=text_pages(rng, n_eval, h, w))
                np.savez(folder / "calib.npz", x=text_pages(rng, n_calib, h, w))
                fresh_x = text_pages(rng, n_fresh, h, w)
            elif crops:
                n_fresh = CLS_FRESH
                eval_x, eval_y = text_crops(rng, n_eval, h, w)
                np.savez(folder / "eval.npz", x=eval_x, labels=eval_y)
                np.savez(folder / "calib.npz", x=text_crops(rng, n_calib, h, w)[0])
                fresh_x, fresh_y = text_crops(rng, n_fresh, h, w)
                ref_fresh = accuracy(src, fresh_x, fresh_y)
            else:
                np.savez(folder / "eval.npz", x=text_lines(rng, n_eval, h, w))
                np.savez(folder / "calib.npz", x=text_lines(rng, n_calib, h, w))
                fresh_x = text_lines(rng, n_fresh, h, w)
            for chain in runs:
                if only is not None and chain not in only:
                    continue
                for budget in budgets:
                    out = folder / f"{name}_{chain.replace(',', '_')}_{budget}.onnx"
                    start = time.perf_counter()
                    run = onnxopt.apply(src, chain, out, data=folder / "calib.npz", eval_data=folder / "eval.npz",
                                        max_drop=budget, force=True, seed=0, metrics=metrics,
                                        settings=_settings(settings, chain))
                    fresh = ref_fresh - accuracy(out, fresh_x, fresh_y) if crops else fresh_drop(src, out, fresh_x,
                                                                                               metrics)
                    row = _row(name, chain, budget, run, src, out, fresh, n_fresh, time.perf_counter() - start)
                    row["data"] = ("rendered text crops, labels = orientation" if crops else
                                   "rendered text pages, textmap F-score against the original" if pages else
                                   "synthetic text lines, no labels")
                    rows.append(row)
                    done(rows)
                    if keep is not None:  # the written model, for a look at its per-sample drops afterwards
                        import shutil

                        keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(out, keep / out.name)
    return rows


def _have_pillow() -> bool:
    import importlib.util

    return importlib.util.find_spec("PIL") is not None


def _row(model: str, chain: str, budget: float, run: Any, src: Path, out: Path, fresh: float, n_fresh: int,
         seconds: float) -> dict[str, Any]:
    v = run.validation
    assert v is not None
    row = {
        "model": model, "passes": chain, "max_drop": budget, "chosen": chosen(run),
        "drop_selection": run.drop_selection, "drop_confirmation": v.drop, "drop_fresh": fresh,
        "drop_basis": v.drop_basis, "gate_passed": run.gate_passed, "size_ratio": file_size(out) / file_size(src),
        "latency_ratio": v.ratio("latency_ms"),
        "rollbacks": [r["pass"] for r in run.ledger if r["action"] == "rolled back"],
        "selection_samples": run.split["selection_samples"] if run.split else None,
        "confirmation_samples": run.split["confirmation_samples"] if run.split else None,
        "fresh_samples": n_fresh, "seconds": seconds, "budget_choices": run.budget_choices(), "ledger": run.ledger,
    }
    print(f"{model:12s} {chain:20s} {budget:.2f}  sel {(row['drop_selection'] or 0) * 100:5.2f}  "
          f"conf {v.drop * 100:5.2f}  fresh {fresh * 100:5.2f}  size {row['size_ratio']:.3f}  "
          f"lat {row['latency_ratio'] or 0:.3f}  {row['chosen']}  ({seconds:.0f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", default="|".join(RUNS), help="runs separated by |")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite budget.md from budget.json")
    parser.add_argument("--ocr", default=None, metavar="LIST",
                        help="only PP-OCR rows (ppocr_cls,ppocr_det; ONNXOPT_REAL_MODELS), added to the existing JSON")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                        help="--max-drop values of the PP-OCR rows, comma-separated (the data drawn is the same)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="PASS.KEY=VALUE",
                        help="a pass setting for every run whose chain holds the pass (as apply's --set)")
    parser.add_argument("--results", default="budget", help="results file name under benchmarks/results (NAME.md, .json)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="copy the PP-OCR rows' models to DIR")
    args = parser.parse_args()
    from onnxopt.config import parse_settings

    settings = parse_settings(args.settings)
    name = args.results

    def write_rows(rows: list[dict[str, Any]]) -> None:
        write(rows, name, settings)

    def old_rows() -> list[dict[str, Any]]:
        return json.loads((RESULTS / f"{name}.json").read_text())["rows"] if (RESULTS / f"{name}.json").exists() else []

    if args.rewrite:
        write_rows(old_rows())
        return
    if args.ocr:
        import os

        real = Path(os.environ.get("ONNXOPT_REAL_MODELS", "/work/real-models"))
        names = args.ocr.split(",")
        old = old_rows()
        only = None if args.runs == "|".join(RUNS) else set(args.runs.split("|"))
        budgets = tuple(float(b) for b in args.budgets.split(","))
        # re-run rows take their old rows' places
        run_ocr(real, names, lambda rows: write_rows(_merged(old, rows)), only, budgets, settings, args.keep)
        return
    ev = np.load(DIGITS / "eval.npz")
    x, labels = ev["x"], ev["labels"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        eval_path = folder / "eval_part.npz"
        np.savez(eval_path, x=x[:-FRESH], labels=labels[:-FRESH])
        fresh_x, fresh_y = x[-FRESH:], labels[-FRESH:]
        for model in args.models.split(","):
            src = DIGITS / f"{model}.onnx"
            ref_fresh = accuracy(src, fresh_x, fresh_y)
            for chain in args.runs.split("|"):
                for budget in BUDGETS:
                    out = folder / f"{model}_{chain.replace(',', '_')}_{budget}.onnx"
                    start = time.perf_counter()
                    run = onnxopt.apply(src, chain, out, data=DIGITS / "calib.npz", eval_data=eval_path, max_drop=budget,
                                        force=True, seed=0, settings=_settings(settings, chain))
                    fresh = ref_fresh - accuracy(out, fresh_x, fresh_y)
                    rows.append(_row(model, chain, budget, run, src, out, fresh, FRESH, time.perf_counter() - start))
    write_rows(_merged(old_rows(), rows))


def _settings(settings: dict[str, dict[str, str]] | None, chain: str) -> dict[str, dict[str, str]] | None:
    """The --set settings of the passes in ``chain`` (apply refuses settings for a pass not in the chain)."""
    return {p: keys for p, keys in (settings or {}).items() if p in chain.split(",")} or None


def _merged(old: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each row re-run replaced in place by its new row (same model, passes and budget), new ones after."""
    new = {(r["model"], r["passes"], r["max_drop"]): r for r in rows}
    merged = [new.pop((r["model"], r["passes"], r["max_drop"]), r) for r in old]
    return merged + list(new.values())


def _data(row: dict[str, Any]) -> str:
    """Which data a row used (older rows of the JSON have no ``data`` field: digits, or synthetic text lines)."""
    if row["model"] not in OCR:
        return "digits (labels)"
    data = row.get("data", "")
    if data.startswith("rendered text pages"):
        return "text pages (textmap)"
    return "text crops (labels)" if data.startswith("rendered") else "synthetic lines (no labels)"


def _pt(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def write(rows: list[dict[str, Any]], name: str = "budget", settings: dict[str, dict[str, str]] | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "machine": platform.machine(), "onnxopt": onnxopt.__version__}
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, "settings": settings or {}, "rows": rows},
                                                     indent=2, default=str) + "\n")
    n = rows[0] if rows else {}
    lines = [
        "# Budget: each lossy pass under --max-drop, chosen on one part, judged on another",
        "",
        "Written by `python benchmarks/budget.py" + "".join(f" --set {p}.{k}={v}" for p, keys in (settings or {}).items()
                                                          for k, v in keys.items())
        + (f" --results {name}" if name != "budget" else "") + "`. digits models (examples/digits); "
        "`onnxopt.apply(model, passes, data=calib.npz, eval_data=EVAL, max_drop=B, seed=0"
        + (", settings=SET" if settings else "") + ")`. EVAL is eval.npz without its last "
        f"{n.get('fresh_samples', FRESH)} samples; apply splits it by seed into a **selection** part "
        f"({n.get('selection_samples')} samples: every choice is made on it) and a **confirmation** part "
        f"({n.get('confirmation_samples')} samples: the gate and the report). **fresh** is the last "
        f"{n.get('fresh_samples', FRESH)} samples of eval.npz, which onnxopt never saw. Drops are top-1 accuracy "
        "lost against the labels, in points (negative: the compressed model scored higher). size and latency are "
        "ratios to the original (file size; validate's interleaved median latency, 1 thread, batch 1, on the "
        "confirmation data). One run per row on a shared 2-core machine: latency ratios of models this small are "
        "noisy. Models the gate refused were written with --force so that their fresh drop could be measured too "
        "(gate column).",
        "",
        "| model | data | samples sel/conf/fresh | passes | max-drop | chosen | drop selection | drop confirmation "
        "| drop fresh | gate | size | latency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        latency = f"{r['latency_ratio']:.3f}" if r["latency_ratio"] else "-"
        counts = f"{r['selection_samples']}/{r['confirmation_samples']}/{r['fresh_samples']}"
        lines.append(f"| {r['model']} | {_data(r)} | {counts} | {r['passes']} | {r['max_drop']:g} | {r['chosen']} | "
                     f"{_pt(r['drop_selection'])} | {_pt(r['drop_confirmation'])} | {_pt(r['drop_fresh'])} | "
                     f"{'pass' if r['gate_passed'] else 'REFUSED'} | {r['size_ratio']:.3f} | {latency} |")
    if any(r["model"] in OCR for r in rows):
        lines += ["", "PP-OCR rows (ppocr_cls: ch_ppocr_mobile_v2.0_cls, 3×48×192; ppocr_det: ch_PP-OCRv4_det, "
                  "3×256×256). No real images ship with the models. **cls** runs on rendered text crops "
                  "(benchmarks/budget.py text_crops: words in the system's DejaVu/Liberation TrueType fonts, dark on "
                  "light paper with noise and blur, resized and padded as PP-OCR does, every second crop turned 180°; "
                  "the original classifier gets 99.5% of 200 such crops right), with the orientation as labels: its "
                  "drops are top-1 accuracy lost, like the digits rows, on 120 selection / 120 confirmation / 200 "
                  "fresh crops drawn independently (and 64 more as --data). **det** runs on rendered text pages "
                  "(benchmarks/budget.py text_pages: lines of words in the same fonts at 11–30 px, a quarter of them "
                  "turned up to 6°, on light paper with noise and blur, 3×256×256, ImageNet mean/std as PP-OCR's det "
                  "preprocessing) without labels, gated with `--metric sigmoid_0.tmp_0=textmap`: 1 − the F-score of "
                  "the candidate's text pixels (probability map > 0.3, DBNet's binarization) against the original "
                  "model's; pages drawn independently, as many selection / confirmation / fresh as the samples column "
                  "says (16 more as --data). Each row's data is in budget.json (`data`)."]
    # an unchanged model (every pass rolled back) has no win, whatever the latency noise says
    changed = [r for r in rows if len(r["rollbacks"]) < len(r["passes"].split(","))]
    held = [r for r in rows if r["drop_fresh"] <= r["max_drop"] + 1e-12]
    win = [r for r in changed if r["size_ratio"] < 0.99 or (r["latency_ratio"] or 1) < 0.95]
    held_changed = [r for r in held if r in changed]
    lines += ["", f"Held the budget on fresh inputs: {len(held)} of {len(rows)} runs ({len(held_changed)} of the "
              f"{len(changed)} runs where at least one pass changed the model); with a size or latency win "
              f"(size < 0.99 or latency < 0.95, on a model at least one pass changed): {len(win)} of {len(rows)}."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
