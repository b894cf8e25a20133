"""Latency of a candidate against a reference: paired, interleaved runs and an interval on their ratio.

Why paired: on a shared machine the load changes from one millisecond to the
next. The two models are run in alternation, in blocks of four runs
(reference, candidate, candidate, reference, then the mirror block), so both
meet the same load, and each block's ratio (candidate time / reference time)
cancels most of it; alternating the order cancels what running first or
second does (caches, frequency steps). The figure is the median of the
blocks' ratios with a distribution-free interval from the order statistics
of their logs (no normality assumed, a burst that hits a few blocks moves
nothing). Blocks go on until that interval is within ±``precision`` of the
ratio, or until the time cap.

Every latency figure onnxopt prints (validate, apply, search, benchmarks)
comes from here, as candidate ÷ reference: below 1 is faster.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onnxopt.errors import OnnxoptError
from onnxopt.forked import exit_description

__all__ = [
    "TimingConfig",
    "LatencyComparison",
    "compare_latency",
    "compare_latency_isolated",
    "compare_unpaired",
    "sample_latency_ms",
    "format_ratio",
    "ratio_verdict",
    "ratio_interval",
    "RESOLUTION",
    "SESSION_FLOOR",
    "load_warning",
    "model_sources",
    "CLEAN_FIGURE_HINT",
]

#: What a user can do about a noisy figure; every timing warning ends with it.
CLEAN_FIGURE_HINT = ("for a clean figure: use --threads within the free cores, close other work, "
                     "or give the timing more time with --repeat N / --time-budget SECONDS")


class _Runs(Protocol):
    def run(self, output_names: Any, feed: Any) -> Any: ...


@dataclass(frozen=True)
class TimingConfig:
    """How a latency comparison is run; every field has a default that suits `onnxopt validate`."""

    #: at least this many blocks (4 runs each: 2 per model), even past the time cap (``--repeat``)
    repeat: int = 20
    #: seconds of paired runs after which the timing stops, precise or not (``--time-budget``)
    time_budget: float = 10.0
    #: stop once the interval is within this share of the ratio on both sides (0.03 = ±3%)
    precision: float = 0.03
    #: untimed runs of each model first (allocations, caches, lazy kernel set-up)
    warmup: int = 5
    #: confidence of the interval on the ratio
    confidence: float = 0.95
    #: ORT intra-op threads the sessions use (for the busy-machine check; the sessions set them)
    threads: int = 1
    #: time in a child process of its own, so an ORT crash is an error line, not a dead CLI (``--isolate``)
    isolate: bool = False
    #: CPU ids to pin the timing to (os.sched_setaffinity); None leaves the scheduler free
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise OnnxoptError(f"--repeat {self.repeat} must be at least 1", "e.g. --repeat 20")
        if not self.time_budget > 0:
            raise OnnxoptError(f"--time-budget {self.time_budget} must be a positive number of seconds", "e.g. --time-budget 10")
        if not SESSION_FLOOR < self.precision < 1 or not 0.5 <= self.confidence < 1:
            raise OnnxoptError(f"timing precision must be in ({SESSION_FLOOR}, 1) (two sessions of one model differ by "
                               f"up to {SESSION_FLOOR:.0%}) and confidence in [0.5, 1)", "e.g. precision 0.03, confidence 0.95")

    def with_budget(self, seconds: float) -> TimingConfig:
        """The same settings with another time cap (screening in the search uses a shorter one)."""
        return TimingConfig(**{**asdict(self), "time_budget": seconds})


@dataclass
class LatencyComparison:
    """Candidate ÷ reference latency with its interval, each side's median, and what the timing saw."""

    ratio: float
    low: float
    high: float
    reference_ms: float
    candidate_ms: float
    pairs: int
    capped: bool = False
    seconds: float = 0.0
    paired: bool = True
    precision: float = 0.03
    load: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def precise(self) -> bool:
        """True when the interval is within ±precision of the ratio."""
        return _within(self.ratio, self.low, self.high, self.precision)

    @property
    def verdict(self) -> str:
        """``faster`` or ``slower`` only when the interval excludes 1.0 (by more than ``precision``), else ``same``."""
        return ratio_verdict(self.low, self.high, self.ratio, self.precision)

    def text(self) -> str:
        """``0.62× (0.60–0.64), 1.6× faster``, or ``... no measurable difference``."""
        return format_ratio(self.ratio, self.low, self.high, resolution=self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "reference_ms": self.reference_ms,
                "candidate_ms": self.candidate_ms, "pairs": self.pairs, "capped": self.capped, "seconds": self.seconds,
                "paired": self.paired, "precision": self.precision, "load": self.load, "verdict": self.verdict,
                "text": self.text(), "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyComparison:
        keys = ("ratio", "low", "high", "reference_ms", "candidate_ms", "pairs", "capped", "seconds", "paired",
                "precision", "load", "warnings")
        return cls(**{k: d[k] for k in keys if k in d})


#: Differences smaller than this share are not called faster or slower, even with an interval that excludes 1:
#: the timing is built to resolve ±3%, and two sessions of one model can differ by about 1% (memory placement).
RESOLUTION = 0.03


def ratio_verdict(low: float | None, high: float | None, ratio: float | None = None, resolution: float = RESOLUTION) -> str:
    """``faster`` when the whole interval is below 1, ``slower`` when above, else ``same``.

    With ``ratio``, a difference under ``resolution`` is ``same`` too.
    """
    if low is None or high is None:
        return "same"
    small = ratio is not None and abs(math.log(ratio)) < -math.log(1 - resolution)
    if high < 1.0 and not small:
        return "faster"
    if low > 1.0 and not small:
        return "slower"
    return "same"


def format_ratio(ratio: float | None, low: float | None = None, high: float | None = None, *, prose: bool = True,
                 resolution: float = RESOLUTION) -> str:
    """A ratio as people read it: ``0.62× (0.60–0.64), 1.6× faster``; never "faster" unless the interval says so."""
    if ratio is None or not math.isfinite(ratio):
        return "-"
    if low is None or high is None:
        return f"{ratio:.2f}× (no interval)"
    text = f"{ratio:.2f}× ({low:.2f}–{high:.2f})"
    if not prose:
        return text
    verdict = ratio_verdict(low, high, ratio, resolution)
    if verdict == "faster":
        return f"{text}, {1.0 / ratio:.1f}× faster"
    if verdict == "slower":
        return f"{text}, {ratio:.1f}× slower"
    if low > 1.0 or high < 1.0:  # the interval excludes 1, but by less than the timing resolves
        return f"{text}, no measurable difference (under {resolution:.0%})"
    return f"{text}, no measurable difference"


def ratio_interval(log_ratios: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Median ratio and its interval from paired log-ratios: the order statistics that bracket the median.

    The rank of the sample median is binomial(n, 1/2) around n/2, so the
    values at ranks n/2 ∓ z·√n/2 bracket the true median with the given
    confidence, whatever the distribution of the ratios.
    """
    x = np.sort(np.asarray(log_ratios, dtype=np.float64))
    n = x.size
    if n == 0:
        return math.nan, math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    lo = int(math.floor(n / 2 - z * math.sqrt(n) / 2))
    hi = int(math.ceil(n / 2 + z * math.sqrt(n) / 2))
    lo, hi = max(lo, 0), min(hi, n - 1)
    return float(np.exp(np.median(x))), float(np.exp(x[lo])), float(np.exp(x[hi]))


def _within(ratio: float, low: float, high: float, precision: float) -> bool:
    return math.isfinite(ratio) and high <= ratio * (1 + precision) and low >= ratio * (1 - precision)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_warning(threads: int = 1) -> tuple[float | None, str | None]:
    """The 1-minute load average, and a warning when other work outweighs the cores the timing leaves free.

    The timing's own threads count in the load average, so up to ``threads``
    of it is ours; the rest is other work, which is compared with the cores
    not used by those threads.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None, None
    cores = _cores()
    free = max(cores - threads, 0)
    others = max(load - threads, 0.0)
    if others > free:
        return load, (f"the machine is busy (load average {load:.1f} on {cores} core(s), {threads} used by the timing): "
                      f"latency figures carry its noise; {CLEAN_FIGURE_HINT}")
    return load, None


@contextmanager
def _pinned(cpus: Sequence[int] | None) -> Iterator[None]:
    """Pin the calling thread (ORT runs intra-op 1 on it) to ``cpus`` for the timing, then restore."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError as err:
        raise OnnxoptError(f"cannot pin the timing to CPUs {list(cpus)}: {err}", "give CPU ids this process may use") from None
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def sample_latency_ms(session: _Runs, feed: Mapping[str, np.ndarray], *, warmup: int = 5, runs: int = 30,
                      seconds: float | None = None) -> np.ndarray:
    """Wall times (ms) of ``session.run`` on one feed after warm-up: ``runs`` of them, or as many as fit ``seconds``."""
    feed = dict(feed)
    run, clock = session.run, time.perf_counter
    for _ in range(warmup):
        run(None, feed)
    times: list[float] = []
    end = None if seconds is None else clock() + seconds
    while len(times) < runs or (end is not None and clock() < end):
        start = clock()
        run(None, feed)
        times.append(clock() - start)
    return np.asarray(times) * 1e3


#: Two ORT sessions of one and the same model differ by a few tenths of a percent, steadily (where their
#: buffers landed in memory, cache-set conflicts): no number of runs averages that away, so the pairs'
#: interval alone can exclude 1.0 for a model timed against itself. Measured here: 12 pairs of sessions
#: of one small conv stack gave ratios 0.997–1.004, one interval [1.0026, 1.0051]. Every reported
#: interval is at least ±SESSION_FLOOR around its ratio, so a difference that small is never called real.
SESSION_FLOOR = 0.01


def _finish(result: LatencyComparison, config: TimingConfig) -> LatencyComparison:
    if math.isfinite(result.ratio):
        result.low = min(result.low, result.ratio * (1 - SESSION_FLOOR))
        result.high = max(result.high, result.ratio * (1 + SESSION_FLOOR))
    result.load, busy = load_warning(config.threads)
    if busy:
        result.warnings.append(busy)
    if result.capped and not result.precise:
        result.warnings.append(
            f"the latency interval is still wider than ±{config.precision:.0%} after {result.seconds:.0f} s "
            f"({result.pairs} blocks of paired runs); {CLEAN_FIGURE_HINT}")
    return result


#: A group of consecutive blocks lasts about this long (s); its ratio is the ratio of its two medians.
GROUP_SECONDS = 0.02
#: At most this many blocks per group (a model of 1 ms or less), at least 1 (20 ms or more).
MAX_GROUP = 16
#: The interval is trusted (and may stop the timing) only over at least this many groups.
MIN_GROUPS = 10


def _group_ratios(ref_t: list[float], cand_t: list[float], group: int) -> np.ndarray:
    """Log of each group's median candidate time over its median reference time (2 runs a side per block)."""
    n = len(ref_t) // (2 * group)
    ref = np.asarray(ref_t[:n * 2 * group]).reshape(n, 2 * group)
    cand = np.asarray(cand_t[:n * 2 * group]).reshape(n, 2 * group)
    return np.log(np.median(cand, axis=1) / np.median(ref, axis=1))


def compare_latency(
    reference: _Runs,
    candidate: _Runs,
    feed: Mapping[str, np.ndarray],
    config: TimingConfig | None = None,
    *,
    tick: Callable[[float], None] | None = None,
) -> LatencyComparison:
    """Time two sessions in alternating blocks on one feed until the ratio is known to ±precision or the cap.

    Consecutive blocks form groups of about GROUP_SECONDS; a group's ratio
    is the ratio of its two medians. Why groups: on a loaded machine a run
    of a few ms is either left alone or preempted (several ms more), so
    single-run ratios are a mix of modes whose median jumps with the share
    of preempted runs; a median over a group's runs is the unpreempted time
    while most runs are. Slow models get groups of one block.

    ``tick`` (if given) is called with the share of the time budget used, for progress bars.
    """
    config = config or TimingConfig()
    feed = dict(feed)
    clock = time.perf_counter
    ref_run, cand_run = reference.run, candidate.run
    # in each block 1 marks the candidate; the mirror block runs the other way round
    orders = ((0, 1, 1, 0), (1, 0, 0, 1))
    runs = (ref_run, cand_run)
    with _pinned(config.cpus):
        t0 = clock()
        for _ in range(config.warmup):
            ref_run(None, feed)
            cand_run(None, feed)
        per_run = (clock() - t0) / max(2 * config.warmup, 1)
        group = int(min(MAX_GROUP, max(1, round(GROUP_SECONDS / max(per_run, 1e-6)))))
        least = max(config.repeat, MIN_GROUPS * group)  # blocks before the interval may stop the timing
        ref_t: list[float] = []
        cand_t: list[float] = []
        start = clock()
        check_at = least
        blocks = checked = 0
        precise = False
        while True:
            for who in orders[blocks % 2]:
                t0 = clock()
                runs[who](None, feed)
                (cand_t if who else ref_t).append(clock() - t0)
            blocks += 1
            elapsed = clock() - start
            if tick is not None:
                tick(min(elapsed / config.time_budget, 1.0))
            if blocks >= check_at:
                ratio, low, high = ratio_interval(_group_ratios(ref_t, cand_t, group), config.confidence)
                precise, checked = _within(ratio, low, high, config.precision), blocks
                # check again after another quarter: the sorts stay O(n log n) over the whole timing
                check_at = blocks + max(4 * group, blocks // 4)
            if blocks >= config.repeat and (precise or elapsed >= config.time_budget):
                break
        if checked != blocks:
            # at the cap: use every whole group there is (fewer than MIN_GROUPS gives a wide, honest interval)
            group = min(group, max(1, blocks // MIN_GROUPS))
            ratio, low, high = ratio_interval(_group_ratios(ref_t, cand_t, group), config.confidence)
            precise = _within(ratio, low, high, config.precision) and blocks // group >= MIN_GROUPS
    result = LatencyComparison(ratio=ratio, low=low, high=high, reference_ms=float(np.median(ref_t)) * 1e3,
                               candidate_ms=float(np.median(cand_t)) * 1e3, pairs=blocks, capped=not precise,
                               seconds=clock() - start, precision=config.precision)
    return _finish(result, config)


def compare_unpaired(reference_ms: np.ndarray, candidate_ms: np.ndarray, config: TimingConfig | None = None) -> LatencyComparison:
    """Ratio of medians of two models timed apart (too large to have both sessions alive), with an interval.

    Each median gets its order-statistics interval (at half the error rate
    each, so both hold together at ``confidence``), and the ratio's interval
    is their quotient at the extremes. Without pairing, load that changed
    between the two timings is in the ratio: the result says
    ``paired: false`` and carries a warning.
    """
    config = config or TimingConfig()
    one_side = 1 - (1 - config.confidence) / 2
    ref, ref_lo, ref_hi = ratio_interval(np.log(np.asarray(reference_ms, dtype=np.float64)), one_side)
    cand, cand_lo, cand_hi = ratio_interval(np.log(np.asarray(candidate_ms, dtype=np.float64)), one_side)
    ratio, low, high = cand / ref, cand_lo / ref_hi, cand_hi / ref_lo
    result = LatencyComparison(ratio=ratio, low=low, high=high, reference_ms=ref, candidate_ms=cand,
                               pairs=min(len(reference_ms), len(candidate_ms)),
                               capped=not _within(ratio, low, high, config.precision), paired=False,
                               precision=config.precision,
                               seconds=float(np.sum(reference_ms) + np.sum(candidate_ms)) / 1e3)  # the timed runs
    result.warnings.append("the two models were timed one after the other, not interleaved (they are too large "
                           "to have both ORT sessions alive): load that changed in between is in the ratio")
    return _finish(result, config)


# -- isolation: the timing in a child process of its own -----------------------------------------------------------

def _child_main(conn: Any) -> None:
    """Child process: read the job, make both sessions, time them, send back the result (or the error's one line)."""
    try:
        sources, feed, config, providers, threads = conn.recv()
        if config.cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(config.cpus))  # before the sessions: ORT's threads inherit it
        from onnxopt.sessions import SessionFactory

        factory = SessionFactory(providers=list(providers), threads=threads)
        ref, cand = (factory.create(s if isinstance(s, bytes) else str(s)) for s in sources)
        result = compare_latency(ref, cand, feed, TimingConfig(**{**asdict(config), "cpus": None}))
        conn.send(("ok", result.to_dict()))
    except OnnxoptError as err:
        conn.send(("error", str(err)))
    except Exception as err:  # noqa: BLE001 - whatever ORT raises, the parent reports one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        conn.send(("error", f"{type(err).__name__}: {first[:300]}"))
    finally:
        conn.close()


def compare_latency_isolated(
    reference: bytes | str | os.PathLike[str],
    candidate: bytes | str | os.PathLike[str],
    feed: Mapping[str, np.ndarray],
    config: TimingConfig | None = None,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    tick: Callable[[float], None] | None = None,
) -> LatencyComparison:
    """:func:`compare_latency` in a fresh child process; its crash (ORT abort, segfault) is an OnnxoptError."""
    config = config or TimingConfig()
    sources = tuple(r if isinstance(r, bytes) else str(r) for r in (reference, candidate))
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no ORT state or threads inherited
    parent, child = ctx.Pipe()
    # the job goes through our own pipe, not the Process arguments: spawn writes those while it still holds the
    # child's end, so a child that dies before reading them would block the parent for ever
    proc = ctx.Process(target=_child_main, args=(child,), name="onnxopt-timing", daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    message = None
    try:
        try:
            parent.send((sources, dict(feed), config, list(providers), threads or config.threads))
        except (EOFError, OSError):
            pass  # the child is gone already: reported below like any other death
        while message is None:
            if parent.poll(0.2):
                try:
                    message = parent.recv()
                except (EOFError, OSError):  # the child died: its end closed or reset
                    break
            elif not proc.is_alive():
                if parent.poll(0):
                    continue
                break
            if tick is not None:
                tick(min((time.perf_counter() - start) / config.time_budget, 1.0))
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    if message is None:
        raise OnnxoptError(f"the timing child process died ({exit_description(proc.exitcode)}) while running the models "
                           "on ONNX Runtime; nothing was measured",
                           "run without --isolate to see ORT's own error, or check the models with `onnxopt inspect`")
    status, payload = message
    if status != "ok":
        raise OnnxoptError(f"timing in a child process failed: {payload}", "check the models with `onnxopt inspect`")
    return LatencyComparison.from_dict(payload)


@contextmanager
def model_sources(*models: Any) -> Iterator[list[bytes | str]]:
    """What a child process can load each in-memory model from: bytes for small ones, a temporary file otherwise."""
    import onnx_ir as ir

    from onnxopt.io import has_external_data, serialize_model, tensor_bytes
    from onnxopt.sessions import LARGE_MODEL_BYTES

    folder = None
    out: list[bytes | str] = []
    try:
        for i, model in enumerate(models):
            if not isinstance(model, ir.Model):
                out.append(model if isinstance(model, bytes) else str(model))
            elif has_external_data(model) or tensor_bytes(model) >= LARGE_MODEL_BYTES:
                folder = folder or Path(tempfile.mkdtemp(prefix="onnxopt-timing-"))
                path = folder / f"model{i}.onnx"
                ir.save(model, path, external_data=f"model{i}.onnx.data")
                out.append(str(path))
            else:
                out.append(serialize_model(model))
        yield out
    finally:
        if folder is not None:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
