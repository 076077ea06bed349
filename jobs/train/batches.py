"""Prepared examples -> padded micro-batches, streamed from Ray Data into each training worker.

Rank r of W trains on the examples whose example_index % W == r, in index order, every epoch the
same. Ray's own streaming split hands blocks to whichever worker asks first, so the examples a rank
sees would differ between runs; this fixed assignment makes the data a pure function of (rank,
position), which is what lets a resumed run replay the uninterrupted one exactly. Each rank's
dataset is filtered in Ray Data's tasks and read with iter_torch_batches, which prefetches and pads
in a background thread while the step runs.

The data position is one number, the micro-batches each rank has consumed (the same on every rank);
a resumed rank skips that many. Ray Data cannot seek, so skipping re-reads (cheap next to a step).
"""

import json
from typing import Dict, Iterator

import numpy as np

from orchestrator import storage
from orchestrator.errors import UserError

COLUMNS = ["example_index", "input_ids", "decoder_input_ids", "labels", "denoiser"]
IGNORE = -100  # label value the loss skips (padding)


def read_metadata(data_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(data_dir, "metadata.json")))


def batches_per_epoch(num_examples: int, num_workers: int, micro_batch_size: int, data_dir: str) -> int:
    """Micro-batches every rank gets per pass (the smallest rank's share, whole batches only)."""
    per_rank = (num_examples // num_workers) // micro_batch_size
    if per_rank < 1:
        raise UserError(f"{data_dir} holds {num_examples} examples, fewer than one micro-batch per worker "
                        f"(train.num_workers={num_workers} x train.micro_batch_size={micro_batch_size}): "
                        "prepare more data or lower those numbers")
    return per_rank


def rank_datasets(data_dir: str, metadata: dict, num_workers: int) -> Dict[str, object]:
    """{"train_rank0": Dataset, ...}: each rank's examples, in index order (driver side)."""
    import ray.data

    filesystem, root = storage.arrow_filesystem(data_dir)
    paths = [f"{root}/{f['name']}" for f in metadata["files"]]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, columns=COLUMNS)

    def own_rows(batch: Dict[str, np.ndarray], rank: int) -> Dict[str, np.ndarray]:
        keep = batch["example_index"] % num_workers == rank
        return {k: v[keep] for k, v in batch.items()}

    return {f"train_rank{r}": dataset.map_batches(own_rows, fn_kwargs={"rank": r}, batch_format="numpy")
            for r in range(num_workers)}


def ingest_options():
    """Ray Train's default ingest options, with order preserved (the replay guarantee above)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def make_collate(encoder_length: int, decoder_length: int, pad_id: int):
    """Collate for iter_torch_batches: ragged numpy columns -> fixed-shape torch tensors.

    Out: input_ids, attention_mask [B, encoder_length]; decoder_input_ids, decoder_attention_mask,
    labels [B, decoder_length] (labels IGNORE at padding); denoiser [B]. Fixed shapes keep every
    step the same work, so step times and MFU compare across steps.
    """

    def collate(batch: Dict[str, np.ndarray]):
        import torch

        def pad(rows, length, value):
            out = np.full((len(rows), length), value, dtype=np.int64)
            for i, row in enumerate(rows):
                out[i, :len(row)] = row
            return torch.from_numpy(out)

        input_ids = pad(batch["input_ids"], encoder_length, pad_id)
        decoder_input_ids = pad(batch["decoder_input_ids"], decoder_length, pad_id)
        labels = pad(batch["labels"], decoder_length, IGNORE)
        lengths = torch.tensor([len(r) for r in batch["input_ids"]])
        decoder_lengths = torch.tensor([len(r) for r in batch["labels"]])
        positions = torch.arange(encoder_length)
        decoder_positions = torch.arange(decoder_length)
        return {"input_ids": input_ids, "attention_mask": (positions[None] < lengths[:, None]).long(),
                "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": (decoder_positions[None] < decoder_lengths[:, None]).long(),
                "labels": labels, "denoiser": torch.from_numpy(np.asarray(batch["denoiser"], dtype=np.int64))}

    return collate


def micro_batches(shard, start: int, per_epoch: int, micro_batch_size: int, collate) -> Iterator[dict]:
    """Endless micro-batches of one rank from position `start` (micro-batches already consumed)."""
    position = start
    while True:
        epoch_offset = position % per_epoch
        stream = shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=collate, drop_last=True,
                                          prefetch_batches=2)
        for index, batch in enumerate(stream):
            if index >= per_epoch:
                break
            if index < epoch_offset:
                continue
            yield batch
            position += 1


def read_examples(data_dir: str):
    """(metadata, rows): every prepared example of a local directory in example_index order, as ragged
    numpy columns, without Ray (benchmarks and tests that train in one process)."""
    import pyarrow.parquet as pq

    metadata = read_metadata(data_dir)
    tables = [pq.read_table(storage.join(data_dir, f["name"]), columns=COLUMNS) for f in metadata["files"]]
    columns = {c: [np.asarray(x) for t in tables for x in t.column(c).to_pylist()] for c in COLUMNS}
    order = np.argsort(columns["example_index"])
    return metadata, {c: np.array([columns[c][i] for i in order], dtype=object) for c in COLUMNS}


def batch_of(rows: dict, start: int, size: int, collate) -> dict:
    """Examples start .. start + size - 1 of read_examples' rows, collated."""
    return collate({c: v[start:start + size] for c, v in rows.items()})
