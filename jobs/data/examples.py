"""From a packed token stream to training examples.

A piece's tokens (its documents, each followed by EOS) are cut into consecutive segments, example by
example; example i (a global index) takes the raw length of its denoiser, chosen from (seed, i).
So the driver can assign each piece its range of global indices from token counts alone, and each
worker builds its piece's examples independently: example i is a pure function of (seed, i) and the
corpus.

Each example: input_ids = [mode] encoder-side tokens EOS, labels = decoder targets EOS,
decoder_input_ids = [BOS] labels[:-1], denoiser = index into the denoiser table. Unpadded.
"""

from typing import Dict, List

import numpy as np

from jobs.data.plan import ExamplePlan, choose_denoisers
from jobs.data.spans import corrupt_batch

_CHUNK = 4096


def count_examples(num_tokens: int, start: int, plan: ExamplePlan, seed: int) -> int:
    """How many whole examples a piece of `num_tokens` yields when its first example is `start`."""
    raw = np.array([d.raw_length for d in plan.denoisers])
    count, used = 0, 0
    while True:
        index = np.arange(start + count, start + count + _CHUNK, dtype=np.uint64)
        consumed = used + np.cumsum(raw[choose_denoisers(plan, seed, index)])
        fits = int(np.searchsorted(consumed, num_tokens, side="right"))
        count += fits
        if fits < _CHUNK:
            return count
        used = int(consumed[-1])


def build_examples(tokens: np.ndarray, start: int, count: int, plan: ExamplePlan, seed: int) -> Dict[str, List]:
    """Examples start .. start + count - 1 from a piece's tokens, as columns (lists, in index order)."""
    index = np.arange(start, start + count, dtype=np.uint64)
    which = choose_denoisers(plan, seed, index)
    raw = np.array([d.raw_length for d in plan.denoisers])[which]
    offsets = np.concatenate([[0], np.cumsum(raw)[:-1]]).astype(np.int64)
    inputs: List = [None] * count
    targets: List = [None] * count
    sentinels = np.asarray(plan.sentinel_ids, dtype=np.int32)
    for d, denoiser in enumerate(plan.denoisers):
        rows = np.flatnonzero(which == d)
        if not len(rows):
            continue
        segments = tokens[offsets[rows, None] + np.arange(denoiser.raw_length)]
        if denoiser.rate is not None:
            group_inputs, group_targets = corrupt_batch(segments, denoiser.rate, denoiser.mean_span, sentinels, seed, index[rows])
            for row, x, y in zip(rows, group_inputs, group_targets):
                inputs[row], targets[row] = x, y
        else:
            splits = _prefix_splits(denoiser, plan, seed, index[rows])
            for row, segment, split in zip(rows, segments, splits):
                inputs[row], targets[row] = segment[:split], segment[split:]
    mode_ids = [plan.mode_token_ids.get(plan.denoisers[d].mode_token) for d in which]
    columns = {"example_index": index.astype(np.int64).tolist(), "input_ids": [], "decoder_input_ids": [],
               "labels": [], "denoiser": which.astype(np.int32).tolist()}
    eos = np.array([plan.eos_id], dtype=np.int32)
    for x, y, mode in zip(inputs, targets, mode_ids):
        head = np.array([mode], dtype=np.int32) if mode is not None else np.empty(0, np.int32)
        encoder = np.concatenate([head, x, eos])
        labels = np.concatenate([y, eos])
        columns["input_ids"].append(encoder)
        columns["labels"].append(labels)
        columns["decoder_input_ids"].append(np.concatenate([[plan.bos_id], labels[:-1]]).astype(np.int32))
    return columns


def examples_table(columns: Dict[str, list]):
    """build_examples' columns as the Arrow table every examples file holds, training or held out:
    example_index int64, input_ids / decoder_input_ids / labels list<int32> (unpadded), denoiser int32."""
    import pyarrow as pa

    return pa.table({
        "example_index": pa.array(columns["example_index"], pa.int64()),
        "input_ids": pa.array(columns["input_ids"], pa.list_(pa.int32())),
        "decoder_input_ids": pa.array(columns["decoder_input_ids"], pa.list_(pa.int32())),
        "labels": pa.array(columns["labels"], pa.list_(pa.int32())),
        "denoiser": pa.array(columns["denoiser"], pa.int32()),
    })


def _prefix_splits(denoiser, plan: ExamplePlan, seed: int, index: np.ndarray) -> np.ndarray:
    """Encoder share of each S example: fixed, or uniform over the splits that fit both budgets."""
    from jobs.data import randomness

    n = denoiser.raw_length
    encoder_budget = plan.encoder_length - 1 - (1 if denoiser.mode_token else 0)
    decoder_budget = plan.decoder_length - 1
    if denoiser.prefix_split >= 0:
        return np.full(len(index), int(round(n * denoiser.prefix_split)))
    low, high = max(1, n - decoder_budget), min(n - 1, encoder_budget)
    u = randomness.uniform(seed, index, randomness.PREFIX_SPLIT)
    return low + np.minimum((u * (high - low + 1)).astype(np.int64), high - low)
