"""Cross-CPU safety of u8 x s8 integer kernels: the int16 pair saturation of CPUs without VNNI.

On x86 CPUs without AVX512-VNNI/AVX-VNNI, ONNX Runtime's u8 x s8 kernels
multiply with ``vpmaddubsw``: each pair of adjacent products along the
reduction axis, ``a_i*w_i + a_{i+1}*w_{i+1}``, is added in int16 and
*saturates* at +-32767 before the int32 accumulation. With uint8
activations (0..255) and int8 weights, a pair overflows only when both
weights have the same sign and ``|w_i + w_{i+1}| >= 129`` (255 x 129 >
32767; with opposite signs the pair is at most 255 x 127). The same model
is then exact on a VNNI CPU and wrong on an older one.

The check flags the layers where some pair can overflow, in the two
reduction orders ONNX Runtime uses (a Conv weight flattened as
(C_in, kh, kw) for NCHW kernels and as (kh, kw, C_in) for its NHWC
kernels). The fix is per layer and per channel: the weight scale is
widened just enough that ``|w_i/s + w_{i+1}/s| <= 127`` for every adjacent
pair, so after rounding no pair exceeds 128 (255 x 128 = 32640). That
costs at most one bit, and only on channels that needed it, instead of
ORT's ``reduce_range`` (7-bit weights everywhere).

:func:`saturating_dot` emulates the arithmetic in numpy, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import onnxopt_passes.quant.scheme as scheme

__all__ = ["PAIR_LIMIT", "SaturationCheck", "reduction_rows", "worst_pairs", "check_weight", "pair_safe_scale",
           "layer_record", "saturating_dot"]

#: Largest |w_i + w_{i+1}| (int8 weights, same sign) that 255 x pair cannot push past int16.
PAIR_LIMIT = 32767 // 255  # 128


@dataclass(frozen=True)
class SaturationCheck:
    """One layer: the largest same-sign adjacent weight pair (quantized) and the channels that can overflow."""

    worst_pair: int
    channels: int
    overflowing_channels: int

    @property
    def can_overflow(self) -> bool:
        return self.overflowing_channels > 0


def reduction_rows(weight: np.ndarray, op: str, trans_b: bool = False) -> list[np.ndarray]:
    """The weight as [channels, K] in each reduction order ONNX Runtime's kernels may walk.

    Conv [C_out, C_in, kh, kw]: (C_in, kh, kw) and (kh, kw, C_in); MatMul [K, N]: K per column;
    Gemm: K per output (transB [N, K] or [K, N]).
    """
    if op == "Conv":
        c = weight.shape[0]
        nchw = weight.reshape(c, -1)
        nhwc = np.moveaxis(weight, 1, -1).reshape(c, -1) if weight.ndim > 2 else nchw
        return [nchw, nhwc]
    if op == "Gemm" and trans_b:
        return [weight]
    if weight.ndim == 1:  # MatMul with a vector [K]: one output, K summed
        return [weight.reshape(1, -1)]
    if weight.ndim != 2:
        return [np.moveaxis(weight, -2, -1).reshape(-1, weight.shape[-2])]
    return [weight.T]


def worst_pairs(rows: np.ndarray) -> np.ndarray:
    """Per channel, the largest |r_i + r_{i+1}| over the adjacent pairs (0,1), (2,3), ... along K."""
    channels, k = rows.shape
    if rows.size <= scheme.BLOCK_ELEMENTS:
        return _worst_pairs(rows)
    # by blocks of an even number of K (pairs never straddle two blocks): the float64 pair sums of a block, not of the
    # whole weight (twice its float32 size); a MatMul's rows are its weight transposed, so a block is a run of its rows
    step = max(2, scheme.BLOCK_ELEMENTS // max(1, channels) // 2 * 2)
    worst = _worst_pairs(rows[:, :step])
    for start in range(step, k, step):
        worst = np.maximum(worst, _worst_pairs(rows[:, start:start + step]))
    return worst


def _worst_pairs(rows: np.ndarray) -> np.ndarray:
    k = rows.shape[1]
    if k % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
    pairs = rows.reshape(rows.shape[0], -1, 2).astype(np.float64)
    return np.abs(pairs.sum(axis=2)).max(axis=1) if pairs.size else np.zeros(rows.shape[0])


def check_weight(quantized_rows: list[np.ndarray]) -> SaturationCheck:
    """The check on an int8 weight given in its reduction orders (see :func:`reduction_rows`)."""
    worst = np.max([worst_pairs(r) for r in quantized_rows], axis=0)
    return SaturationCheck(int(worst.max(initial=0)), int(worst.size), int((worst > PAIR_LIMIT).sum()))


def pair_safe_scale(rows: list[np.ndarray], scale: np.ndarray) -> np.ndarray:
    """Per-channel (or one, if ``scale`` is a scalar) weight scale, at least ``scale``, with which no adjacent
    pair of rounded weights can exceed :data:`PAIR_LIMIT` in any of the reduction orders ``rows``."""
    need = np.max([worst_pairs(r) for r in rows], axis=0) / 127.0  # |a + b| <= 127 -> |round(a) + round(b)| <= 128
    need = need.astype(np.float32)
    if np.ndim(scale) == 0:
        return np.maximum(np.asarray(scale, np.float32), need.max(initial=0.0)).astype(np.float32)
    return np.maximum(scale.astype(np.float32), need).astype(np.float32)


def layer_record(node: str, op: str, before: SaturationCheck, after: SaturationCheck, widened: float
                 ) -> dict[str, object] | None:
    """The report's entry for one layer (None when no pair could overflow, before or after a fix)."""
    if not (before.can_overflow or after.can_overflow):
        return None
    return {"node": node, "op": op, "worst_pair": before.worst_pair, "channels": before.channels,
            "overflowing_channels": before.overflowing_channels, "fixed": not after.can_overflow,
            "worst_pair_after": after.worst_pair, "max_scale_widening": round(widened, 4)}


def saturating_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u8 x s8 dot products as ``vpmaddubsw`` + ``vpmaddwd`` compute them: ``a`` [M, K] uint8, ``w`` [C, K] int8
    -> int32 [M, C], each adjacent pair of products saturated to int16 before the int32 sum."""
    k = a.shape[1]
    if k % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1), a.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((w.shape[0], 1), w.dtype)], axis=1)
    a2 = a.astype(np.int32).reshape(a.shape[0], 1, -1, 2)
    w2 = w.astype(np.int32).reshape(1, w.shape[0], -1, 2)
    pairs = np.clip((a2 * w2).sum(axis=3), -32768, 32767)
    return pairs.sum(axis=2, dtype=np.int64).astype(np.int32)
