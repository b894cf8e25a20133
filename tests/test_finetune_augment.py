"""Training-data augmentations: shapes and dtypes kept, exact against per-sample references, reproducible by seed."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import OnnxoptError
from onnxopt.augment import AugmentConfig, augment, parse_augment, shift

RNG = np.random.default_rng(0)
X = RNG.random((32, 2, 8, 8)).astype(np.float32)
LABELS = RNG.integers(0, 10, 32)


def _shift_reference(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """One image moved by (dy, dx), zeros coming in: by slicing, one sample at a time."""
    out = np.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        image[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def test_shift_matches_per_sample_reference() -> None:
    dy, dx = RNG.integers(-2, 3, size=(2, 32))
    got = shift(X, dy, dx, 2)
    for i in range(32):
        np.testing.assert_array_equal(got[i], _shift_reference(X[i], int(dy[i]), int(dx[i])))


@pytest.mark.parametrize("spec", ["flips", "shift=2", "noise=0.1", "mixup=0.4", "flips,shift,noise,mixup"])
def test_shapes_dtypes_and_inputs_untouched(spec: str) -> None:
    x, labels = X.copy(), LABELS.copy()
    out = augment({"x": x, "ids": np.arange(32)[:, None]} if "mixup" not in spec else {"x": x}, labels,
                  parse_augment(spec), np.random.default_rng(1))
    assert out.feed["x"].shape == X.shape and out.feed["x"].dtype == np.float32
    np.testing.assert_array_equal(x, X)  # the caller's arrays are not written to
    np.testing.assert_array_equal(labels, LABELS)
    assert not np.array_equal(out.feed["x"], X)
    if "ids" in out.feed:
        np.testing.assert_array_equal(out.feed["ids"], np.arange(32)[:, None])  # not an image: left alone


def test_same_seed_same_batch_and_other_seed_differs() -> None:
    config = parse_augment("flips,shift,noise,mixup")
    a = augment({"x": X}, LABELS, config, np.random.default_rng(7))
    b = augment({"x": X}, LABELS, config, np.random.default_rng(7))
    c = augment({"x": X}, LABELS, config, np.random.default_rng(8))
    np.testing.assert_array_equal(a.feed["x"], b.feed["x"])
    np.testing.assert_array_equal(a.labels_mixed, b.labels_mixed)
    assert not np.array_equal(a.feed["x"], c.feed["x"])


def test_flip_and_mixup_exact() -> None:
    flipped = augment({"x": X}, LABELS, AugmentConfig(flips=1.0), np.random.default_rng(0)).feed["x"]
    np.testing.assert_array_equal(flipped, X[..., ::-1])
    mixed = augment({"x": X}, LABELS, AugmentConfig(mixup=0.4), np.random.default_rng(0))
    lam, partner = mixed.lam, mixed.partner
    assert lam is not None and partner is not None and np.all((lam >= 0) & (lam <= 1))
    np.testing.assert_allclose(mixed.feed["x"], lam[:, None, None, None] * X + (1 - lam[:, None, None, None]) * X[partner], rtol=1e-6)
    np.testing.assert_array_equal(mixed.labels_mixed, LABELS[partner])


def test_noise_strength_is_a_share_of_the_std() -> None:
    big = RNG.random((64, 1, 32, 32)).astype(np.float32)
    noisy = augment({"x": big}, None, AugmentConfig(noise=0.2), np.random.default_rng(0)).feed["x"]
    delta = noisy - big
    assert abs(float(delta.mean())) < 0.01 * big.std()
    assert float(delta.std()) == pytest.approx(0.2 * float(big.std()), rel=0.02)


def test_two_image_inputs_get_the_same_views() -> None:
    out = augment({"a": X, "b": X.copy()}, LABELS, parse_augment("flips,shift=3,mixup"), np.random.default_rng(3))
    np.testing.assert_array_equal(out.feed["a"], out.feed["b"])


def test_parse_augment() -> None:
    assert parse_augment("flip,crop=2,gaussian=0.1,mixup=0.3") == AugmentConfig(flips=0.5, shift=2, noise=0.1, mixup=0.3)
    assert not parse_augment(None).enabled and not parse_augment("").enabled
    for bad in ("rotate", "shift=big", "flips=2"):
        with pytest.raises(OnnxoptError):
            parse_augment(bad)
    with pytest.raises(OnnxoptError, match="non-float"):
        augment({"x": X, "ids": np.arange(32)}, LABELS, AugmentConfig(mixup=0.2), np.random.default_rng(0))
