"""Configuration of the adapt stage (decoder-only checkpoint(s) -> encoder-decoder checkpoint).

Kept free of torch/transformers imports so config validation stays instant.
"""

import re
from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

DTYPES = ("float32", "bfloat16", "float16")
_LAYER_SPEC = re.compile(r"^(all|every:[1-9]\d*|first:[1-9]\d*|last:[1-9]\d*|\d+(,\d+)*)$")


@dataclass
class AdaptConfig:
    # Where the decoder-only model comes from: a local Hugging Face directory, an s3:// prefix,
    # a .gguf file, or a builtin name (builtin:gemma3-270m, builtin:tiny-gemma3, ...).
    source: str = MISSING
    # Gemma 2 only: a second source for the decoder (an unbalanced pair, e.g. 9B encoder + 2B decoder).
    decoder_source: Optional[str] = None
    # Which source layers each stack takes: all | every:N | first:N | last:N | 0,2,4 (indices).
    encoder_layers: str = "all"
    decoder_layers: str = "all"
    # How much the encoder contributes to the decoder at step 0. 1.0 is the paper's initialisation.
    # Below 1.0 the untrained model stays close to the source decoder-only model (see README).
    encoder_scale: float = 1.0
    # Unbalanced pairs start with random cross-attention; training warms it up alone this many steps.
    cross_attn_warmup_steps: int = 1000
    dtype: str = "float32"
    max_shard_mb: int = 2048
    seed: int = 0

    def __post_init__(self):
        for key in ("encoder_layers", "decoder_layers"):
            spec = getattr(self, key)
            if not _LAYER_SPEC.match(spec.replace(" ", "")):
                raise ValueError(
                    f"adapt.{key}={spec!r} is not a layer selection: use all, every:N, first:N, "
                    "last:N or comma-separated source layer indices such as 0,2,4"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"adapt.dtype={self.dtype!r} is not supported: use one of {', '.join(DTYPES)}")
        if not 0.0 <= self.encoder_scale <= 1.0:
            raise ValueError(f"adapt.encoder_scale={self.encoder_scale} must be in [0, 1] (1.0 = paper init)")
        if self.max_shard_mb < 1:
            raise ValueError(f"adapt.max_shard_mb={self.max_shard_mb} must be at least 1")
        if self.seed < 0:
            raise ValueError(f"adapt.seed={self.seed} must be >= 0")
        if self.cross_attn_warmup_steps < 0:
            raise ValueError(f"adapt.cross_attn_warmup_steps={self.cross_attn_warmup_steps} must be >= 0")


def select_layers(spec: str, num_source_layers: int, key: str) -> List[int]:
    """Source layer indices picked by a layer spec (see AdaptConfig), in order.

    Raises ValueError naming `key` when the spec asks for layers the source does not have.
    """
    spec = spec.replace(" ", "")
    n = num_source_layers
    if spec == "all":
        return list(range(n))
    kind, _, arg = spec.partition(":")
    if kind == "every":
        return list(range(0, n, int(arg)))
    if kind in ("first", "last"):
        count = int(arg)
        if count > n:
            raise ValueError(f"{key}={spec!r} asks for {count} layers but the source has {n}")
        return list(range(count)) if kind == "first" else list(range(n - count, n))
    indices = [int(i) for i in spec.split(",")]
    bad = [i for i in indices if i >= n]
    if bad:
        raise ValueError(f"{key}={spec!r} names layer(s) {bad} but the source has layers 0..{n - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{key}={spec!r} repeats a layer index")
    return indices
