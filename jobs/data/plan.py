"""What every example will look like: the denoiser table, raw segment lengths, reserved token ids.

Gemma has no T5 sentinels, so sentinels and mode tokens are taken from the tokenizer's reserved
`<unusedN>` tokens, in order: first the mode tokens that are used, then as many sentinels as the
longest span layout needs. The choice is recorded in the prepared data's metadata.json.
"""

import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np

from jobs.data.config import MODE_TOKENS, DataConfig
from jobs.data.spans import span_counts
from jobs.core.errors import UserError

_RESERVED = re.compile(r"^<unused(\d+)>$")


@dataclass(frozen=True)
class Denoiser:
    name: str  # R | X | S
    mean_span: Optional[float]  # R/X only
    rate: Optional[float]  # R/X only
    mode_token: Optional[str]  # "[NLU]" etc., None when mode tokens are off
    weight: float
    raw_length: int  # corpus tokens consumed per example
    prefix_split: Optional[float] = None  # S only: encoder fraction, -1 = random


@dataclass(frozen=True)
class ExamplePlan:
    denoisers: List[Denoiser]
    mode_token_ids: Dict[str, int]  # "[NLU]" -> reserved id
    sentinel_ids: List[int]  # in order of use within an example
    bos_id: int
    eos_id: int
    pad_id: int
    encoder_length: int
    decoder_length: int

    def table(self) -> List[dict]:
        """The denoiser table as metadata.json records it."""
        return [{k: v for k, v in asdict(d).items()} for d in self.denoisers]


def raw_length_for_spans(rate: float, mean_span: float, encoder_budget: int, decoder_budget: int) -> int:
    """Longest segment whose corrupted inputs and targets fit the budgets (EOS not counted here)."""
    best = 0
    for n in range(2, encoder_budget + decoder_budget + 1):
        noise, spans = span_counts(n, rate, mean_span)
        if n - noise + spans <= encoder_budget and noise + spans <= decoder_budget:
            best = n
    if best < 2:
        raise UserError(f"data.encoder_length/decoder_length leave no room for a R/X({mean_span:g}, {rate:g}) example")
    return best


def raw_length_for_prefix(split: float, encoder_budget: int, decoder_budget: int) -> int:
    """Longest segment a PrefixLM split fits: fixed fraction, or (split = -1) any split in a feasible range."""
    if split < 0:
        return max(encoder_budget, decoder_budget)  # splits are drawn in [n - decoder_budget, encoder_budget]
    n = encoder_budget + decoder_budget
    while n > 2 and (round(n * split) > encoder_budget or n - round(n * split) > decoder_budget):
        n -= 1
    return n


def make_plan(cfg: DataConfig, tokenizer) -> ExamplePlan:
    """Resolve the config against a tokenizer into the concrete plan every worker follows."""
    configs = cfg.denoisers if cfg.objective == "ul2" else []
    use_mode = cfg.mode_tokens
    # Budgets after the special tokens: EOS ends inputs and targets; a mode token opens the inputs.
    encoder_budget = cfg.encoder_length - 1 - (1 if use_mode else 0)
    decoder_budget = cfg.decoder_length - 1
    denoisers = []
    for d in configs:
        mode = MODE_TOKENS[d.name] if use_mode else None
        if d.name == "S":
            n = raw_length_for_prefix(-1.0, encoder_budget, decoder_budget)
            denoisers.append(Denoiser("S", None, None, mode, d.weight, n, prefix_split=-1.0))
        else:
            n = raw_length_for_spans(d.rate, d.mean_span, encoder_budget, decoder_budget)
            denoisers.append(Denoiser(d.name, d.mean_span, d.rate, mode, d.weight, n))
    if cfg.objective == "prefix_lm":
        n = raw_length_for_prefix(cfg.prefix_lm_split, encoder_budget, decoder_budget)
        denoisers.append(Denoiser("S", None, None, MODE_TOKENS["S"] if use_mode else None, 1.0, n,
                                  prefix_split=cfg.prefix_lm_split))
    modes = sorted({d.mode_token for d in denoisers if d.mode_token}, key=list(MODE_TOKENS.values()).index)
    max_spans = max([span_counts(d.raw_length, d.rate, d.mean_span)[1] for d in denoisers if d.rate] or [0])
    reserved = reserved_token_ids(tokenizer)
    if len(reserved) < len(modes) + max_spans:
        raise UserError(f"the tokenizer has {len(reserved)} reserved <unusedN> tokens but this plan needs "
                        f"{len(modes)} mode tokens + {max_spans} sentinels: shorten data.encoder_length / "
                        "data.decoder_length, raise the denoisers' mean_span, or set data.mode_tokens=false")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key) is None:
            raise UserError(f"the tokenizer has no {key.replace('_id', '')}: t5adapt needs bos, eos and pad tokens")
    return ExamplePlan(
        denoisers=denoisers,
        mode_token_ids={m: reserved[i] for i, m in enumerate(modes)},
        sentinel_ids=reserved[len(modes):len(modes) + max_spans],
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length,
    )


def denoising_tokens(plan: ExamplePlan, tokenizer) -> dict:
    """The reserved-token choice as prepared data and exported tokenizers record it."""
    return {
        "sentinel_ids": plan.sentinel_ids,
        "sentinel_tokens": tokenizer.convert_ids_to_tokens(plan.sentinel_ids),
        "mode_tokens": plan.mode_token_ids,
        "denoisers": plan.table(),
    }


def reserved_token_ids(tokenizer) -> List[int]:
    """Ids of the tokenizer's `<unusedN>` tokens, ordered by N."""
    found = []
    for token, token_id in tokenizer.get_vocab().items():
        match = _RESERVED.match(token)
        if match:
            found.append((int(match[1]), token_id))
    return [token_id for _, token_id in sorted(found)]


def choose_denoisers(plan: ExamplePlan, seed: int, index: np.ndarray) -> np.ndarray:
    """The denoiser (index into plan.denoisers) of each example: a pure function of (seed, index)."""
    from jobs.data import randomness

    weights = np.array([d.weight for d in plan.denoisers], dtype=np.float64)
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    return np.searchsorted(cumulative, randomness.uniform(seed, index, randomness.DENOISER), side="right")
