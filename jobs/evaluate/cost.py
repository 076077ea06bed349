"""Inference cost, measured the same way for the encoder-decoder and its decoder-only source.

One workload for both: a batch of 1, `input_tokens` real held-out tokens in (the encoder's input,
or the source's prompt), exactly `output_tokens` out, greedy. Each timing is the median of
`repeats` runs after one untimed warm-up, with torch's threads as the process has them.
  input tokens/s      encoder forward (model) or prompt prefill with its cache (source)
  ms per output token incremental decoding with the KV cache: the median time between consecutive
                      tokens inside `generate` (a logits processor stamps each one), all steps of
                      all repeats; the same generate loop for both, so both pay the same overhead
  generate_s          end-to-end `generate` with min_new_tokens = max_new_tokens = N
"""

import itertools
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from jobs.core.errors import UserError


def cost_input(documents: List[np.ndarray], input_tokens: int) -> torch.Tensor:
    """[1, input_tokens] int64: the held-out documents as one stream, repeated if too short."""
    stream = np.concatenate(documents) if documents else np.zeros(0, np.int64)
    if not len(stream):
        raise UserError("the held-out split has no documents to measure inference cost on: prepare the data "
                        "with data.heldout_fraction > 0, or set evaluate.enabled=false")
    return torch.from_numpy(np.resize(stream, input_tokens).astype(np.int64))[None]


def parameter_counts(model) -> Dict[str, int]:
    """Unique parameters (tensors sharing storage count once) of an encoder-decoder. encoder and
    decoder (with the LM head) each include the embedding they use; `shared` is what both use
    (T5Gemma 2's one embedding), counted once in `total`; `other` is anything in neither (0)."""
    encoder = _unique(model.get_encoder().parameters())
    decoder = _unique(itertools.chain(model.get_decoder().parameters(), model.get_output_embeddings().parameters()))
    shared = sum(encoder[k] for k in set(encoder) & set(decoder))
    total = sum(_unique(model.parameters()).values())
    counts = {"encoder": sum(encoder.values()), "decoder": sum(decoder.values()), "shared": shared, "total": total}
    counts["other"] = total - (counts["encoder"] + counts["decoder"] - shared)
    return counts


def source_parameter_counts(model) -> Dict[str, int]:
    """Unique parameters of a decoder-only model; `embedding` is counted once in total even when the
    LM head is tied to it."""
    return {"embedding": model.get_input_embeddings().weight.numel(), "total": sum(_unique(model.parameters()).values())}


@torch.no_grad()
def seq2seq_cost(model, input_ids: torch.Tensor, output_tokens: int, repeats: int) -> dict:
    mask = torch.ones_like(input_ids)
    encoder_s = _median(lambda: model.get_encoder()(input_ids=input_ids, attention_mask=mask), repeats)
    decode = _decoding(model, {"input_ids": input_ids, "attention_mask": mask}, output_tokens, repeats,
                       lambda out: out.shape[1] - 1)  # the decoder start token comes first
    return {"encoder_tokens_per_s": input_ids.shape[1] / encoder_s, "encoder_s": encoder_s, **decode}


@torch.no_grad()
def causal_cost(model, input_ids: torch.Tensor, output_tokens: int, repeats: int) -> dict:
    mask = torch.ones_like(input_ids)
    # A prefill fills the KV cache and needs only the last position's logits.
    prefill_s = _median(lambda: model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1),
                        repeats)
    decode = _decoding(model, {"input_ids": input_ids, "attention_mask": mask}, output_tokens, repeats,
                       lambda out: out.shape[1] - input_ids.shape[1])
    return {"prefill_tokens_per_s": input_ids.shape[1] / prefill_s, "prefill_s": prefill_s, **decode}


def _decoding(model, inputs: dict, output_tokens: int, repeats: int, new_tokens: Callable) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Called once per generated token, between its forward pass and its choice."""

        def __init__(self):
            self.stamps: List[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    clocks: List[StepClock] = []

    def generate():
        clocks.append(StepClock())
        out = model.generate(**inputs, max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                             num_beams=1, use_cache=True, logits_processor=LogitsProcessorList([clocks[-1]]),
                             pad_token_id=model.config.get_text_config(decoder=True).pad_token_id)
        if new_tokens(out) != output_tokens:
            raise RuntimeError(f"generate made {new_tokens(out)} tokens, not {output_tokens}: the workload is not fixed")

    generate_s = _median(generate, repeats)
    steps = [b - a for clock in clocks[1:] for a, b in zip(clock.stamps, clock.stamps[1:])]  # clocks[0]: warm-up
    return {"decoder_ms_per_token": statistics.median(steps) * 1e3, "generate_s": generate_s}


def _median(run: Callable, repeats: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _unique(parameters) -> Dict[int, int]:
    """{storage address: numel}: tied or aliased tensors once."""
    return {p.data_ptr(): p.numel() for p in parameters}
