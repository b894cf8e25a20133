"""Assemble BENCHMARKS.md from the figures each benchmark wrote to benchmarks/results/*.md.

Run after the benchmarks: `python benchmarks/assemble.py`. Each section is
the benchmark's own output, unedited; the order puts the core comparison first.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["quant", "prune", "cluster", "lowrank", "distill", "search", "arm", "large_model", "corpus", "node_corpus", "fuzz"]

HEADER = """# Benchmarks

Measured on this project's build machines: 2 cores x86_64, 24 GiB (an AVX512-VNNI
machine for the earlier sections; since wave 5 an AMD EPYC with AVX2 and no VNNI, among them
the budget, tool-time and quant-memory sections),
onnxruntime's CPU provider. Figures are medians of interleaved repeated runs,
reported as ratios computed within one run; the machine is shared and noisy, so
absolute milliseconds vary between runs while ratios hold better. Each section
below is written by the script named in it (`python benchmarks/<name>.py`);
`python benchmarks/assemble.py` rebuilds this file.
"""


def main() -> None:
    parts = [HEADER]
    files = {p.stem: p for p in RESULTS.glob("*.md")}
    for name in [*ORDER, *sorted(set(files) - set(ORDER))]:
        if name in files:
            text = files[name].read_text().strip()
            parts.append(text if text.startswith("#") else f"## {name}\n\n{text}")
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts).replace("\n# ", "\n## ") + "\n")
    print(f"BENCHMARKS.md: {len(parts) - 1} sections")


if __name__ == "__main__":
    main()
