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

from typing import Dict, Iterator

import numpy as np

from jobs.core import storage
from jobs.core.errors import UserError
from jobs.core.examples_io import COLUMNS


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
