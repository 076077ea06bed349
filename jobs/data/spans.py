"""UL2 / T5 span corruption of packed token segments, a batch at a time.

Span layout follows T5's `random_spans_noise_mask`: noise tokens = round(length * rate) (at least 1,
at most length - 1), spans = round(noise / mean span) (at least 1, at most the non-noise count),
noise and non-noise lengths each a uniformly random composition into that many positive parts,
interleaved non-noise first. Each noise span becomes one sentinel in the inputs; the targets are
sentinel + the span's tokens, span after span.

A uniformly random composition of `total` into `parts` = choosing parts - 1 of the total - 1 gaps
uniformly; we choose the gaps with the smallest counter-based keys (jobs/data/randomness.py), so
each example is a pure function of (seed, example index) and a batch is a handful of numpy calls.
"""

from typing import Tuple

import numpy as np

from jobs.data import randomness


def span_counts(length: int, rate: float, mean_span: float) -> Tuple[int, int]:
    """(noise tokens, noise spans) for a segment of `length` tokens, as T5 computes them."""
    num_noise = min(max(int(round(length * rate)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return num_noise, min(num_spans, length - num_noise)


def random_compositions(total: int, parts: int, gap_keys: np.ndarray) -> np.ndarray:
    """(batch, parts) positive lengths summing to `total`; gap_keys: (batch, total - 1) uint64."""
    batch = gap_keys.shape[0]
    if parts == 1:
        return np.full((batch, 1), total, dtype=np.int64)
    if parts - 1 < total - 1:
        chosen = np.argpartition(gap_keys, parts - 2, axis=1)[:, :parts - 1]
    else:
        chosen = np.broadcast_to(np.arange(total - 1), (batch, total - 1))
    boundaries = np.sort(chosen, axis=1) + 1
    edges = np.concatenate([np.zeros((batch, 1), np.int64), boundaries, np.full((batch, 1), total, np.int64)], axis=1)
    return np.diff(edges, axis=1)


def corrupt_batch(tokens: np.ndarray, rate: float, mean_span: float, sentinels: np.ndarray,
                  seed: int, index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Span-corrupt `tokens` (batch, length) for examples `index`; returns (inputs, targets).

    inputs  (batch, length - noise + spans) = keep_0 s_0 keep_1 s_1 ... keep_{k-1} s_{k-1}
    targets (batch, noise + spans)          = s_0 noise_0 s_1 noise_1 ... s_{k-1} noise_{k-1}
    Every row has the same counts because they depend only on the length.
    """
    batch, length = tokens.shape
    num_noise, k = span_counts(length, rate, mean_span)
    if k > len(sentinels):
        raise ValueError(f"{k} noise spans need {k} sentinel tokens but only {len(sentinels)} are reserved")
    noise = random_compositions(num_noise, k, randomness.keys(seed, index, randomness.NOISE_CUTS, num_noise - 1))
    keep = random_compositions(length - num_noise, k, randomness.keys(seed, index, randomness.KEEP_CUTS, length - num_noise - 1))
    # Span boundaries in the interleaved (keep, noise, keep, noise, ...) layout; a token is noise when
    # an odd number of boundaries lie at or before it.
    span_ends = np.cumsum(np.stack([keep, noise], axis=2).reshape(batch, 2 * k), axis=1)[:, :-1]
    boundary = np.zeros((batch, length), dtype=np.int8)
    np.put_along_axis(boundary, span_ends, 1, axis=1)
    is_noise = (np.cumsum(boundary, axis=1) % 2).astype(bool)
    spans = np.arange(k)
    # Sentinel i follows keep_0..keep_i and sentinels 0..i-1 in the inputs, and noise_0..noise_{i-1}
    # and sentinels 0..i-1 in the targets.
    input_sentinel_at = np.cumsum(keep, axis=1) + spans
    target_sentinel_at = np.cumsum(noise, axis=1) - noise + spans
    inputs = _interleave(tokens[~is_noise].reshape(batch, length - num_noise), input_sentinel_at, sentinels[:k])
    targets = _interleave(tokens[is_noise].reshape(batch, num_noise), target_sentinel_at, sentinels[:k])
    return inputs, targets


def _interleave(values: np.ndarray, sentinel_at: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Rows of `values` with `sentinels` inserted so that sentinel j lands at column sentinel_at[:, j]."""
    batch, width = values.shape[0], values.shape[1] + sentinel_at.shape[1]
    out = np.empty((batch, width), dtype=np.int32)
    is_value = np.ones((batch, width), dtype=bool)
    np.put_along_axis(is_value, sentinel_at, False, axis=1)
    out[is_value] = values.reshape(-1)
    np.put_along_axis(out, sentinel_at, np.broadcast_to(sentinels, sentinel_at.shape).astype(np.int32), axis=1)
    return out
