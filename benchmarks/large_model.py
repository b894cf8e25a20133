"""Wall time and peak memory of every weight pass on a transformer with >= 3 GiB of fp32 weights (issue 8).

The model (benchmarks/make_large_model.py, preset ``large``: 28 layers,
hidden 1536, FFN 6144, 3.0 GiB of weights in external data) is generated
once into the work folder. For each pass, each step in its own subprocess:

1. ``onnxopt apply MODEL --pass P -o OUT --no-validate``: load, run, save.
   Wall time, peak RSS (``ru_maxrss`` of that child, from ``os.wait4``) and
   peak anonymous RSS (``RssAnon`` sampled at 20 Hz; the rest of RSS is
   file pages of the memory-mapped weights, which the kernel can drop).
2. ``onnxopt validate MODEL OUT --eval inputs.npz``: ORT on both, batch by
   batch, one session at a time; its time, peak RSS and reported metrics.
3. Here, independently: ORT sessions made from the two files on the first
   inputs. Lossless passes must give equal outputs; lossy ones an error no
   larger than what step 2 reported.

Targets: peak RSS <= 1.5x the model's bytes for every pass; stretch <= 0.5x
for the weight-only passes (cluster, int8 and int4 weight quantization,
lowrank). Run by hand, once, on a quiet machine: it reads and writes tens
of GB and takes a long time (lowrank's SVDs dominate).

Usage: python benchmarks/large_model.py [--preset large|ci] [--workdir /tmp/onnxopt-large] [--passes fold,quant-int4,...]
Writes benchmarks/results/large_model.md and .json (preset large; other presets write into the work folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

if __package__:  # imported by the tests as benchmarks.large_model
    from benchmarks.make_large_model import PRESETS, write_inputs
else:  # run as a script: its folder is on the path
    from make_large_model import PRESETS, write_inputs

__all__ = ["Measured", "run_measured", "PASSES", "model_bytes"]


@dataclass
class Measured:
    """A finished subprocess: exit code, wall time, peak RSS and peak anonymous RSS (bytes), output tails."""

    returncode: int
    seconds: float
    peak_rss: int
    peak_anon: int
    stdout: str = ""
    stderr: str = ""
    #: peak of the summed RSS of the command and its descendants alive at one time (sampled at 20 Hz)
    peak_tree: int = 0


#: Runs the command and reports its peak RSS. A child's ru_maxrss starts at the hiwater RSS of the process it was
#: forked from (Linux keeps the old address space's peak across exec), so the measuring parent must be small:
#: this script, not a benchmark or pytest process that may hold gigabytes. It also samples, at 20 Hz, RssAnon of
#: the command and the summed RSS of the command and all its descendants alive at that moment ("tree"): ru_maxrss
#: (what `/usr/bin/time -v` prints) is the largest single process, not the sum of processes alive together.
_WRAPPER = """
import json, os, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=open(out + ".stdout", "w"), stderr=open(out + ".stderr", "w"))
anon = tree = 0
def rss(pid, field="VmRSS:"):
    with open("/proc/%d/status" % pid) as f:
        return max([0] + [int(l.split()[1]) * 1024 for l in f if l.startswith(field)])
def family(root):
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    members, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in members and p not in members}
        members |= new
        grew = bool(new)
    return members
while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        break
    try:
        anon = max(anon, rss(proc.pid, "RssAnon:"))
    except OSError:
        pass
    total = 0
    for member in family(proc.pid):
        try:
            total += rss(member)
        except OSError:
            pass
    tree = max(tree, total)
    time.sleep(0.05)
json.dump({"returncode": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start,
           "peak_rss": usage.ru_maxrss * 1024, "peak_anon": anon, "peak_tree": tree}, open(out, "w"))
"""


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 24 * 3600) -> Measured:
    """Run ``cmd`` under a small measuring process; its own peak RSS comes from ``os.wait4`` there."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-measure-") as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, str(out), *cmd], env=env, cwd=cwd, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"the measuring process failed ({done.returncode}) for {cmd[:4]}")
        result = json.loads(out.read_text())
        stdout = Path(str(out) + ".stdout").read_text()
        stderr = Path(str(out) + ".stderr").read_text()
    return Measured(result["returncode"], result["seconds"], result["peak_rss"], result["peak_anon"], stdout[-100_000:],
                    stderr[-4000:], result.get("peak_tree", 0))


@dataclass(frozen=True)
class Case:
    """A pass as the benchmark runs it."""

    label: str
    args: tuple[str, ...]
    needs: str  # the registered pass it needs
    lossless: bool = False
    weight_only: bool = False
    data: bool = False  # gets --data calib.npz


PASSES = (
    Case("fold", ("--pass", "fold"), "fold", lossless=True),
    Case("quant int8 weights (dynamic)", ("--pass", "quant", "--set", "quant.mode=dynamic"), "quant", weight_only=True),
    Case("quant int4 block-wise weight-only", ("--pass", "quant", "--set", "quant.weight_bits=4"), "quant", weight_only=True),
    # quant's default ends with an ORT session on its result to count the integer kernels ORT runs: what that costs
    Case("quant int8 weights (dynamic) without kernel check",
         ("--pass", "quant", "--set", "quant.mode=dynamic", "--set", "quant.check_kernels=false"), "quant", weight_only=True),
    Case("quant int4 block-wise without kernel check",
         ("--pass", "quant", "--set", "quant.weight_bits=4", "--set", "quant.check_kernels=false"), "quant", weight_only=True),
    Case("quant int8 static (calibrated)", ("--pass", "quant"), "quant", data=True),
    Case("cluster", ("--pass", "cluster"), "cluster", weight_only=True),
    Case("lowrank", ("--pass", "lowrank"), "lowrank", weight_only=True),
    Case("prune", ("--pass", "prune"), "prune"),
)


def model_bytes(path: Path) -> int:
    """Bytes of a model file plus its external data files."""
    from onnxopt.measure import file_size

    return file_size(path)


def _onnxopt(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "onnxopt", *map(str, args)]


def _registered(env: dict[str, str]) -> set[str]:
    done = subprocess.run(_onnxopt("passes", "--json"), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"`onnxopt passes` failed: {done.stderr.strip()}")
    return {entry["name"] for entry in json.loads(done.stdout)}


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The first output of ``path`` on each feed, from a fresh ORT session made from the file (freed on return)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def _check_feeds(model: Path, inputs: Path, samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` inputs in the batches validation runs them in (a dynamically quantized MatMul takes
    its activation scale over the whole batch, so its outputs depend on how samples are batched)."""
    from onnxopt.api import load_data
    from onnxopt.io import load_model

    data = load_data(load_model(model), inputs)
    assert data is not None
    return list(data.take(samples).batches())


def _external(path: Path) -> dict[str, Any]:
    data = path.with_name(path.name + ".data")
    return {"proto_bytes": path.stat().st_size, "data_file": data.name if data.exists() else None,
            "data_bytes": data.stat().st_size if data.exists() else 0}


def _row(case: Case, size: int, apply: Measured, report: dict[str, Any] | None) -> dict[str, Any]:
    target = 1.5
    stretch = 0.5 if case.weight_only else None
    ratio = apply.peak_rss / size
    summary = report["passes"][0]["summary"] if report and report.get("passes") else None
    return {"pass": case.label, "args": list(case.args), "lossless": case.lossless, "weight_only": case.weight_only,
            "ok": apply.returncode == 0, "seconds": round(apply.seconds, 1), "peak_rss": apply.peak_rss,
            "peak_rss_ratio": round(ratio, 3), "peak_anon": apply.peak_anon, "peak_anon_ratio": round(apply.peak_anon / size, 3),
            "target_ratio": target, "target_met": ratio <= target, "stretch_ratio": stretch,
            "stretch_met": None if stretch is None else ratio <= stretch, "summary": summary,
            "error": None if apply.returncode == 0 else (apply.stderr.strip().splitlines() or ["?"])[-1]}


def run(preset: str, workdir: Path, only: set[str] | None, keep: bool, eval_samples: int, check_samples: int) -> dict[str, Any]:
    env = dict(os.environ)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = PRESETS[preset]
    model = workdir / f"{preset}.onnx"
    if not model.exists() or not model.with_name(model.name + ".data").exists():
        print(f"generating {model} ({spec.weight_bytes() / 2**30:.2f} GiB of weights) ...", flush=True)
        gen = run_measured([sys.executable, str(Path(__file__).with_name("make_large_model.py")), str(model), "--preset", preset])
        if gen.returncode != 0:
            raise SystemExit(f"generation failed: {gen.stderr}")
        print(f"  {gen.seconds:.0f} s, peak RSS {gen.peak_rss / 2**20:.0f} MiB", flush=True)
    inputs = write_inputs(workdir / "inputs.npz", spec, eval_samples, seed=1)
    calib = write_inputs(workdir / "calib.npz", spec, 16, seed=2)
    size = model_bytes(model)
    feeds = _check_feeds(model, inputs, check_samples)
    reference = _outputs(model, feeds)
    registered = _registered(env)
    result: dict[str, Any] = {
        "model": {"preset": preset, "spec": asdict(spec), "bytes": size, "weight_bytes": spec.weight_bytes()},
        "machine": {"cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "python": platform.python_version()},
        "eval_samples": eval_samples, "check_samples": check_samples, "rows": [],
    }
    inspect = run_measured(_onnxopt("inspect", model, "--json"), env=env)
    result["inspect"] = {"ok": inspect.returncode == 0, "seconds": round(inspect.seconds, 1), "peak_rss": inspect.peak_rss,
                         "peak_rss_ratio": round(inspect.peak_rss / size, 3), "peak_anon": inspect.peak_anon}
    print(f"inspect: {inspect.seconds:.1f} s, peak RSS {inspect.peak_rss / 2**20:.0f} MiB", flush=True)
    for case in PASSES:
        if only and case.label.split()[0] not in only and case.label not in only:
            continue
        if case.needs not in registered:
            result["rows"].append({"pass": case.label, "ok": False, "error": f"pass {case.needs} is not registered"})
            continue
        slug = "-".join(w for w in case.label.replace("(", "").replace(")", "").split())
        out = workdir / f"out-{slug}.onnx"
        report_path = workdir / f"report-{slug}.json"
        report_path.unlink(missing_ok=True)
        args = [*case.args, *(("--data", str(calib)) if case.data else ())]
        print(f"{case.label}: applying ...", flush=True)
        apply = run_measured(_onnxopt("apply", model, *args, "-o", out, "--no-validate", "-q", "--report", report_path), env=env)
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        row = _row(case, size, apply, report)
        print(f"  {row['seconds']} s, peak RSS {apply.peak_rss / 2**20:.0f} MiB = {row['peak_rss_ratio']}x, "
              f"anon {apply.peak_anon / 2**20:.0f} MiB {'' if row['ok'] else row['error']}", flush=True)
        if row["ok"] and out.exists():
            row["output"] = _external(out)
            row["output"]["bytes"] = model_bytes(out)
            check_report = workdir / f"validate-{slug}.json"
            check_report.unlink(missing_ok=True)
            val = run_measured(_onnxopt("validate", model, out, "--eval", inputs, "-q", "--report", check_report), env=env)
            row["validate"] = {"ok": val.returncode == 0, "seconds": round(val.seconds, 1), "peak_rss": val.peak_rss,
                               "peak_rss_ratio": round(val.peak_rss / size, 3), "peak_anon": val.peak_anon}
            reported: dict[str, Any] = {}
            if check_report.exists():
                vjson = json.loads(check_report.read_text()).get("validation") or {}
                reported = vjson.get("outputs", {}).get("logits", {})
                row["validate"].update({"metrics": reported, "drop": vjson.get("drop"), "drop_basis": vjson.get("drop_basis"),
                                        "latency_ms": [vjson["reference"].get("latency_ms"), vjson["candidate"].get("latency_ms")],
                                        # onnxopt.timing's comparison as validate reported it (ratio, interval, warnings)
                                        "latency": vjson.get("latency")})
            candidate = np.concatenate(_outputs(out, feeds)).astype(np.float64)
            expected = np.concatenate(reference).astype(np.float64)
            error = float(np.max(np.abs(candidate - expected)))
            cos = float(np.dot(candidate.ravel(), expected.ravel()) / (np.linalg.norm(candidate) * np.linalg.norm(expected)))
            if case.lossless:
                agrees = bool(np.array_equal(candidate, expected))
            else:
                bound = reported.get("max_abs_error")
                agrees = bound is not None and error <= float(bound) * (1 + 1e-5) + 1e-6
            row["check"] = {"samples": check_samples, "max_abs_error": error, "cosine": cos, "agrees": agrees,
                            "rule": "outputs equal" if case.lossless else "max abs error <= the one validate reported"}
            print(f"  validate {val.seconds:.0f} s, peak RSS {val.peak_rss / 2**20:.0f} MiB; check: max abs {error:.4g}, "
                  f"cosine {cos:.5f}, {'agrees' if agrees else 'DISAGREES'}", flush=True)
        result["rows"].append(row)
        if not keep:
            for path in (out, out.with_name(out.name + ".data")):
                path.unlink(missing_ok=True)
    return result


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    m = result["model"]
    spec = m["spec"]
    lines = [
        f"# Large models: every pass on a {m['weight_bytes'] / 2**30:.1f} GiB transformer with external data",
        "",
        f"Model: `benchmarks/make_large_model.py --preset {m['preset']}`: {spec['layers']} layers, hidden {spec['hidden']}, "
        f"FFN {spec['ffn']}, {spec['heads']} heads, vocab {spec['vocab']}, seq {spec['seq']}; "
        f"{m['weight_bytes'] / 2**30:.2f} GiB of fp32 weights, {m['bytes'] / 2**30:.2f} GiB on disk "
        f"(weights in one external data file). Machine: {result['machine']['cpus']} CPUs, "
        f"{result['machine']['memory_bytes'] / 2**30:.0f} GiB RAM, shared with other jobs (times are indicative).",
        "",
        "Peak RSS is `ru_maxrss` of the `onnxopt apply ... --no-validate` subprocess (load, pass, save with external "
        "data), as a multiple of the model's bytes. It counts file pages of memory-mapped weights; peak anon is the "
        "anonymous part (sampled at 20 Hz), the memory the process cannot give back to the page cache.",
        "",
        f"`onnxopt inspect`: {result['inspect']['seconds']} s, peak RSS {_mib(result['inspect']['peak_rss'])} MiB "
        f"({result['inspect']['peak_rss_ratio']}x).",
        "",
        "| pass | time s | peak RSS MiB | x model | target 1.5x | stretch 0.5x | peak anon MiB | output MiB | "
        "validate s / peak RSS x | check |",
        "|---|---:|---:|---:|:---:|:---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        if not row.get("ok"):
            lines.append(f"| {row['pass']} | failed: {row.get('error')} | | | | | | | | |")
            continue
        val = row.get("validate", {})
        check = row.get("check", {})
        stretch = "-" if row["stretch_ratio"] is None else ("met" if row["stretch_met"] else "missed")
        check_text = (f"{'equal' if check.get('agrees') else 'NOT equal'}" if row["lossless"] else
                      f"max abs {check.get('max_abs_error', float('nan')):.3g} <= reported "
                      f"{val.get('metrics', {}).get('max_abs_error', float('nan')):.3g}: "
                      f"{'yes' if check.get('agrees') else 'NO'}; cosine {check.get('cosine', float('nan')):.4f}")
        lines.append(
            f"| {row['pass']} | {row['seconds']} | {_mib(row['peak_rss'])} | {row['peak_rss_ratio']} | "
            f"{'met' if row['target_met'] else 'missed'} | {stretch} | {_mib(row['peak_anon'])} | "
            f"{_mib(row.get('output', {}).get('bytes'))} | {val.get('seconds', '-')} / {val.get('peak_rss_ratio', '-')} | "
            f"{check_text} |")
    lines += [
        "",
        "Notes:",
        "",
        "- quant's default `check_kernels` makes an ORT session on the quantized model and saves ORT's optimized graph "
        "to count the integer kernels; ORT copies the quantized weights once for it. The rows without it show the pass "
        "itself.",
        "- Validation keeps one ORT session alive at a time; an ORT session holds about one copy of the weights "
        "(prepacked for its MatMul kernels). On cluster's output ORT constant-folds the in-graph decoding at session "
        "creation, so that session holds the decoded float weights plus the folding's index temporaries.",
        "- The check column reruns both files in fresh ORT sessions on the first inputs, in the batches validation "
        "used (dynamic quantization takes its activation scale over the whole batch).",
    ]
    lines += ["", "Summaries reported by the passes:", ""]
    lines += [f"- {row['pass']}: {row.get('summary')}" for row in result["rows"] if row.get("ok")]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="large")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnxopt-large")
    parser.add_argument("--passes", default=None, help="comma-separated first words of the pass labels, e.g. fold,quant")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--check-samples", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the outputs (several GB)")
    parser.add_argument("--clean", action="store_true", help="delete the work folder (the generated model) at the end")
    args = parser.parse_args()
    free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
    need = 3 * PRESETS[args.preset].weight_bytes()
    if free < need:
        raise SystemExit(f"{free / 2**30:.0f} GiB free under {args.workdir}; this run needs about {need / 2**30:.0f} GiB")
    only = {p.strip() for p in args.passes.split(",")} if args.passes else None
    result = run(args.preset, args.workdir, only, args.keep, args.eval_samples, args.check_samples)
    dest = RESULTS if args.preset == "large" else args.workdir
    dest.mkdir(parents=True, exist_ok=True)
    stem = "large_model" if args.preset == "large" else f"large_model_{args.preset}"
    previous = dest / f"{stem}.json"
    if only and previous.exists():  # a partial run replaces its passes' rows and keeps the others
        kept = json.loads(previous.read_text())
        fresh = {row["pass"]: row for row in result["rows"]}
        order = [case.label for case in PASSES]
        rows = {row["pass"]: row for row in kept.get("rows", [])} | fresh
        result["rows"] = sorted(rows.values(), key=lambda row: order.index(row["pass"]) if row["pass"] in order else 99)
        result["rerun"] = sorted(set(kept.get("rerun", [])) | set(fresh))
    (dest / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(result, dest / f"{stem}.md")
    print(f"wrote {dest / stem}.md and .json")
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
