"""Refit the layers that read pruned channels, by least squares on calibration activations.

After channels are removed, each layer that summed over them (a Conv, Gemm
or MatMul "consumer") sees fewer inputs. Its new weights and bias are the
ridge-regularized least-squares fit of the *dense* model's output of that
layer from the *pruned* model's inputs, in closed form (ThiNet, Luo et al.
2017; He et al. 2017 channel pruning). Fitting on the pruned model's
inputs lets each layer also absorb the error of the layers before it, so
consumers are refit stage by stage in graph order.

Only Gram matrices are accumulated (X^T X and X^T Y per layer, on a sample
of rows per batch, see :func:`.design.rows_per_batch`), never the activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.activations import iter_activations
from onnxopt.data import Dataset
from onnxopt.graph import Names, add_initializer, attribute, constant_array, is_onnx_op, only_consumer, replace_input_weight
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory

from .design import design_rows, handles, linear_map, output_rows, rows_per_batch, taps
from .groups import Consumer
from .surgery import SliceLog

__all__ = ["refit_consumers", "refit_from_grams", "compose_log"]


def compose_log(origin: SliceLog, log: SliceLog) -> None:
    """Fold one round's surgery log into ``origin``: kept indices always refer to the dense model's tensors."""
    for key, axes in log.items():
        entry = origin.setdefault(key, {})
        for axis, kept in axes.items():
            entry[axis] = entry[axis][kept] if axis in entry else kept


@dataclass
class _Fit:
    """One consumer being refit: its dense weights as a matrix, kept positions, and the Gram accumulators."""

    consumer: Consumer
    dense: np.ndarray  # [outputs kept, dense inputs (x taps)] effective linear map
    dense_bias: np.ndarray  # [outputs kept]
    intercept: bool
    gram: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cross: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    target_sq: float = 0.0
    rows: int = 0


def _following_bias(node: ir.Node) -> tuple[ir.Node, int] | None:
    """A MatMul's bias: the Add reading its output alone, with a constant vector operand."""
    add = only_consumer(node.outputs[0])
    if add is None or not is_onnx_op(add, "Add"):
        return None
    for i, v in enumerate(add.inputs):
        if v is not node.outputs[0] and constant_array(v) is not None:
            return add, i
    return None


def _bias(node: ir.Node, kind: str, n_out: int) -> np.ndarray | None:
    """The layer's bias as a vector of ``n_out`` (zeros if absent), or None when it is not a per-output vector."""
    if kind in ("conv", "conv_transpose"):
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = constant_array(node.inputs[2])
            if b is None:
                return None
            # a ConvTranspose's map has one row per (output channel, tap); the bias is shared by the taps
            return np.repeat(b.astype(np.float64).reshape(-1), n_out // max(b.size, 1))
        return np.zeros(n_out)
    if kind == "gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2])
            if c is None or (c.size not in (1, n_out)) or (c.ndim == 2 and c.shape[0] != 1):
                return None
            return float(attribute(node, "beta", 1.0)) * np.broadcast_to(c.astype(np.float64).reshape(-1), (n_out,)).copy()
        return np.zeros(n_out)
    found = _following_bias(node)
    if found is None:
        return None
    b = constant_array(found[0].inputs[found[1]])
    assert b is not None
    return b.astype(np.float64).reshape(-1) if b.size == n_out else None


def _prepare(consumer: Consumer, dense_node: ir.Node, origin: SliceLog) -> _Fit | None:
    node, kind = consumer.node, consumer.kind
    if not handles(consumer):
        return None
    w_dense = constant_array(dense_node.inputs[consumer.weight_index])
    if w_dense is None:
        return None
    dense = linear_map(dense_node, kind, w_dense)
    out_axis = {"conv": 0, "conv_transpose": 1, "gemm": 0 if attribute(node, "transB", 0) else 1, "matmul": 1}[kind]
    kept = origin.get((node.name or "", consumer.weight_index), {})
    rows = output_rows(consumer, kept.get(out_axis, np.arange(w_dense.shape[out_axis])))
    dense_bias = _bias(dense_node, kind, dense.shape[0])
    intercept = dense_bias is not None and _bias(node, kind, len(rows)) is not None
    return _Fit(consumer, dense[rows], dense_bias[rows] if dense_bias is not None else np.zeros(len(rows)), intercept)


def _stages(model: ir.Model, names: set[str]) -> dict[str, int]:
    """Stage of each consumer: how many consumers to refit lie upstream of it (refit stage by stage)."""
    level: dict[int, int] = {}
    out: dict[str, int] = {}
    for node in model.graph:
        lv = 0
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in level:
                lv = max(lv, level[id(p)] + (1 if p.name in names else 0))
        level[id(node)] = lv
        if node.name in names:
            out[node.name] = lv
    return out


def _install(fit: _Fit, theta: np.ndarray, names: Names) -> None:
    c = fit.consumer
    node, kind = c.node, c.kind
    w_now = constant_array(node.inputs[c.weight_index])
    assert w_now is not None
    d = theta.shape[0] - (1 if fit.intercept else 0)
    linear = theta[:d].T  # [outputs, inputs]
    bias = fit.dense_bias + (theta[d] if fit.intercept else 0.0)
    dtype = w_now.dtype
    if kind == "conv":
        replace_input_weight(node, c.weight_index, linear.reshape(w_now.shape).astype(dtype), names)
    elif kind == "conv_transpose":
        replace_input_weight(node, c.weight_index, linear.T.reshape(w_now.shape).astype(dtype), names)
        bias = bias.reshape(w_now.shape[1], -1).mean(axis=1)  # one bias per output channel: the taps' mean
    elif kind == "gemm":
        alpha = float(attribute(node, "alpha", 1.0))
        w = linear / alpha
        replace_input_weight(node, c.weight_index, (w if attribute(node, "transB", 0) else w.T).astype(dtype), names)
    else:
        replace_input_weight(node, c.weight_index, linear.T.astype(dtype), names)
    if not fit.intercept:
        return
    if kind == "matmul":
        add, index = _following_bias(node)  # type: ignore[misc]
        old = constant_array(add.inputs[index])
        assert old is not None
        replace_input_weight(add, index, bias.reshape(old.shape).astype(old.dtype), names)
        return
    if kind == "gemm":
        beta = float(attribute(node, "beta", 1.0))
        if len(node.inputs) <= 2 or node.inputs[2] is None or beta == 0.0:
            beta = 1.0
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        bias = bias / beta
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        replace_input_weight(node, 2, bias.astype(dtype), names)
    else:
        graph = node.graph
        assert graph is not None
        value = add_initializer(graph, bias.astype(dtype), names.fresh(f"{node.name or node.op_type}_bias"))
        node.resize_inputs(3)
        node.replace_input_with(2, value)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def _shared_bias(fit: _Fit, reg: np.ndarray, theta: np.ndarray, d: int) -> np.ndarray:
    """A ConvTranspose shares one bias across its taps: the least-squares shared bias is the taps' mean of
    the per-tap ones, and the weights are then re-solved for it: W = A^-1 (X^T Y - X^T 1 b)."""
    t = taps(fit.consumer)
    shared = np.repeat(theta[d].reshape(-1, t).mean(axis=1), t)
    out = theta.copy()
    out[d] = shared
    out[:d] = _solve(reg[:d, :d], fit.cross[:d] - np.outer(fit.gram[:d, d], shared))
    return out


def _error(fit: _Fit, theta: np.ndarray) -> float:
    """Relative squared error ||X theta - Y||^2 / ||Y||^2 from the Gram matrices."""
    err = float(np.sum(theta * (fit.gram @ theta)) - 2 * np.sum(theta * fit.cross) + fit.target_sq)
    return max(err, 0.0) / fit.target_sq if fit.target_sq > 0 else 0.0


def _current_theta(fit: _Fit) -> np.ndarray:
    c = fit.consumer
    w = constant_array(c.node.inputs[c.weight_index])
    assert w is not None
    linear = linear_map(c.node, c.kind, w)
    theta = linear.T
    if fit.intercept:
        bias = _bias(c.node, c.kind, linear.shape[0])
        assert bias is not None
        theta = np.vstack([theta, (bias - fit.dense_bias)[None, :]])
    return theta


def _finish(fit: _Fit, ridge: float, names: Names) -> dict[str, object]:
    """Solve the ridge least squares from the accumulated Gram matrices; install it if it beats the current weights."""
    d = fit.gram.shape[0] - (1 if fit.intercept else 0)
    reg = fit.gram.copy()
    scale = float(np.mean(np.diag(reg)[:d])) if d else 0.0
    reg[np.arange(d), np.arange(d)] += ridge * scale if scale > 0 else 1e-12
    theta = _solve(reg, fit.cross)
    if fit.consumer.kind == "conv_transpose" and fit.intercept:
        theta = _shared_bias(fit, reg, theta, d)
    before = _error(fit, _current_theta(fit))
    after = _error(fit, theta)
    if after <= before:
        _install(fit, theta, names)
    return {"layer": fit.consumer.node.name, "inputs": d, "rows": fit.rows,
            "error_before": round(before, 6), "error_after": round(min(after, before), 6)}


def refit_from_grams(before: ir.Model, model: ir.Model, consumers: Sequence[Consumer], log: SliceLog,
                     grams: dict[str, np.ndarray], ridge: float) -> None:
    """Refit the readers of channels just removed when nothing upstream of them changed (one group pruned alone).

    Their inputs are then the unpruned ones minus some columns, so the least
    squares needs only the unpruned input Gram matrices ``grams`` (keyed by
    layer name, bias column last, see :func:`.selection.input_grams`): no data
    pass. ``before`` is the model as it was before this surgery.
    """
    dense_nodes = {n.name: n for n in before.graph if n.name}
    names = Names(model)
    done: set[str] = set()
    for c in consumers:
        name = c.node.name or ""
        kept = log.get((name, c.weight_index), {}).get(c.weight_axis)
        gram = grams.get(name)
        if kept is None or gram is None or name in done or name not in dense_nodes:
            continue
        fit = _prepare(c, dense_nodes[name], log)
        if fit is None or gram.shape[0] != fit.dense.shape[1] + 1:
            continue
        done.add(name)
        t = taps(c) if c.kind == "conv" else 1
        cols = (kept[:, None] * t + np.arange(t)[None, :]).reshape(-1)
        d_full = fit.dense.shape[1]
        cols = np.concatenate([cols, [d_full]]) if fit.intercept else cols
        fit.gram = gram[np.ix_(cols, cols)]
        fit.cross = gram[cols, :d_full] @ fit.dense.T
        fit.target_sq = float(np.sum(fit.dense * (fit.dense @ gram[:d_full, :d_full])))
        _finish(fit, ridge, names)


def refit_consumers(dense: ir.Model, model: ir.Model, consumers: Sequence[Consumer], origin: SliceLog, dataset: Dataset,
                    sessions: SessionFactory, rng: np.random.Generator, ridge: float,
                    progress: Progress | None = None) -> tuple[list[dict[str, object]], list[str]]:
    """Refit every consumer whose inputs lost channels; return per-layer rows for the report and notes."""
    dense_nodes = {n.name: n for n in dense.graph if n.name}
    fits: dict[str, _Fit] = {}
    notes: list[str] = []
    for c in consumers:
        kept = origin.get((c.node.name or "", c.weight_index), {}).get(c.weight_axis)
        if kept is None or c.node.name in fits:
            continue  # nothing removed from this layer's inputs
        dense_node = dense_nodes.get(c.node.name or "")
        fit = _prepare(c, dense_node, origin) if dense_node is not None else None
        if fit is None:
            notes.append(f"{c.node.name}: not refit ({c.kind} layer of a form the refit does not handle)")
            continue
        fits[c.node.name or ""] = fit
    if not fits:
        return [], notes
    stages = _stages(model, set(fits))
    names = Names(model)
    rows: list[dict[str, object]] = []
    task = progress.task("prune: refitting layers", total=len(set(stages.values()))) if progress else None
    for stage in sorted(set(stages.values())):
        batch_fits = [f for n, f in fits.items() if stages[n] == stage]
        wanted = sorted({f.consumer.value.name for f in batch_fits if f.consumer.value.name})
        dense_stream = iter_activations(dense, wanted, dataset, sessions)
        pruned_stream = iter_activations(model, wanted, dataset, sessions)
        for dense_batch, pruned_batch in zip(dense_stream, pruned_stream):
            for fit in batch_fits:
                name = fit.consumer.value.name or ""
                limit = rows_per_batch(fit.consumer, dataset.num_batches)
                xk, pick = design_rows(pruned_batch[name], fit.consumer, None, rng, limit)
                xo, _ = design_rows(dense_batch[name], fit.consumer, pick, rng, limit)
                target = xo @ fit.dense.T
                if fit.intercept:
                    xk = np.hstack([xk, np.ones((xk.shape[0], 1))])
                if fit.gram.size == 0:
                    fit.gram = np.zeros((xk.shape[1], xk.shape[1]))
                    fit.cross = np.zeros((xk.shape[1], target.shape[1]))
                # float32 products (4x faster than float64 here), accumulated in float64 across batches
                xk32 = xk.astype(np.float32)
                fit.gram += xk32.T @ xk32
                fit.cross += xk32.T @ target.astype(np.float32)
                fit.target_sq += float(np.sum(target * target))
                fit.rows += xk.shape[0]
        rows.extend(_finish(fit, ridge, names) for fit in batch_fits)
        if task:
            task.advance()
    if task:
        task.close()
    return rows, notes
