"""Reading prepared examples outside Ray: metadata, padded batches, the held-out split.

The prepare stage writes training parts (metadata.json "files") and a held-out split:
  heldout/examples.parquet   the training columns (COLUMNS), examples never trained on
  heldout/documents.parquet  `tokens` (one document's ids followed by EOS) and `source`
Training (jobs/train), evaluation (jobs/evaluate), benchmarks and tests share these readers. Local
directories and s3:// prefixes read the same way (pyarrow's filesystem), without a full download.
"""

import json
from typing import Dict, List, Optional

import numpy as np

from jobs.core import storage
from jobs.core.errors import UserError

COLUMNS = ["example_index", "input_ids", "decoder_input_ids", "labels", "denoiser"]
IGNORE = -100  # label value the loss skips (padding)
HELDOUT_EXAMPLES = "heldout/examples.parquet"
HELDOUT_DOCUMENTS = "heldout/documents.parquet"


def read_metadata(data_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(data_dir, "metadata.json")))


def denoiser_names(metadata: dict) -> List[str]:
    """One name per denoiser, as training logs them: "R3_r0.15", "X64_r0.5", "S"."""
    return [d["name"] + (f"{d['mean_span']:g}_r{d['rate']:g}" if d.get("rate") else "") for d in metadata["denoisers"]]


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


def read_examples(data_dir: str, names: Optional[List[str]] = None, limit: Optional[int] = None):
    """(metadata, rows): prepared examples in example_index order, as ragged numpy columns, without
    Ray (evaluation, benchmarks and tests that train in one process).

    names: Parquet files under data_dir (default: every training part in metadata.json).
    limit: keep only the first `limit` examples (by index).
    """
    metadata = read_metadata(data_dir)
    if names is None:
        names = [f["name"] for f in metadata["files"]]
    tables = [read_table(data_dir, name, COLUMNS) for name in names]
    columns = {c: [np.asarray(x) for t in tables for x in t.column(c).to_pylist()] for c in COLUMNS}
    order = np.argsort(columns["example_index"], kind="stable")[:limit]
    return metadata, {c: ragged([columns[c][i] for i in order]) for c in COLUMNS}


def batch_of(rows: dict, start: int, size: int, collate) -> dict:
    """Examples start .. start + size - 1 of read_examples' rows, collated."""
    return collate({c: v[start:start + size] for c, v in rows.items()})


def read_heldout_examples(data_dir: str, limit: Optional[int] = None):
    """(metadata, rows) of the held-out split, like read_examples. UserError when there is none."""
    _require_heldout(data_dir, HELDOUT_EXAMPLES)
    return read_examples(data_dir, [HELDOUT_EXAMPLES], limit)


def read_heldout_documents(data_dir: str) -> List[np.ndarray]:
    """The held-out documents' token ids (int64 arrays, each ending with EOS), in file order."""
    _require_heldout(data_dir, HELDOUT_DOCUMENTS)
    table = read_table(data_dir, HELDOUT_DOCUMENTS, ["tokens"])
    return [np.asarray(t, dtype=np.int64) for t in table.column("tokens").to_pylist()]


def ragged(values: list) -> np.ndarray:
    """A 1-D object array of `values` (np.array would make a 2-D one when all rows have one length)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _require_heldout(data_dir: str, name: str) -> None:
    if not storage.exists(storage.join(data_dir, name)):
        raise UserError(f"{data_dir} has no held-out split ({name} is missing): it was prepared by an older "
                        "t5adapt; prepare it again (t5adapt prepare ... --force) or set evaluate.enabled=false")


def read_table(data_dir: str, name: str, columns: List[str]):
    """Columns of the Parquet file `name` under `data_dir` (a directory or s3:// prefix)."""
    import pyarrow.parquet as pq

    filesystem, root = storage.arrow_filesystem(data_dir)
    return pq.read_table(f"{root}/{name}", columns=columns, filesystem=filesystem)


def write_parquet(table, out: str, name: str) -> None:
    """Into a local directory, or (s3:// output) uploaded by the worker that made it: on a multi-node
    cluster no file is left on a node's local disk. `name` may name a subdirectory (heldout/...)."""
    import os
    import tempfile

    import pyarrow.parquet as pq

    if not storage.is_s3(out):
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        pq.write_table(table, os.path.join(out, name), compression="zstd")
        return
    with tempfile.TemporaryDirectory(prefix="t5adapt-part-") as scratch:
        local = os.path.join(scratch, os.path.basename(name))
        pq.write_table(table, local, compression="zstd")
        storage.upload_file(local, storage.join(out, name))


def token_losses(model, batch: dict):
    """(token_loss, mask): each decoder target's cross-entropy under `model` (a transformers
    encoder-decoder or a DeepSpeed engine around one), shape [batch, decoder length], float32, with
    0 where the label is padding; mask marks the real targets. Training and evaluation both score
    examples with this one function."""
    return target_losses(seq2seq_logits(model, batch), batch["labels"])


def seq2seq_logits(model, batch: dict):
    """The decoder's logits [batch, decoder length, vocab] for a collated batch."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"],
                 decoder_attention_mask=batch["decoder_attention_mask"]).logits


def target_losses(logits, labels):
    """(token_loss, mask) of token_losses from the logits."""
    import torch

    token_loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                   ignore_index=IGNORE, reduction="none").view_as(labels)
    return token_loss, labels != IGNORE
