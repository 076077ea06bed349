"""Reading corpus files into documents, skipping and counting bad rows instead of failing.

Formats: JSON Lines (a text field), Parquet (a text column), plain text (one document per non-blank
line). Files ending in .gz (gzip) or .zst/.zstd (Zstandard) are decompressed as they are read, and
`format: auto` looks through that suffix (x.jsonl.gz is JSON Lines).

Bad rows (counted per reason and per file, never fatal here): invalid UTF-8, malformed JSON line,
missing field, a value that is not text, empty text. A file that cannot be read at all (missing,
not Parquet, a corrupt or truncated compressed stream) is fatal, with its path named; so is a
prepare that finds no usable document at all (jobs/data/stage.py).

Held-out documents: the n-th good document of file f of source s is held out of training iff a
hash of (data.seed, s, f, n) falls below data.heldout_fraction (hold_out), so the split does not
depend on how the work is cut into pieces or spread over workers.
"""

import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from typing import Iterator, List, Optional, Tuple

import numpy as np

from jobs.data.config import CorpusConfig
from jobs.core import storage
from jobs.core.errors import UserError

BAD_REASONS = ("invalid_utf8", "malformed_json", "missing_field", "not_text", "empty_text")
# What each reason usually means, for the error of a source that yields no document at all.
BAD_HINTS = {
    "invalid_utf8": "the bytes are not UTF-8 text (a binary file, another encoding, or a compressed file "
                    "without a .gz/.zst/.zstd suffix)",
    "malformed_json": "the lines are not JSON: plain text needs format: text",
    "missing_field": "the rows have no field {field!r}: set text_field to the field that holds the text",
    "not_text": "the field {field!r} holds numbers or other non-text values: set text_field to a text field",
    "empty_text": "the field {field!r} is empty or blank in every row",
}
BUILTIN_CORPORA = ("builtin:python-docs",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_DRAW_CHUNK = 4096  # held-out draws are computed this many documents at a time


def list_files(source: CorpusConfig, key: str) -> List[str]:
    """The files a corpus source names, sorted (the order is part of what makes output deterministic)."""
    path = source.path
    if path == "builtin:python-docs":
        return [_python_docs_file()]
    if path.startswith("builtin:"):
        raise UserError(f"{key}.path={path} is not a builtin corpus: choose one of {', '.join(BUILTIN_CORPORA)}")
    if storage.is_s3(path):
        return storage.list_files(path)  # each worker fetches its own files: nothing lands on the driver
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not f.startswith(".")]
    else:
        files = glob.glob(os.path.expanduser(path), recursive=True)
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise UserError(f"{key}.path={source.path} matches no files: check the path or glob")
    return files


def corpus_identity(corpus: List[CorpusConfig]) -> list:
    """What each corpus source currently holds, for the prepare stage's key: its files with size and
    modification time (local) or ETag (s3://). A file fixed or replaced in place changes the key,
    so output made from the old bytes is never reused."""
    identity = []
    for index, source in enumerate(corpus):
        if storage.is_s3(source.path):
            identity.append(storage.object_identities(source.path))
            continue
        files = list_files(source, f"data.corpus[{index}]")
        identity.append([[path, *storage.file_identities(path)[0][1:]] for path in files])
    return identity


def _python_docs_file() -> str:
    """The shipped English corpus as a JSON Lines file in the cache (written once)."""
    from jobs.core.shipped_text import prose_documents

    path = os.path.join(storage.cache_dir(), "corpora", "python-docs.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "w") as f:
            for document in prose_documents():
                f.write(json.dumps({"text": document}) + "\n")
        os.replace(path + ".part", path)
    return path


def compression(path: str) -> Optional[str]:
    """"gzip" or "zstd" when the file name says it is compressed, else None."""
    return next((kind for suffix, kind in COMPRESSIONS.items() if path.lower().endswith(suffix)), None)


def file_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    lower = path.lower()
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            lower = lower[:-len(suffix)]
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    return "text"


def read_documents(path: str, fmt: str, text_field: str, bad: Counter) -> Iterator[str]:
    """Yield the good documents of one file (a local path or an s3:// object, compressed or not);
    add one to bad[reason] per bad row.

    Raises OSError/ValueError when the file as a whole cannot be read (callers name the path).
    """
    if storage.is_s3(path):
        yield from _s3_documents(path, fmt, text_field, bad)
        return
    if fmt == "parquet":
        yield from _parquet_documents(path, text_field, bad)
        return
    for raw in _lines(path):
        if fmt == "text" and not raw.strip():
            continue  # blank lines separate documents in plain text
        text = _decode(raw, bad)
        if text is None:
            continue
        if fmt == "jsonl":
            text = _json_text(text, text_field, bad)
        if text is None:
            continue
        if not text.strip():
            bad["empty_text"] += 1
            continue
        yield text


def _lines(path: str) -> Iterator[bytes]:
    """The file's lines as bytes, decompressed on the fly when its name says so."""
    kind = compression(path)
    if kind is None:
        with open(path, "rb") as f:
            yield from f
        return
    try:
        with _open_compressed(path, kind) as f:
            yield from f
    except (OSError, EOFError, zlib.error, ValueError) as e:  # gzip and arrow raise all of these on bad streams
        raise OSError(f"cannot decompress it as {kind}: {e}") from None


def _open_compressed(path: str, kind: str):
    if kind == "gzip":
        return gzip.open(path, "rb")
    # Zstandard through pyarrow (already a dependency); its stream reads but cannot split lines itself.
    import pyarrow as pa

    return io.BufferedReader(_ArrowReader(pa.input_stream(path, compression=kind)), 1 << 20)


class _ArrowReader(io.RawIOBase):
    """A pyarrow input stream as a raw Python stream, so io.BufferedReader can iterate its lines."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


def _s3_documents(uri: str, fmt: str, text_field: str, bad: Counter) -> Iterator[str]:
    """Copy the object to local scratch on the worker that reads it, read it, delete the copy."""
    import tempfile

    from botocore.exceptions import BotoCoreError, ClientError

    with tempfile.TemporaryDirectory(prefix="t5adapt-corpus-") as scratch:
        local = os.path.join(scratch, os.path.basename(uri))
        try:
            storage.download_file(uri, local)
        except (BotoCoreError, ClientError) as e:
            raise OSError(f"cannot download it: {e}") from None
        yield from read_documents(local, fmt, text_field, bad)


def _decode(raw: bytes, bad: Counter) -> Optional[str]:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        bad["invalid_utf8"] += 1
        return None


def _json_text(line: str, field: str, bad: Counter) -> Optional[str]:
    if not line.strip():
        bad["empty_text"] += 1
        return None
    try:
        row = json.loads(line)
    except ValueError:
        bad["malformed_json"] += 1
        return None
    if not isinstance(row, dict) or row.get(field) is None:
        bad["missing_field"] += 1
        return None
    if not isinstance(row[field], str):
        bad["not_text"] += 1
        return None
    return row[field]


def _parquet_documents(path: str, column: str, bad: Counter) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = compression(path)
    if kind is None:
        parquet = pq.ParquetFile(path)
    else:  # Parquet compresses inside; a compressed Parquet file is rare, so it is read whole
        try:
            with _open_compressed(path, kind) as f:
                parquet = pq.ParquetFile(pa.BufferReader(f.read()))
        except (OSError, EOFError, zlib.error) as e:
            raise OSError(f"cannot decompress it as {kind}: {e}") from None
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"has no column {column!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
                         "set the source's text_field")
    for batch in parquet.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                bad["missing_field"] += 1
            elif isinstance(value, bytes):
                text = _decode(value, bad)
                if text is not None and text.strip():
                    yield text
                elif text is not None:
                    bad["empty_text"] += 1
            elif not isinstance(value, str):
                bad["not_text"] += 1
            elif not value.strip():
                bad["empty_text"] += 1
            else:
                yield value


def pieces(documents: Iterator[str], documents_per_piece: int) -> Iterator[Tuple[int, List[str]]]:
    """Consecutive groups of documents, numbered from 0: the unit of parallel packing."""
    piece, number = [], 0
    for document in documents:
        piece.append(document)
        if len(piece) == documents_per_piece:
            yield number, piece
            piece, number = [], number + 1
    if piece or number == 0:
        yield number, piece


def heldout_draws(seed: int, source: int, file_index: int, documents: np.ndarray) -> np.ndarray:
    """One float in [0, 1) per document index of one file: a pure function of (seed, source, file, document)."""
    from jobs.data import randomness

    # The file's own seed, hashed from (seed, source, file index); then one draw per document index.
    file_seed = randomness.keys(seed, np.array([source]), randomness.HELDOUT, 1)[0, 0]
    file_seed = randomness.keys(file_seed, np.array([file_index]), randomness.HELDOUT, 1)[0, 0]
    return randomness.uniform(file_seed, documents, randomness.HELDOUT)


def hold_out(documents: Iterator[str], fraction: float, seed: int, source: int, file_index: int,
             heldout: List[Tuple[float, int, str]]) -> Iterator[str]:
    """The training documents of one file, in order. Document n (the file's n-th good document) is
    held out instead when its draw is below `fraction`; it is appended to `heldout` as
    (draw, n, text), and the draw orders the held-out documents of the whole corpus."""
    draws = np.empty(0)
    for n, document in enumerate(documents):
        if n % _DRAW_CHUNK == 0:
            draws = heldout_draws(seed, source, file_index, np.arange(n, n + _DRAW_CHUNK, dtype=np.uint64))
        draw = float(draws[n % _DRAW_CHUNK])
        if draw < fraction:
            heldout.append((draw, n, document))
        else:
            yield document


def take_heldout(rows: List[dict], max_tokens: int) -> List[tuple]:
    """The held-out documents kept, as (source, file index, document index, tokens with EOS), in
    corpus order: all held-out documents in the order of their draws (ties by place in the corpus)
    until the next one would pass `max_tokens`; the rest are dropped (and still never trained on).

    `rows`: per file, its held-out documents as the tokenize step reports them: source, file_index,
    heldout_draws, heldout_documents (indices), heldout_lengths and heldout_tokens (all concatenated).
    """
    candidates = []
    for row in rows:
        ends = np.cumsum(row["heldout_lengths"])
        for draw, document, end, length in zip(row["heldout_draws"], row["heldout_documents"], ends, row["heldout_lengths"]):
            candidates.append((float(draw), row["source"], row["file_index"], int(document),
                               np.asarray(row["heldout_tokens"][end - length:end], dtype=np.int32)))
    candidates.sort(key=lambda c: c[:4])
    kept, total = [], 0
    for _, source, file_index, document, tokens in candidates:
        if total + len(tokens) > max_tokens:
            break
        kept.append((source, file_index, document, tokens))
        total += len(tokens)
    return sorted(kept, key=lambda c: c[:3])
