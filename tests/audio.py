"""Speech-like test audio and a streaming runner for voice-activity models (no recorded audio is available offline).

The signal alternates voiced segments (a glottal-like harmonic series on a
wandering pitch, shaped by three moving formant resonances, with syllable-rate
amplitude modulation), unvoiced hiss (fricative-like high-passed noise),
background noise and silences, so a VAD sees both speech and non-speech.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["speech_like", "frames", "stream", "cosine", "SILERO_CHUNK", "SILERO_CONTEXT"]

#: Samples per chunk and of the context Silero VAD's wrapper prepends to each chunk, per sample rate
SILERO_CHUNK = {16000: 512, 8000: 256}
SILERO_CONTEXT = {16000: 64, 8000: 32}


def _formants(freqs: np.ndarray, centres: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Gain of a sum of resonances (one per formant, rows over time) at ``freqs`` [harmonics, time]."""
    gain = np.zeros_like(freqs)
    for c, w in zip(centres, widths):
        gain += 1.0 / (1.0 + ((freqs - c[None, :]) / w) ** 2)
    return gain


def speech_like(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """Mono float32 audio in [-1, 1]: voiced and unvoiced segments, noise and silences, at ``sr``."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    audio = 0.003 * rng.standard_normal(n)  # background noise floor
    pos = int(0.3 * sr)  # a lead-in of silence
    while pos < n:
        kind = rng.choice(["voiced", "unvoiced", "silence"], p=[0.55, 0.15, 0.3])
        length = min(int(rng.uniform(0.15, 0.9) * sr), n - pos)
        seg = slice(pos, pos + length)
        ts = t[seg] - t[pos]
        if kind == "voiced":
            f0 = rng.uniform(90, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * ts))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            harmonics = np.arange(1, int(0.45 * sr / f0.max()) + 1)
            centres = np.stack([np.full_like(ts, rng.uniform(300, 900)), np.full_like(ts, rng.uniform(900, 2300)),
                                np.full_like(ts, rng.uniform(2300, 3400))])
            centres *= 1 + 0.15 * np.sin(2 * np.pi * rng.uniform(2, 6) * ts)[None, :]  # moving formants
            gains = _formants(harmonics[:, None] * f0[None, :], centres, np.array([80.0, 120.0, 180.0]))
            voiced = (gains / harmonics[:, None] * np.sin(harmonics[:, None] * phase[None, :])).sum(axis=0)
            syllables = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 6) * ts)) ** 0.5
            audio[seg] += rng.uniform(0.1, 0.4) * syllables * voiced / max(np.abs(voiced).max(), 1e-9)
        elif kind == "unvoiced":
            hiss = np.diff(rng.standard_normal(length + 1))  # first difference: tilted towards high frequencies
            audio[seg] += rng.uniform(0.02, 0.08) * hiss * np.hanning(length)
        pos += length
    return np.clip(audio, -1, 1).astype(np.float32)


def frames(audio: np.ndarray, sr: int) -> np.ndarray:
    """The model inputs Silero VAD's wrapper builds, one row per chunk [chunks, context + chunk]: each chunk with
    the last ``context`` samples of the row before (zeros before the first)."""
    chunk, context = SILERO_CHUNK[sr], SILERO_CONTEXT[sr]
    count = len(audio) // chunk
    body = audio[: count * chunk].reshape(count, chunk)
    previous = np.concatenate([np.zeros((1, context), audio.dtype), body[:-1, -context:]], axis=0)
    return np.concatenate([previous, body], axis=1).astype(np.float32)


def stream(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], audio: np.ndarray, sr: int,
           names: Sequence[str] = ("input", "state", "sr"), on_feed: Callable[[dict[str, np.ndarray]], None] | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Run a Silero-style VAD chunk by chunk as its wrapper does (context prepended, state carried), feeding those
    of input/state/sr that the model has (``names``); returns the per-chunk outputs [chunks] and the states after
    each chunk [chunks, 2, 1, 128]. ``on_feed`` sees every feed (to save calibration data)."""
    state = np.zeros((2, 1, 128), np.float32)
    probs, states = [], []
    for row in frames(audio, sr):
        feed = {"input": row[None, :], "state": state, "sr": np.array(sr, np.int64)}
        feed = {k: v for k, v in feed.items() if k in names}
        if on_feed is not None:
            on_feed(feed)
        out, state = run(feed)[:2]
        probs.append(float(np.asarray(out).reshape(-1)[0]))
        states.append(state)
    return np.array(probs), np.stack(states)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened (float64)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
