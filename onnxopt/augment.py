"""Data augmentation for training batches: flips, shifts (pad-and-crop), Gaussian noise, mixup.

All of it is vectorized numpy over the batch and driven by one seeded
``numpy.random.Generator``, so a seed reproduces a run exactly. Images are
float inputs of rank >= 3 laid out ``[N, ..., H, W]`` (NCHW): flips mirror the
last axis, shifts move along the last two. Per-sample choices (flip or not,
offsets, mixing weights, partners) are drawn once per batch and applied to
every image input alike, so a multi-input model sees consistent views.

Spelled on the command line as ``flips,shift,noise,mixup``, each optionally
with its strength: ``shift=2`` (pixels), ``noise=0.05`` (share of the batch's
standard deviation), ``mixup=0.2`` (the Beta distribution's alpha).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import numpy as np

from onnxopt.errors import OnnxoptError

__all__ = ["AugmentConfig", "AugmentedBatch", "parse_augment", "augment", "flip", "shift", "add_noise", "mixup"]


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and how strong they are (0 or False: off)."""

    flips: float = 0.0
    """Probability that a sample is mirrored left-right."""
    shift: int = 0
    """Largest shift in pixels along each image axis (zero padding, then a crop back to size)."""
    noise: float = 0.0
    """Standard deviation of additive Gaussian noise, as a share of the batch's standard deviation."""
    mixup: float = 0.0
    """Alpha of the Beta(alpha, alpha) distribution of mixup weights."""

    @property
    def enabled(self) -> bool:
        return bool(self.flips or self.shift or self.noise or self.mixup)


#: Strength used when a name is given without a value.
DEFAULTS = {"flips": 0.5, "shift": 1, "noise": 0.05, "mixup": 0.2}
ALIASES = {"flip": "flips", "hflip": "flips", "shifts": "shift", "crop": "shift", "crops": "shift", "gaussian": "noise"}


def parse_augment(items: str | Iterable[str] | None) -> AugmentConfig:
    """``"flips,shift=2,noise,mixup=0.4"`` (or its items) as a config; unknown names are a one-line error."""
    if items is None:
        return AugmentConfig()
    parts = [p.strip() for p in (items.split(",") if isinstance(items, str) else items) if p.strip()]
    values: dict[str, float | int] = {}
    kinds = {f.name: f.type for f in fields(AugmentConfig)}
    for part in parts:
        key, sep, text = part.partition("=")
        key = ALIASES.get(key.strip().lower(), key.strip().lower())
        if key not in DEFAULTS:
            raise OnnxoptError(f"unknown augmentation {part!r}", f"choose among {', '.join(DEFAULTS)} (e.g. shift=2,noise=0.05)")
        try:
            value = float(text) if sep else DEFAULTS[key]
        except ValueError:
            raise OnnxoptError(f"augmentation {part!r} has a value that is not a number", "e.g. shift=2 or noise=0.05") from None
        if value < 0 or (key == "flips" and value > 1):
            raise OnnxoptError(f"augmentation {part!r} is out of range", "flips is a probability in [0, 1]; the others are >= 0")
        values[key] = int(value) if kinds[key] in (int, "int") else value
    return AugmentConfig(**values)  # type: ignore[arg-type]


def _images(batch: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in batch.items() if v.ndim >= 3 and np.issubdtype(v.dtype, np.floating)]


def flip(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x`` with the samples where ``mask`` is True mirrored along the last axis."""
    where = mask.reshape(-1, *([1] * (x.ndim - 1)))
    return np.where(where, x[..., ::-1], x)


def shift(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, limit: int) -> np.ndarray:
    """Each sample moved by (dy, dx) pixels within ``[-limit, limit]`` along the last two axes, zeros filling in."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    flat = x.reshape(n, -1, h, w)
    padded = np.pad(flat, ((0, 0), (0, 0), (limit, limit), (limit, limit)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))  # [N, M, 2L+1, 2L+1, H, W]
    # window (limit - dy, limit - dx) holds the sample moved by (dy, dx)
    crops = windows[np.arange(n), :, limit - dy, limit - dx]  # advanced indices first: [N, M, H, W]
    return np.ascontiguousarray(crops.reshape(x.shape))


def add_noise(x: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """``x`` plus Gaussian noise of standard deviation ``share`` times the batch's."""
    scale = share * float(x.std())
    return (x + rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype) * scale).astype(x.dtype)


def mixup(x: np.ndarray, partner: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Per-sample convex mix ``lam * x + (1 - lam) * x[partner]``."""
    weight = lam.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
    return weight * x + (1 - weight) * x[partner]


@dataclass(frozen=True)
class AugmentedBatch:
    """A batch after augmentation.

    With mixup, sample i is ``lam[i]`` of itself and ``1 - lam[i]`` of sample
    ``partner[i]``, so its hard-label loss is ``lam * loss(labels) + (1 - lam) * loss(labels_mixed)``.
    """

    feed: dict[str, np.ndarray]
    labels: np.ndarray | None
    labels_mixed: np.ndarray | None = None
    lam: np.ndarray | None = None
    partner: np.ndarray | None = None


def augment(batch: Mapping[str, np.ndarray], labels: np.ndarray | None, config: AugmentConfig,
            rng: np.random.Generator) -> AugmentedBatch:
    """Apply the configured augmentations to one batch (inputs by name, stacked on axis 0); inputs are not modified."""
    feed = dict(batch)
    if not config.enabled or not feed:
        return AugmentedBatch(feed, labels)
    images = _images(feed)
    n = next(iter(feed.values())).shape[0]
    if config.flips:
        mask = rng.random(n) < config.flips
        for k in images:
            feed[k] = flip(feed[k], mask)
    if config.shift:
        dy, dx = rng.integers(-config.shift, config.shift + 1, size=(2, n))
        for k in images:
            limit = min(config.shift, feed[k].shape[-2] - 1, feed[k].shape[-1] - 1)
            feed[k] = shift(feed[k], np.clip(dy, -limit, limit), np.clip(dx, -limit, limit), limit)
    if config.noise:
        for k in images:
            feed[k] = add_noise(feed[k], rng, config.noise)
    if not config.mixup:
        return AugmentedBatch(feed, labels)
    not_float = [k for k, v in feed.items() if not np.issubdtype(v.dtype, np.floating)]
    if not_float:
        raise OnnxoptError(f"mixup cannot blend non-float inputs {not_float}", "drop mixup from --augment for this model")
    lam = rng.beta(config.mixup, config.mixup, size=n).astype(np.float32)
    partner = rng.permutation(n)
    feed = {k: mixup(v, partner, lam) for k, v in feed.items()}
    return AugmentedBatch(feed, labels, None if labels is None else labels[partner], lam, partner)
