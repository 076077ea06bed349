"""Reading corpus files into documents, skipping and counting bad rows instead of failing.

Bad rows (counted per reason and per file, never fatal): invalid UTF-8, malformed JSON line, missing
field, a value that is not text, empty text. A file that cannot be read at all is fatal, with its
path named. Formats: JSON Lines (a text field), Parquet (a text column), plain text (one document
per non-blank line).
"""

import glob
import json
import os
from collections import Counter
from typing import Iterator, List, Optional, Tuple

from jobs.data.config import CorpusConfig
from orchestrator import storage
from orchestrator.errors import UserError

BAD_REASONS = ("invalid_utf8", "malformed_json", "missing_field", "not_text", "empty_text")
BUILTIN_CORPORA = ("builtin:python-docs",)


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


def _python_docs_file() -> str:
    """The shipped English corpus as a JSON Lines file in the cache (written once)."""
    from jobs.shipped_text import prose_documents

    path = os.path.join(storage.cache_dir(), "corpora", "python-docs.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "w") as f:
            for document in prose_documents():
                f.write(json.dumps({"text": document}) + "\n")
        os.replace(path + ".part", path)
    return path


def file_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    return "text"


def read_documents(path: str, fmt: str, text_field: str, bad: Counter) -> Iterator[str]:
    """Yield the good documents of one file (a local path or an s3:// object); add one to
    bad[reason] per bad row.

    Raises OSError/ValueError when the file as a whole cannot be read (callers name the path).
    """
    if storage.is_s3(path):
        yield from _s3_documents(path, fmt, text_field, bad)
        return
    if fmt == "parquet":
        yield from _parquet_documents(path, text_field, bad)
        return
    with open(path, "rb") as f:
        for raw in f:
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
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
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
