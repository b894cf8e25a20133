"""Helpers the benchmark scripts share: rendered-text inputs for the OCR models and markdown tables.

Timing loops are not here: they go through ``onnxopt.timing``-style helpers of the core, not a copy per script.
Scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FONT_DIR", "pct", "ratio", "rendered", "table", "text_line", "text_page"]

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


# -- rendered text (the PP-OCR models' inputs) -----------------------------------------------------------------------


def _fonts() -> list[Path]:
    fonts = sorted(FONT_DIR.glob("*.ttf"))
    if not fonts:
        raise SystemExit(f"no TrueType fonts under {FONT_DIR}: install fonts-dejavu-core")
    return fonts


def _words(rng: np.random.Generator, words: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(list(words), size=n))


def text_page(rng: np.random.Generator, words: Sequence[str], size: int = 320) -> np.ndarray:
    """A size x size crop of a document: text lines in varied fonts, colours and sizes, ImageNet-normalized, CHW."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = _fonts()
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(170, 256, 3)))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(2, 20))
    while y < size - 12:
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(12, 34)))
        fg = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((int(rng.integers(0, size // 3)), y), _words(rng, words, int(rng.integers(2, 6))), fill=fg, font=font)
        y += int(rng.integers(22, 60))
    arr = np.asarray(img, dtype=np.float32) / 255.0 + rng.normal(0, 0.02, (size, size, 3)).astype(np.float32)  # scanner noise
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)


def text_line(rng: np.random.Generator, words: Sequence[str]) -> np.ndarray:
    """A 48x192 text-line crop as the PP-OCR angle classifier sees it (CHW); half of them upside down."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = _fonts()
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(20, 34)))
    text = _words(rng, words, int(rng.integers(1, 4)))
    bg, fg = tuple(int(v) for v in rng.integers(170, 256, 3)), tuple(int(v) for v in rng.integers(0, 90, 3))
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 8, bottom - top + 8), bg)
    ImageDraw.Draw(img).text((4 - left, 4 - top), text, fill=fg, font=font)
    if rng.random() < 0.5:
        img = img.rotate(180)
    w = min(192, max(8, int(round(img.width * 48 / img.height))))
    arr = np.zeros((48, 192, 3), np.float32)
    arr[:, :w] = (np.asarray(img.resize((w, 48)), dtype=np.float32) / 255.0 - 0.5) / 0.5
    return arr.transpose(2, 0, 1)


def rendered(kind: str, n: int, seed: int, words: Sequence[str]) -> np.ndarray:
    """``n`` inputs for the PP-OCR detector (``kind="det"``: pages) or angle classifier (text lines)."""
    rng = np.random.default_rng(seed)
    return np.stack([text_page(rng, words) if kind == "det" else text_line(rng, words) for _ in range(n)]).astype(np.float32)


# -- markdown tables -------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A markdown table: one ``(title, key, format)`` per column, one row per dict."""
    head = "| " + " | ".join(title for title, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(key)) for _, key, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}×"
