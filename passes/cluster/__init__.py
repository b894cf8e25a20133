"""cluster: k-means weight sharing, stored as a codebook and packed indices that the graph decodes.

Each weight (the weight input of Conv, ConvTranspose, Gemm, MatMul, Gather;
W, R and B of LSTM, GRU and RNN; in every subgraph)
is replaced by at most k shared values, per tensor or per output channel
(Deep Compression's weight sharing; TF-MOT's clustering, for any ONNX
model). ``dense`` writes the clustered floats in place (same graph; a zip
of the file shrinks); ``packed`` writes a codebook and 1/2/4/8-bit indices
and decodes them in the graph with standard ops, which ONNX Runtime folds
into plain weights at session start: the file shrinks, inference speed does
not change.

Modules: :mod:`.targets` finds the weights and their channel axes,
:mod:`.kmeans` clusters (kmeans++, linear, density inits and Lloyd),
:mod:`.optimal` solves 1-D k-means exactly, :mod:`.storage` packs and
writes the decode, :mod:`.layers` reads per-layer settings (``layers``), and
:mod:`.allocation` proposes them under ``--max-drop`` once the k ladder chose
a uniform k (:meth:`ClusterPass.budget_refinement`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import Pass, PassContext, PassResult, PassSkipped, hookimpl, option
from onnxopt.activations import segment_min_bytes
from onnxopt.graph import Names, attribute, cleanup, opset_version, reroute
from onnxopt.io import spill, tensor_bytes
from onnxopt.opset import ensure_opset
from onnxopt.pass_api import PassReport, PassSpace

from onnxopt_passes.cluster.allocation import Proposal, error_scales, proposals
from onnxopt_passes.cluster.kmeans import Clustering, Init, cluster_rows
from onnxopt_passes.cluster.layers import LayerSetting, exact_entry, parse_layers, setting_for
from onnxopt_passes.quant.adaround import adaround_rows, layer_inputs
from onnxopt_passes.cluster.storage import DECODE_OPSET, Decoder, as_rows, from_rows, index_bits
from onnxopt_passes.cluster.targets import WEIGHT_SLOTS, Target, find_targets

__all__ = ["ClusterConfig", "ClusterPass", "MIN_VALUES_PER_CENTROID", "FLOAT16_TOLERANCE", "onnxopt_register_passes"]

#: Per-channel codebooks are used only where each channel holds at least this many weights per centroid;
#: below, a [C, k] codebook costs more than it helps and the tensor gets one codebook.
MIN_VALUES_PER_CENTROID = 4


@dataclass(frozen=True)
class ClusterConfig:
    """Keys of the cluster pass."""

    k: int = option(16, "shared values per tensor (or per channel), 2 to 256; indices take 1, 2, 4 or 8 bits",
                    unit="values")
    mode: Literal["packed", "dense"] = option(
        "packed", "packed: codebook + bit-packed indices decoded in the graph (smaller file); "
        "dense: clustered float values in place (same graph, compresses well with zip)")
    granularity: Literal["tensor", "channel"] = option(
        "tensor", "one codebook per weight tensor, or one per output channel (used where each channel has at least "
        f"{MIN_VALUES_PER_CENTROID}·k weights; with init=grid wherever there is an output-channel axis)")
    init: Init = option("kmeans++", "kmeans++ (D² seeding), linear (evenly spaced), density (quantiles), grid (a uniform "
                        "symmetric grid per row: k=16 is the int4 grid quant then stores in 4 bits), or optimal "
                        "(exact 1-D k-means by dynamic programming where affordable, never worse than kmeans++)")
    min_size: int = option(256, "leave weights with fewer elements alone (biases and norm scales are never clustered)",
                           unit="elements")
    codebook_dtype: Literal["auto", "float32", "float16", "int8"] = option(
        "auto", "storage of the shared values; auto: float16 where rounding to it adds under 1% to the tensor's "
        "clustering error (halves per-channel codebooks), else float32; int8: symmetric 8-bit codes and a float16 "
        "scale per codebook row (a little over half a float16 per-channel codebook; the shared values are rounded to "
        "1/127 of their row's largest); the weights keep their type")
    iterations: int = option(300, "most Lloyd iterations per tensor (they stop once no weight changes cluster)")
    rounding: Literal["nearest", "adaround"] = option(
        "nearest", "init=grid, per channel: each weight to its nearest level, or adaround: to the level below or above "
                   "as learned (AdaRound) to keep its Conv/MatMul/Gemm's output on the --data activations (needs --data)")
    ops: tuple[str, ...] = option(tuple(WEIGHT_SLOTS), "op types whose weight input is clustered")
    exclude: tuple[str, ...] = option((), "weight or node name globs left alone")
    layers: tuple[str, ...] = option(
        (), "per-layer settings, GLOB=K or GLOB=K/tensor|channel, matched in order against weight and node names "
        "(the first match wins; the others take k and granularity), e.g. fc*=256,conv1*=4/channel")
    per_layer: bool = option(
        False, "under --max-drop (with --eval), once the budget chose k: propose per-layer k and granularity from each "
        "weight's error and bytes, keep the strongest proposal measured within the budget (two standard errors) on "
        "the selection part and smaller on disk, else the uniform k; layers you name in `layers` stay as given, a k "
        "you set turns it off. Off by default: of the eight cluster runs of benchmarks/results/cluster_per_layer_on.md "
        "it shrank two (digits cnn at 0.02: file 0.318 -> 0.215 of the original; PP-OCR cls at 0.02: 0.437 -> 0.431) "
        "and took one over its budget on fresh inputs (digits mlp at 0.02: 2.22 pt, 1.11 pt with one k)")

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 256:
            raise ValueError(f"k {self.k} is not in 2..256 (indices are stored in at most 8 bits)")
        if self.init == "grid" and self.k not in (4, 8, 16):
            raise ValueError(f"init=grid takes k 4, 8 or 16 (a symmetric grid quant can store in 4 bits), not {self.k}")
        if self.rounding == "adaround" and self.init != "grid":
            raise ValueError("rounding=adaround needs init=grid (it learns the rounding onto the grid's levels)")
        if self.min_size < 0 or self.iterations < 1:
            raise ValueError("min_size must be >= 0 and iterations >= 1")
        unknown = [op for op in self.ops if op not in WEIGHT_SLOTS]
        if unknown:
            raise ValueError(f"ops {', '.join(unknown)} not supported (supported: {', '.join(WEIGHT_SLOTS)})")
        for setting in parse_layers(self.layers):
            if self.init == "grid" and setting.k not in (4, 8, 16):
                raise ValueError(f"layers entry {setting.entry!r}: init=grid takes k 4, 8 or 16")


def _snr_db(relative_error: float) -> float | None:
    """Signal-to-noise ratio in dB of a relative squared error; None when exact."""
    return None if relative_error <= 0 else round(float(-10.0 * np.log10(relative_error)), 2)


def _layout(target: Target, shape: tuple[int, ...], k: int, granularity: str,
            init: str) -> tuple[int | None, str | None]:
    """The channel axis to cluster along (None: per tensor), and why a per-channel request fell back."""
    if granularity == "tensor":
        return None, None
    if target.axis is None:
        return None, "per tensor: no single output-channel axis"
    per_row = int(np.prod(shape)) // shape[target.axis]
    # a grid row is one step, not k values, once quant stores it in 4 bits: per channel pays whatever the row length
    if per_row < MIN_VALUES_PER_CENTROID * k and init != "grid":
        return None, f"per tensor: {per_row} weights per channel < {MIN_VALUES_PER_CENTROID}·k"
    return target.axis, None


#: ``codebook_dtype=auto`` takes float16 when it adds at most this share to the tensor's squared error.
FLOAT16_TOLERANCE = 0.01


def _byte_codebook(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [rows, k] as symmetric int8 codes and a float16 scale per row [rows, 1]: value = code * scale,
    computed in float32 (as the graph's Cast and Mul do)."""
    peak = np.abs(centroids).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, peak / 127, 1.0).astype(np.float16)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.float16(1))  # float16 over- or underflow
    codes = np.clip(np.rint(centroids / scale.astype(np.float64)), -127, 127).astype(np.int8)
    return codes, scale


def _store(clustering: Clustering, reference: np.ndarray, dtype: np.dtype, choice: str, shape: tuple[int, ...],
           axis: int | None) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """The codebook in its storage type, the decoded weight (in the weight's type), its squared error, and for an
    int8 codebook its scale per row.

    ``auto`` takes float16 when it adds at most :data:`FLOAT16_TOLERANCE` to
    the error; float16 is never used where it overflows. A float16 weight
    always gets a float16 codebook (a wider one would be rounded anyway).
    """
    labels = clustering.labels.astype(np.intp)
    if choice == "int8":
        codes, scale = _byte_codebook(clustering.centroids)
        values = (codes.astype(np.float32) * scale.astype(np.float32)).astype(dtype)
        decoded = from_rows(np.take_along_axis(values, labels, axis=1), shape, axis)
        return codes, decoded, float(np.square(reference - decoded).sum()), scale

    def build(name: str) -> tuple[np.ndarray, np.ndarray, float]:
        with np.errstate(over="ignore"):
            codebook = clustering.centroids.astype(name)
        decoded = from_rows(np.take_along_axis(codebook.astype(dtype), labels, axis=1), shape, axis)
        error = float(np.square(reference - decoded).sum()) if np.isfinite(codebook).all() else float("inf")
        return codebook, decoded, error

    if dtype.itemsize <= 2:
        return (*build(dtype.name), None)
    if choice == "float32":
        return (*build("float32"), None)
    half = build("float16")
    if choice == "float16" and np.isfinite(half[2]):
        return (*half, None)
    full = build("float32")
    return (*(half if half[2] <= full[2] * (1 + FLOAT16_TOLERANCE) else full), None)


def _compress(weight: np.ndarray, shape: tuple[int, ...], axis: int | None, k: int, config: ClusterConfig,
              rng: np.random.Generator, moment: np.ndarray | None = None
              ) -> tuple[Clustering, np.ndarray, np.ndarray, float, np.ndarray | None]:
    """One weight clustered to ``k`` along ``axis``: the clustering, its codebook in its storage type, the decoded
    weight, its squared error, and an int8 codebook's scale per row."""
    clustering = cluster_rows(as_rows(weight, axis), k, config.init, config.iterations, rng)
    if moment is not None and axis is not None and config.init == "grid":
        half = k // 2
        step = clustering.centroids[:, 1] - clustering.centroids[:, 0]
        levels = adaround_rows(as_rows(weight, axis).astype(np.float64), step, moment, qmin=-half, qmax=half - 1)
        clustering = Clustering(clustering.centroids, (levels + half).astype(np.uint8), "grid (adaround)")
    # a grid's codebook stays float32: float16 levels would no longer be exact multiples of one step
    choice = "float32" if config.init == "grid" and weight.dtype == np.float32 else config.codebook_dtype
    codebook, decoded, error, scale = _store(clustering, weight.astype(np.float64), weight.dtype, choice, shape, axis)
    return clustering, codebook, decoded, error, scale


def _packed_bytes(codebook: np.ndarray, labels: np.ndarray, scale: np.ndarray | None) -> int:
    """Bytes a packed weight stores: its codebook, its indices at the narrowest width, an int8 codebook's scales."""
    return int(codebook.nbytes + -(-labels.size * index_bits(codebook.shape[1]) // 8)
               + (scale.nbytes if scale is not None else 0))


class ClusterPass(Pass[ClusterConfig]):
    """k-means weight sharing: a codebook and packed indices decoded in the graph (or clustered floats in place)."""

    name = "cluster"
    Config = ClusterConfig
    search_order = 30
    corpus_variants = ({"min_size": 16, "k": 4},)

    @classmethod
    def search_space(cls, objective: str = "size") -> PassSpace:
        # packed storage: 8, 4 and 2-bit indices (k=64 or 8 would take the same bits as 256 or 16 for less accuracy);
        # a codebook per output channel keeps more accuracy than one per tensor for a little more size
        return PassSpace("ladder", ({"k": 256}, {"k": 16, "granularity": "channel"}, {"k": 16},
                                    {"k": 4, "granularity": "channel"}, {"k": 4}), fixed={"mode": "packed", "init": "optimal"})

    budget_keys = ("k",)
    #: Shared values per tensor, weaker to stronger: the ladder --max-drop climbs
    BUDGET_K = (256, 128, 64, 32, 16, 8, 4, 2)

    def budget_ladder(self, config: ClusterConfig, ctx: PassContext) -> list[tuple[str, ClusterConfig]]:
        """k from 256 down to 2 at the configured granularity (16, 8, 4 for init=grid, the k a grid takes)."""
        ladder = (16, 8, 4) if config.init == "grid" else self.BUDGET_K
        return [(f"k={k} ({config.granularity})", replace(config, k=k)) for k in ladder]

    def budget_refinement(self, model: ir.Model, config: ClusterConfig, ctx: PassContext,
                          explicit: frozenset[str] = frozenset(),
                          over: ClusterConfig | None = None) -> list[tuple[str, ClusterConfig]]:
        """Per-layer k and granularity around the uniform k the ladder chose, weaker to stronger (:mod:`.allocation`).

        Each weight is clustered at the widest k of each index width (256,
        16, 4, 2; and the chosen k), per tensor and per channel; its relative
        error and stored bytes at each are the proxy. A proposal is the
        assignment storing the fewest bytes whose summed error is within a
        multiple of the uniform k's, below the error of ``over``, the stronger
        k the ladder measured over the budget (:func:`.allocation.error_scales`);
        only those storing fewer bytes than the uniform k are offered. Layers the
        user named in ``layers`` keep their entries, and a granularity the user
        set is kept. None with ``per_layer`` off, in dense mode (the stored
        bytes do not change) or with rounding=adaround (its data is per run).
        """
        if not config.per_layer or config.mode != "packed" or config.rounding == "adaround":
            return []
        targets, _ = find_targets(model, config.ops, config.min_size, config.exclude)
        user = parse_layers(config.layers)
        weights = [(t, t.value.const_value.numpy()) for t in targets  # type: ignore[union-attr]
                   if setting_for(user, t.name, t.readers) is None]
        weights = [(t, w) for t, w in weights if np.isfinite(w).all()]
        if not weights:
            return []
        widest: dict[int, int] = {}
        for k in ((16, 8, 4) if config.init == "grid" else self.BUDGET_K):
            widest[index_bits(k)] = max(widest.get(index_bits(k), 0), k)
        ks = sorted({*widest.values(), config.k, *([over.k] if over is not None else [])}, reverse=True)
        granularities = (config.granularity,) if "granularity" in explicit else ("tensor", "channel")
        options = [(k, g) for k in ks for g in granularities]
        errors = np.full((len(weights), len(options)), np.inf)
        sizes = np.full((len(weights), len(options)), np.inf)
        settings: list[list[tuple[int, str]]] = []  # per layer and column: the k and granularity it stores
        baseline = np.zeros(len(weights), dtype=np.intp)
        failed = np.zeros(len(weights), dtype=np.intp)  # per layer, the column of ``over``'s setting
        rng = np.random.default_rng(ctx.seed)
        with ctx.progress.task("cluster: per-layer error and bytes", total=len(weights)) as task:
            for row, (target, weight) in enumerate(weights):
                shape = tuple(int(d) for d in weight.shape)
                seen: dict[tuple[int, int | None], int] = {}
                layer: list[tuple[int, str]] = []
                energy = float(np.square(weight.astype(np.float64)).sum())
                for column, (k, granularity) in enumerate(options):
                    axis, _ = _layout(target, shape, k, granularity, config.init)
                    layer.append((k, "channel" if axis is not None else "tensor"))
                    if (k, axis) in seen:  # a per-channel request that fell back: the same setting as per tensor
                        continue
                    seen[(k, axis)] = column
                    clustering, codebook, _, error, scale = _compress(weight, shape, axis, k, config, rng)
                    errors[row, column] = error / energy if energy > 0 else (0.0 if error == 0 else 1.0)
                    sizes[row, column] = _packed_bytes(codebook, clustering.labels, scale)
                chosen_axis, _ = _layout(target, shape, config.k, config.granularity, config.init)
                baseline[row] = seen[(config.k, chosen_axis)]
                if over is not None:
                    over_axis, _ = _layout(target, shape, over.k, over.granularity, config.init)
                    failed[row] = seen[(over.k, over_axis)]
                settings.append(layer)
                task.advance()
        uniform = f"k={config.k} ({config.granularity})"
        rungs = []
        rows = np.arange(len(weights))
        scales = error_scales(float(errors[rows, baseline].sum()),
                              float(errors[rows, failed].sum()) if over is not None else None)
        for proposal in proposals(errors, sizes, baseline, scales):
            entries, counts = self._entries(weights, settings, baseline, proposal)
            changed = ", ".join(f"{n} to {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            label = (f"per layer at {proposal.scale:.2f}x the weight error of {uniform}: {changed} "
                     f"({len(entries)} of {len(weights)} layers moved; weights {proposal.bytes / 1024:.1f} KiB, "
                     f"uniform {float(sizes[rows, baseline].sum()) / 1024:.1f} KiB)")
            rungs.append((label, replace(config, layers=(*config.layers, *entries))))
        return rungs

    @staticmethod
    def _entries(weights: list[tuple[Target, np.ndarray]], settings: list[list[tuple[int, str]]],
                 baseline: np.ndarray, proposal: Proposal) -> tuple[list[str], dict[str, int]]:
        """The ``layers`` entries of a proposal (one per layer it moves off the uniform setting), and how many layers
        went to each setting."""
        entries: list[str] = []
        counts: dict[str, int] = {}
        for row, (target, _) in enumerate(weights):
            column = int(proposal.columns[row])
            if column == baseline[row]:
                continue
            k, granularity = settings[row][column]
            entries.append(exact_entry(target.name, k, granularity))  # type: ignore[arg-type]
            key = f"k={k}" + ("/channel" if granularity == "channel" else "")
            counts[key] = counts.get(key, 0) + 1
        return entries, counts

    def run(self, model: ir.Model, config: ClusterConfig, ctx: PassContext) -> PassResult:
        report = self.new_report(config)
        targets, skipped = find_targets(model, config.ops, config.min_size, config.exclude)
        for target_name, reason in skipped:
            report.skip(target_name, reason)
        if not targets:
            raise PassSkipped(f"no float weight of {config.min_size}+ elements read by {', '.join(config.ops)}")
        if config.mode == "packed" and opset_version(model) < DECODE_OPSET:
            model, note = ensure_opset(model, DECODE_OPSET, why="the in-graph decode uses BitShift and GatherElements")
            if note:
                report.notes.append(note)
            targets, _ = find_targets(model, config.ops, config.min_size, config.exclude)
        moments = self._layer_inputs(model, targets, config, ctx, report) if config.rounding == "adaround" else {}
        per_layer = parse_layers(config.layers)
        names = Names(model)
        decoders: dict[int, Decoder] = {}
        totals = np.zeros(3)  # seconds clustering, squared error, squared weights
        # seeded per run, not drawn from the run's generator: a budget ladder's rung clusters the same whatever was
        # tried before it (and the passes after get the same draws whichever rung was kept)
        rng = np.random.default_rng(ctx.seed)
        large = config.mode == "dense" and tensor_bytes(model) >= segment_min_bytes()
        with ctx.progress.task(f"cluster: k-means (k={config.k})", total=len(targets)) as task:
            for target in targets:
                setting = setting_for(per_layer, target.name, target.readers)
                totals += self._cluster(target, config, setting, rng, names, decoders, report, moments.get(target.name),
                                        large)
                task.advance()
        if not report.items:
            raise PassSkipped("every candidate weight was left alone")
        cleanup(model)
        seconds, error, energy = totals
        self._describe(report, config, float(seconds), float(error / energy) if energy > 0 else 0.0)
        return PassResult(model, True, report)

    def _layer_inputs(self, model: ir.Model, targets: list[Target], config: ClusterConfig, ctx: PassContext,
                      report: PassReport) -> dict[str, np.ndarray]:
        """Per target weight, the input second moment of the one Conv/MatMul/Gemm reading it (AdaRound's data)."""
        data = ctx.require_calibration(self.name)
        layers: dict[str, tuple[ir.Node, np.ndarray]] = {}
        for target in targets:
            readers = [node for node, slot in target.value.uses()]
            if len(readers) != 1 or readers[0].op_type not in ("Conv", "MatMul", "Gemm") or not readers[0].name:
                continue
            node = readers[0]
            weight = target.value.const_value.numpy()  # type: ignore[union-attr]
            expected = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and attribute(node, "transB", 0)) else 1
            if node.inputs[1] is target.value and target.axis == expected and weight.ndim >= 2:
                layers[target.name] = (node, weight)
        found = layer_inputs(model, layers.values(), data, ctx.sessions, progress=ctx.progress)
        moments = {t: found[str(n.name)].moment for t, (n, _) in layers.items() if str(n.name) in found}
        report.notes.append(f"AdaRound onto the grid: {len(moments)} of {len(targets)} weights, from {len(data)} "
                            "--data samples (the others: nearest level)")
        return moments

    def _cluster(self, target: Target, config: ClusterConfig, setting: LayerSetting | None,
                 rng: np.random.Generator, names: Names, decoders: dict[int, Decoder], report: PassReport,
                 moment: np.ndarray | None = None, large: bool = False) -> tuple[float, float, float]:
        """Cluster one weight (at its ``layers`` entry's setting, else the config's) and write it back; returns
        seconds spent clustering, squared error, squared weights. ``large``: dense floats go to disk (io.spill)."""
        tensor = target.value.const_value
        assert tensor is not None
        weight = tensor.numpy()
        if not np.isfinite(weight).all():
            report.skip(target.name, "holds NaN or infinite values")
            return 0.0, 0.0, 0.0
        shape = tuple(int(d) for d in weight.shape)
        k_asked = setting.k if setting is not None else config.k
        granularity = (setting.granularity if setting is not None else None) or config.granularity
        axis, note = _layout(target, shape, k_asked, granularity, config.init)
        start = time.perf_counter()
        clustering, codebook, decoded, error, scale = _compress(weight, shape, axis, k_asked, config, rng, moment)
        seconds = time.perf_counter() - start
        energy = float(np.square(weight.astype(np.float64)).sum())
        relative = error / energy if energy > 0 else (0.0 if error == 0 else 1.0)
        k = codebook.shape[1]
        bits = index_bits(k)
        if config.mode == "dense":
            # on a large model the dense floats go to disk as they are made: held, they were a second model in memory
            target.value.const_value = (spill(decoded, target.value.name) if large else
                                        ir.tensor(decoded, name=target.value.name))
            after = decoded.nbytes
        else:
            decoder = decoders.setdefault(id(target.graph), Decoder(target.graph, names))
            nodes, out = decoder.decode(target.name, codebook, clustering.labels, bits, shape, axis, weight.dtype,
                                        scale)
            target.graph.insert_before(target.graph.node(0), nodes)
            reroute(target.value, out)
            # the decoded weight takes the initializer's name, so readers still read "conv1.weight"
            name = target.value.name
            del target.graph.initializers[name]
            out.name = name
            after = _packed_bytes(codebook, clustering.labels, scale)
        row: dict[str, Any] = {
            "tensor": target.name, "shape": list(shape), "granularity": "channel" if axis is not None else "tensor",
            "k": k, "init": clustering.method, "codebook": str(codebook.dtype),
            "rel_mse": float(f"{relative:.4g}"), "snr_db": _snr_db(relative),
            "bytes": [int(weight.nbytes), int(after)], "seconds": round(seconds, 4),
        }
        if config.mode == "packed":
            row["bits"] = bits
        if setting is not None:
            row["set_by"] = setting.entry
        if note:
            row["note"] = note
        if target.via:
            row["read_through"] = target.via
        report.items.append(row)
        return seconds, error, energy

    def _describe(self, report: PassReport, config: ClusterConfig, seconds: float, relative_error: float) -> None:
        before = sum(item["bytes"][0] for item in report.items)
        after = sum(item["bytes"][1] for item in report.items)
        weights = sum(int(np.prod(item["shape"])) for item in report.items)
        snrs = [(item["snr_db"], item["tensor"]) for item in report.items if item["snr_db"] is not None]
        overall = _snr_db(relative_error)
        worst = min(snrs) if snrs else None
        per_channel = sum(item["granularity"] == "channel" for item in report.items)
        own = sum("set_by" in item for item in report.items)
        report.figures.update({
            "tensors": len(report.items), "per_channel_tensors": per_channel, "per_layer_settings": own,
            "weights": weights,
            "bytes_before": before, "bytes_after": after, "bytes_ratio": round(after / before, 4) if before else None,
            "snr_db": overall, "worst_snr_db": worst[0] if worst else None, "worst_tensor": worst[1] if worst else None,
            "clustering_seconds": round(seconds, 3),
        })
        stored = (f"packed: weights {before / 1024:.0f} KiB -> {after / 1024:.0f} KiB" if config.mode == "packed"
                  else "dense (zip the file to see the gain)")
        snr = "exact" if overall is None else f"SNR {overall:.1f} dB" + (f", worst {worst[0]:.1f} dB ({worst[1]})" if worst else "")
        largest = max([config.k, *(item["k"] for item in report.items if "set_by" in item)])
        layers = f" ({own} by their layers entry, the others k <= {config.k})" if own else ""
        report.summary = (f"clustered {len(report.items)} tensors ({weights:,} weights) to k <= {largest}{layers}, "
                          f"{per_channel} per channel; {stored}; {snr}")


@hookimpl
def onnxopt_register_passes(register: Callable[[type[Pass[Any]]], None]) -> None:
    register(ClusterPass)
