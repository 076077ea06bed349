"""Each training rank's data: only its own rows and files, a seeded order per pass, and a seek on
resume that gives exactly what replaying from the start gives. Synthetic prepared data (Parquet
parts and metadata.json as the prepare stage writes them), no Ray."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.errors import UserError
from jobs.core.examples_io import make_collate
from jobs.train import batches

FILE_EXAMPLES = (7, 5, 9, 3, 8)  # 32 examples in 5 parts of uneven size


def _prepared(root, sizes=FILE_EXAMPLES):
    """Parts whose example i has input_ids [i, i+1] and labels of length 1 + i % 3."""
    files, first = [], 0
    for number, size in enumerate(sizes):
        indices = np.arange(first, first + size)
        table = pa.table({
            "example_index": pa.array(indices, pa.int64()),
            "input_ids": pa.array([[int(i), int(i) + 1] for i in indices], pa.list_(pa.int32())),
            "decoder_input_ids": pa.array([[1] * (1 + i % 3) for i in indices], pa.list_(pa.int32())),
            "labels": pa.array([[int(i)] * (1 + i % 3) for i in indices], pa.list_(pa.int32())),
            "denoiser": pa.array([int(i % 2) for i in indices], pa.int32())})
        name = f"part-{number:06d}.parquet"
        pq.write_table(table, os.path.join(root, name))
        files.append({"name": name, "examples": size, "first_example": first})
        first += size
    metadata = {"files": files, "num_examples": first}
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump(metadata, f)
    return metadata


def _indices(stream, count):
    """The example indices (input_ids[:, 0]) of the next `count` micro-batches."""
    return [next(stream)["input_ids"][:, 0].tolist() for _ in range(count)]


def _stream(root, metadata, rank, world, start, micro=2, seed=0):
    first, end = batches.rank_rows(metadata["num_examples"], rank, world)
    reader = batches.RankReader(str(root), metadata, first, end)
    per_epoch = batches.batches_per_epoch(metadata["num_examples"], world, micro, str(root))
    return reader, batches.micro_batches(reader, start, per_epoch, micro, seed, rank, make_collate(4, 4, 0))


def test_pass_order_is_a_seeded_permutation_per_pass_and_rank():
    order = batches.pass_order(seed=3, pass_index=0, rank=1, share=50, window=8)
    assert sorted(order.tolist()) == list(range(50))
    assert order.tolist() != list(range(50))
    assert np.array_equal(order, batches.pass_order(3, 0, 1, 50, 8))  # a pure function of its arguments
    for other in ((3, 1, 1), (3, 0, 0), (4, 0, 1)):
        assert not np.array_equal(order, batches.pass_order(*other, 50, 8)), other
    # Windows stay together: each run of 8 positions (but the short last window) comes from one window.
    starts = [start for start in range(0, 50, 8)]
    position = 0
    for _ in starts:
        window = order[position] // 8
        size = min(8, 50 - window * 8)
        assert set(order[position:position + size] // 8) == {window}
        position += size


def test_each_rank_reads_only_its_rows_and_the_files_that_hold_them(tmp_path):
    metadata = _prepared(tmp_path)
    total = sum(os.path.getsize(tmp_path / f["name"]) for f in metadata["files"])
    seen = []
    for rank in range(2):
        reader, stream = _stream(tmp_path, metadata, rank, 2, start=0)
        rows = sorted(i for batch in _indices(stream, 8) for i in batch)  # one pass: 16 rows, 8 batches of 2
        assert rows == list(range(rank * 16, rank * 16 + 16))
        seen += rows
        assert reader.bytes_read < 0.8 * total, (reader.bytes_read, total)
    assert sorted(seen) == list(range(32))
    # One rank alone reads everything, and a micro-batch's targets keep their lengths and padding.
    reader, stream = _stream(tmp_path, metadata, 0, 1, start=0, micro=4)
    batch = next(stream)
    assert batch["labels"].shape == (4, 4)
    for row, index in enumerate(batch["input_ids"][:, 0].tolist()):
        assert (batch["labels"][row] != -100).sum() == 1 + index % 3
    _indices(stream, 7)
    assert reader.bytes_read == total


def test_seek_gives_what_replay_gives_across_passes(tmp_path):
    metadata = _prepared(tmp_path)
    _, replay = _stream(tmp_path, metadata, 1, 2, start=0)
    replayed = _indices(replay, 8 * 3)  # three passes
    passes = [sorted(sum(replayed[p * 8:(p + 1) * 8], [])) for p in range(3)]
    assert passes[0] == passes[1] == passes[2] == list(range(16, 32))  # every pass covers the rank's rows once
    assert replayed[:8] != replayed[8:16]  # in another order each pass
    for start in (5, 8, 13):
        reader, resumed = _stream(tmp_path, metadata, 1, 2, start=start)
        assert _indices(resumed, 6) == replayed[start:start + 6], start
    _, other_seed = _stream(tmp_path, metadata, 1, 2, start=0, seed=1)
    assert _indices(other_seed, 8) != replayed[:8]


def test_data_that_does_not_match_its_metadata_is_named(tmp_path):
    metadata = _prepared(tmp_path)
    metadata["files"][1]["first_example"] = 100  # holds 7..11, says 100..104: rows 7..11 are not found
    _, stream = _stream(tmp_path, metadata, 0, 1, start=0, micro=32)
    with pytest.raises(UserError, match=r"does not hold examples 0\.\.31 as its metadata.json says"):
        next(stream)


def _data_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "t5adapt-data"]


def test_the_reading_thread_stops_when_its_stream_is_closed_or_dropped(tmp_path):
    metadata = _prepared(tmp_path)
    assert not _data_threads()
    _, stream = _stream(tmp_path, metadata, 0, 1, start=0)
    _indices(stream, 2)  # the thread now waits on a full queue (it reads ahead of what was taken)
    assert len(_data_threads()) == 1
    stream.close()
    assert not _data_threads()
    _, stream = _stream(tmp_path, metadata, 0, 1, start=0)
    _indices(stream, 1)
    del stream  # as when loop.train returns or fails
    assert not _data_threads()
