"""Prepared examples -> padded micro-batches for one training rank: its own rows, shuffled per pass.

Rank r of W owns the examples with index in [r * S, (r + 1) * S), S = num_examples // W (the last
num_examples % W are never trained on), and reads only the Parquet files that hold them: bytes read
per rank fall with the number of ranks. Every pass over the rank's rows follows its own permutation,
drawn from (train.seed, pass, rank): windows of WINDOW_EXAMPLES rows in a shuffled order, the rows
of each window shuffled, so a micro-batch mixes documents and only one window is held in memory.

The data position is one number, the micro-batches each rank has consumed (the same on every
rank); it fixes the pass and the offset in that pass's permutation, so a resumed rank reads the
window it stopped in and nothing before it. A background thread reads and collates ahead of the
step (the step never waits on Parquet or S3 unless reading is slower than training).
"""

import queue
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from jobs.core import storage
from jobs.core.errors import UserError
from jobs.core.examples_io import COLUMNS, ragged
from jobs.core.teacher_io import TEACHER_COLUMNS

WINDOW_EXAMPLES = 16384  # rows shuffled together in memory (~65 MB at 512 + 256 tokens)
# Which examples a step sees is part of what training makes: a new order is a new train key.
DATA_ORDER = f"rank ranges, windows of {WINDOW_EXAMPLES} shuffled per pass"
PREFETCH_BATCHES = 4


def batches_per_epoch(num_examples: int, num_workers: int, micro_batch_size: int, data_dir: str) -> int:
    """Micro-batches every rank gets per pass (its share, whole batches only)."""
    per_rank = (num_examples // num_workers) // micro_batch_size
    if per_rank < 1:
        raise UserError(f"{data_dir} holds {num_examples} examples, fewer than one micro-batch per worker "
                        f"(train.num_workers={num_workers} x train.micro_batch_size={micro_batch_size}): "
                        "prepare more data or lower those numbers")
    return per_rank


def rank_rows(num_examples: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[first, end) example indices rank `rank` of `world_size` trains on."""
    share = num_examples // world_size
    return rank * share, (rank + 1) * share


def pass_order(seed: int, pass_index: int, rank: int, share: int, window: int = WINDOW_EXAMPLES) -> np.ndarray:
    """Offsets 0..share-1 (into the rank's rows) in the order pass `pass_index` visits them: a
    permutation of the windows, each window's rows permuted. A pure function of its arguments."""
    rng = np.random.default_rng([seed, pass_index, rank])
    starts = np.arange(0, share, window)
    parts = [start + rng.permutation(min(window, share - start)) for start in starts[rng.permutation(len(starts))]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class RankReader:
    """Rows of one rank's range, read a window at a time from the prepared Parquet files.

    metadata: the prepare stage's metadata.json ("files": name, first_example, examples).
    teacher_dir: the teacher stage's output (jobs/teacher): each part's stored top-k, in a file of
    the same name, is read beside it (TEACHER_COLUMNS).
    bytes_read: Parquet bytes this reader has fetched (for bench/data_reads.py).
    """

    def __init__(self, data_dir: str, metadata: dict, first: int, end: int, teacher_dir: Optional[str] = None):
        self.data_dir, self.first, self.end, self.teacher_dir = data_dir, first, end, teacher_dir
        self.files = sorted(metadata["files"], key=lambda f: f["first_example"])
        self.filesystem, self.root = _filesystem(data_dir)
        self.columns = COLUMNS + (TEACHER_COLUMNS if teacher_dir else [])
        self.bytes_read = 0
        self._cache: Dict[int, Dict[str, np.ndarray]] = {}  # window start offset -> its rows

    def rows(self, offsets: np.ndarray, window: int = WINDOW_EXAMPLES) -> Dict[str, np.ndarray]:
        """The rows at `offsets` (into the rank's range) as ragged numpy columns, in that order."""
        out = {c: np.empty(len(offsets), dtype=object) for c in self.columns}
        for i, offset in enumerate(offsets):
            start = int(offset) // window * window
            if start not in self._cache:
                if len(self._cache) >= 2:  # a micro-batch spans at most two windows
                    self._cache.pop(next(iter(self._cache)))
                self._cache[start] = self._read(self.first + start, min(self.first + start + window, self.end))
            for c in self.columns:
                out[c][i] = self._cache[start][c][int(offset) - start]
        return out

    def _read(self, lo: int, hi: int) -> Dict[str, np.ndarray]:
        """Examples lo..hi-1 (by index), from the files that hold them."""
        columns = {c: [] for c in self.columns}
        for entry in self.files:
            first, count = entry["first_example"], entry["examples"]
            if first >= hi or first + count <= lo:
                continue
            table = self._table(self.filesystem, f"{self.root}/{entry['name']}", COLUMNS)
            indices = table.column("example_index").to_numpy()
            if self.teacher_dir:
                teacher_fs, teacher_root = _filesystem(self.teacher_dir)
                stored = self._table(teacher_fs, f"{teacher_root}/{entry['name']}", ["example_index"] + TEACHER_COLUMNS)
                if not np.array_equal(stored.column("example_index").to_numpy(), indices):
                    raise UserError(f"{self.teacher_dir}/{entry['name']} does not hold the teacher's log-probs of "
                                    f"{self.data_dir}/{entry['name']} row for row: the teacher output was made from "
                                    "other prepared data; delete it and run again to rebuild it")
                table = table.append_column(TEACHER_COLUMNS[0], stored.column(TEACHER_COLUMNS[0])) \
                    .append_column(TEACHER_COLUMNS[1], stored.column(TEACHER_COLUMNS[1]))
            keep = np.flatnonzero((indices >= lo) & (indices < hi))
            for c in self.columns:
                values = table.column(c).to_numpy(zero_copy_only=False)
                columns[c].extend(values[keep])
        order = np.argsort(np.asarray(columns["example_index"], dtype=np.int64), kind="stable")
        got = np.asarray(columns["example_index"], dtype=np.int64)[order]
        if len(got) != hi - lo or (len(got) and (got[0] != lo or got[-1] != hi - 1)):
            raise UserError(f"{self.data_dir} does not hold examples {lo}..{hi - 1} as its metadata.json says "
                            f"(found {len(got)} of {hi - lo}): the prepared data is damaged; delete that prepare "
                            "output and run again to rebuild it")
        return {c: ragged([columns[c][i] for i in order]) for c in self.columns}

    def _table(self, filesystem, path: str, columns):
        import pyarrow.parquet as pq

        with filesystem.open_input_file(path) as handle:
            table = pq.read_table(handle, columns=columns)
            self.bytes_read += handle.size()
        return table


def _filesystem(path: str):
    """(pyarrow filesystem, root) for a local directory or an s3:// prefix."""
    filesystem, root = storage.arrow_filesystem(path)
    if filesystem is None:
        from pyarrow import fs

        filesystem = fs.LocalFileSystem()
    return filesystem, root


def micro_batches(reader: RankReader, start: int, per_epoch: int, micro_batch_size: int, seed: int, rank: int,
                  collate: Callable) -> Iterator[dict]:
    """Endless collated micro-batches of one rank from position `start` (micro-batches consumed),
    prepared by a background thread PREFETCH_BATCHES ahead."""
    share = reader.end - reader.first

    def produce(position: int):
        pass_index, order = None, None
        while True:
            if position // per_epoch != pass_index:
                pass_index = position // per_epoch
                order = pass_order(seed, pass_index, rank, share)
            at = position % per_epoch * micro_batch_size
            yield collate(reader.rows(order[at:at + micro_batch_size]))
            position += 1

    return _prefetched(produce(start), PREFETCH_BATCHES)


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """`source`'s items, computed by a thread up to `depth` ahead; its error is raised here. Closing
    the iterator (or dropping it) stops and joins the thread, so no reader is still inside Arrow or
    torch code when the interpreter exits."""
    items: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for item in source:
                if not put((True, item)):
                    return
        except BaseException as e:  # noqa: B902 - handed to the consumer, which raises it
            put((False, e))

    thread = threading.Thread(target=fill, daemon=True, name="t5adapt-data")
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
