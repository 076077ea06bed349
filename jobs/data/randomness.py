"""Counter-based randomness: every random number is a hash of (seed, example index, stream, position).

An example is then a pure function of (seed, example index): no generator state to carry, the same
numbers whether examples are made one at a time or a thousand at once, on any worker, in any order,
and after a resume. The hash is SplitMix64's finaliser, vectorised in numpy (uint64 arithmetic wraps).
"""

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Streams: independent families of numbers per example.
DENOISER, NOISE_CUTS, KEEP_CUTS, PREFIX_SPLIT = 1, 2, 3, 4
# Per corpus document rather than per example: whether it is held out of training (jobs/data/corpus.py).
HELDOUT = 5


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def keys(seed: int, index: np.ndarray, stream: int, width: int) -> np.ndarray:
    """uint64 random keys of shape (len(index), width) for examples `index` in `stream`."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed) * _GOLDEN + np.asarray(index, dtype=np.uint64)[:, None])
        base = _mix(base ^ (np.uint64(stream) * _MIX1))
        return _mix(base + (np.arange(width, dtype=np.uint64)[None, :] + np.uint64(1)) * _GOLDEN)


def uniform(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
    """One float in [0, 1) per example (53 random bits)."""
    return (keys(seed, index, stream, 1)[:, 0] >> np.uint64(11)).astype(np.float64) / float(1 << 53)
