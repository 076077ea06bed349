"""Training data per rank: Parquet bytes read and resume start-up time at 1, 2 and 4 ranks, before and
after ranks got their own rows (jobs/train/batches.py).

  before: what t5adapt did until this change: every rank read every Parquet file and kept the rows
          with example_index % W == rank (Ray Data filtered them), and a resumed rank replayed its
          position: read, collate and drop every micro-batch before it.
  after:  each rank reads only the files holding its range of examples, a window at a time, and a
          resumed rank seeks: it reads the window it stopped in and nothing before it.

The data is synthetic prepared data in the prepare stage's layout (metadata.json + Parquet parts,
zstd), --examples examples of --encoder-length + --decoder-length tokens in parts of --part-examples.
"resume" is the time from opening the data to holding the first micro-batch after a resume at
--resume-fraction of a pass (both sides in this process, one thread, files in the page cache after
the first read: what is compared is the work, not the disk).

Run: .venv/bin/python bench/data_reads.py [--examples 40000]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "bench", "out", "data-reads")


def write_data(root: str, examples: int, encoder_length: int, decoder_length: int, part_examples: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "metadata.json")
    if os.path.exists(path):
        metadata = json.load(open(path))
        if metadata["num_examples"] == examples:
            return metadata
    rng = np.random.default_rng(0)
    files = []
    for first in range(0, examples, part_examples):
        count = min(part_examples, examples - first)
        ids = pa.list_(pa.int32())
        table = pa.table({
            "example_index": pa.array(np.arange(first, first + count), pa.int64()),
            "input_ids": pa.array(list(rng.integers(10, 262_000, (count, encoder_length), dtype=np.int32)), ids),
            "decoder_input_ids": pa.array(list(rng.integers(10, 262_000, (count, decoder_length), dtype=np.int32)), ids),
            "labels": pa.array(list(rng.integers(10, 262_000, (count, decoder_length), dtype=np.int32)), ids),
            "denoiser": pa.array(rng.integers(0, 7, count, dtype=np.int32))})
        name = f"part-{first // part_examples:06d}.parquet"
        pq.write_table(table, os.path.join(root, name), compression="zstd")
        files.append({"name": name, "examples": count, "first_example": first})
    metadata = {"files": files, "num_examples": examples, "encoder_length": encoder_length,
                "decoder_length": decoder_length}
    json.dump(metadata, open(path, "w"))
    return metadata


def before(root, metadata, rank, world, position, micro, collate):
    """(bytes read, seconds to the first micro-batch after `position`) the old way."""
    import pyarrow.parquet as pq

    from jobs.core.examples_io import COLUMNS

    started = time.perf_counter()
    read, kept = 0, {c: [] for c in COLUMNS}
    for entry in metadata["files"]:
        path = os.path.join(root, entry["name"])
        table = pq.read_table(path, columns=COLUMNS)
        read += os.path.getsize(path)
        keep = table.column("example_index").to_numpy() % world == rank
        for c in COLUMNS:
            kept[c].extend(table.column(c).to_numpy(zero_copy_only=False)[keep])
    rows = {c: np.asarray(v, dtype=object) if c != "denoiser" else np.asarray(v) for c, v in kept.items()}
    for index in range(position + 1):  # replay: every batch before the position is collated and dropped
        batch = collate({c: v[index * micro:(index + 1) * micro] for c, v in rows.items()})
    assert batch["input_ids"].shape[0] == micro
    return read, time.perf_counter() - started


def after(root, metadata, rank, world, position, micro, collate):
    """(bytes read, seconds to the first micro-batch after `position`) with batches.RankReader."""
    from jobs.train import batches

    started = time.perf_counter()
    first, end = batches.rank_rows(metadata["num_examples"], rank, world)
    reader = batches.RankReader(root, metadata, first, end)
    per_epoch = batches.batches_per_epoch(metadata["num_examples"], world, micro, root)
    batch = next(batches.micro_batches(reader, position, per_epoch, micro, 0, rank, collate))
    assert batch["input_ids"].shape[0] == micro
    return reader.bytes_read, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=40000)
    parser.add_argument("--encoder-length", type=int, default=512)
    parser.add_argument("--decoder-length", type=int, default=256)
    parser.add_argument("--part-examples", type=int, default=1000)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--resume-fraction", type=float, default=0.75)
    args = parser.parse_args()

    import torch

    from jobs.core.examples_io import make_collate

    torch.set_num_threads(1)
    metadata = write_data(OUT, args.examples, args.encoder_length, args.decoder_length, args.part_examples)
    total = sum(os.path.getsize(os.path.join(OUT, f["name"])) for f in metadata["files"])
    collate = make_collate(args.encoder_length, args.decoder_length, 0)
    print(f"{args.examples} examples of {args.encoder_length}+{args.decoder_length} tokens in "
          f"{len(metadata['files'])} Parquet parts, {total / 2**20:.1f} MiB; resume at {args.resume_fraction:.0%} "
          f"of a pass, micro-batch {args.micro_batch}\n")
    print(f"{'ranks':>5}  {'MiB read per rank':>24}  {'resume start-up s (rank 0)':>30}")
    print(f"{'':>5}  {'before':>8} {'after':>7} {'ratio':>7}  {'before':>9} {'after':>8} {'ratio':>9}")
    for world in (1, 2, 4):
        per_epoch = args.examples // world // args.micro_batch
        position = int(per_epoch * args.resume_fraction)
        old_bytes, old_s = before(OUT, metadata, 0, world, position, args.micro_batch, collate)
        new_bytes, new_s = after(OUT, metadata, 0, world, position, args.micro_batch, collate)
        print(f"{world:>5}  {old_bytes / 2**20:>8.1f} {new_bytes / 2**20:>7.1f} {new_bytes / old_bytes:>7.2f}  "
              f"{old_s:>9.2f} {new_s:>8.2f} {new_s / old_s:>9.3f}")


if __name__ == "__main__":
    main()
