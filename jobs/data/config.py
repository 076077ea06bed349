"""Configuration of the prepare stage (raw text -> UL2 / PrefixLM training examples)."""

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

FORMATS = ("auto", "jsonl", "parquet", "text")
OBJECTIVES = ("ul2", "prefix_lm")
# UL2's mode tokens, one per denoiser family.
MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclass
class CorpusConfig:
    # A file, a glob, a directory, an s3:// prefix, or builtin:python-docs (English text shipped with CPython).
    # Files ending in .gz, .zst or .zstd are decompressed as they are read.
    path: str = MISSING
    # auto picks by extension, looking through .gz/.zst/.zstd: .jsonl/.json/.ndjson, .parquet, anything
    # else is plain text
    format: str = "auto"
    text_field: str = "text"  # the JSON Lines field or Parquet column holding the text
    weight: float = 1.0  # this source's share of the examples (a source is cycled to fill its share)


@dataclass
class DenoiserConfig:
    name: str = MISSING  # R (regular spans), X (extreme), S (sequential: prefix LM)
    mean_span: float = 3.0  # R/X: mean corrupted span length in tokens
    rate: float = 0.15  # R/X: fraction of tokens corrupted
    weight: float = 1.0  # how often this denoiser is chosen, relative to the others


def ul2_denoisers() -> List[DenoiserConfig]:
    """The UL2 paper's mixture (as used by T5Gemma): R(3, .15), R(8, .15), X(3, .5), X(8, .5), X(64, .15), X(64, .5), S."""
    spans = [("R", 3, 0.15), ("R", 8, 0.15), ("X", 3, 0.5), ("X", 8, 0.5), ("X", 64, 0.15), ("X", 64, 0.5)]
    return [DenoiserConfig(name, float(mean), rate) for name, mean, rate in spans] + [DenoiserConfig("S")]


@dataclass
class DataConfig:
    corpus: List[CorpusConfig] = field(default_factory=lambda: [CorpusConfig(path="builtin:python-docs")])
    tokenizer: Optional[str] = None  # where the tokenizer comes from; default: adapt.source
    objective: str = "ul2"  # ul2 (the denoiser mixture below) | prefix_lm (one S denoiser)
    denoisers: List[DenoiserConfig] = field(default_factory=ul2_denoisers)
    mode_tokens: bool = True  # prepend [NLU]/[NLG]/[S2S] (reserved tokens) to the encoder input
    # prefix_lm: fraction of each example that goes to the encoder; -1 draws it uniformly per example.
    prefix_lm_split: float = 0.5
    encoder_length: int = 512  # encoder tokens per example, special tokens included
    decoder_length: int = 256  # decoder target tokens per example, EOS included
    seed: int = 0
    num_tokenizer_workers: int = 1  # Ray actors that tokenize (each loads the tokenizer once)
    documents_per_piece: int = 2000  # documents packed together: the unit of parallel work, one Parquet file
    # Share of documents held out of training (chosen per document from data.seed and its place in the
    # corpus), written to heldout/ for evaluation; 0 holds none out.
    heldout_fraction: float = 0.05
    heldout_max_tokens: int = 200000  # at most this many held-out tokens are written; the rest are dropped

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"data.objective={self.objective!r} is not supported: use one of {', '.join(OBJECTIVES)}")
        if not self.corpus:
            raise ValueError("data.corpus is empty: list at least one source (e.g. - path: data/*.jsonl)")
        for i, source in enumerate(self.corpus):
            if source.format not in FORMATS:
                raise ValueError(f"data.corpus[{i}].format={source.format!r} is not one of {', '.join(FORMATS)}")
            if source.weight <= 0:
                raise ValueError(f"data.corpus[{i}].weight={source.weight} must be > 0")
        if self.objective == "ul2":
            if not self.denoisers:
                raise ValueError("data.denoisers is empty: the ul2 objective needs at least one denoiser")
            for i, d in enumerate(self.denoisers):
                if d.name not in MODE_TOKENS:
                    raise ValueError(f"data.denoisers[{i}].name={d.name!r} must be R, X or S")
                if d.name != "S" and not (0 < d.rate < 1 and d.mean_span >= 1):
                    raise ValueError(f"data.denoisers[{i}] needs 0 < rate < 1 and mean_span >= 1 "
                                     f"(got rate={d.rate}, mean_span={d.mean_span})")
                if d.weight <= 0:
                    raise ValueError(f"data.denoisers[{i}].weight={d.weight} must be > 0")
        if not (self.prefix_lm_split == -1 or 0 < self.prefix_lm_split < 1):
            raise ValueError(f"data.prefix_lm_split={self.prefix_lm_split} must be in (0, 1), or -1 for a random split")
        if self.encoder_length < 8 or self.decoder_length < 4:
            raise ValueError(f"data.encoder_length={self.encoder_length} and data.decoder_length={self.decoder_length} "
                             "are too short to hold an example (need at least 8 and 4)")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed} must be >= 0 (examples are drawn from generators seeded by it)")
        for key in ("num_tokenizer_workers", "documents_per_piece", "heldout_max_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}={getattr(self, key)} must be at least 1")
        if not 0 <= self.heldout_fraction <= 0.5:
            raise ValueError(f"data.heldout_fraction={self.heldout_fraction} must be between 0 (hold nothing out) "
                             "and 0.5")
