"""The prepare stage: corpus files -> Parquet shards of UL2 / PrefixLM examples, on Ray Data.

  1. tokenize (Ray Data, actors: the tokenizer loads once per worker): each file is read, bad rows
     are skipped and counted, documents are grouped into pieces, tokenized, joined with EOS.
  2. schedule (driver, token counts only): pieces of all sources are interleaved in proportion to
     the sources' weights (a source is cycled to fill its share), and each piece visit gets its
     range of global example indices.
  3. build (Ray Data tasks): each visit cuts, corrupts and writes its examples to one Parquet file
     named by its position, so the output is the same whatever the parallelism.
Then metadata.json (tokenizer, sentinels, denoiser table, lengths, counts) and COMMITTED, last.
"""

import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict
from typing import Dict, List

import numpy as np

from jobs.data.config import DataConfig
from jobs.data.corpus import BAD_REASONS, file_format, list_files, pieces, read_documents
from jobs.data.examples import build_examples, count_examples
from jobs.data.plan import ExamplePlan, denoising_tokens, make_plan
from orchestrator import storage
from orchestrator.commits import commit, config_digest, reusable, staging_dir
from orchestrator.errors import UserError

log = logging.getLogger("t5adapt.prepare")
METADATA = "metadata.json"


class TokenizeFiles:
    """Ray Data actor: file rows in, one row per piece out (tokens with EOS after each document).

    It builds the Rust tokenizer from its JSON (shipped once through the object store, in a list so
    Ray hands the reference over unresolved): no transformers import and no pickled tokenizer per
    worker, which cost ~10 s per actor for Gemma's 262k vocabulary.
    """

    def __init__(self, tokenizer_json_ref: list, eos_id: int, documents_per_piece: int):
        import ray
        from tokenizers import Tokenizer

        # One tokenizer thread per actor: Ray gave this actor one CPU; parallelism comes from actors.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = Tokenizer.from_str(ray.get(tokenizer_json_ref[0]))
        # Text that spells a special token ("<unused7>") is split into ordinary pieces, never turned into it.
        self.tokenizer.encode_special_tokens = True
        self.documents_per_piece = documents_per_piece
        self.eos = np.array([eos_id], dtype=np.int32)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        out = {k: [] for k in ("source", "file_index", "path", "piece", "num_documents", "num_tokens", "tokens", "bad", "error")}
        for source, file_index, path, fmt, field in zip(batch["source"], batch["file_index"], batch["path"],
                                                        batch["format"], batch["text_field"]):
            bad, reported, piece = Counter(), Counter(), -1
            try:
                for piece, documents in pieces(read_documents(path, fmt, field, bad), self.documents_per_piece):
                    tokens = self._tokenize(documents)
                    # Each piece reports the bad rows read since the previous one.
                    self._append(out, source, file_index, path, piece, len(documents), tokens, dict(bad - reported), "")
                    reported = Counter(bad)
                if bad - reported:  # bad rows after the last full piece
                    self._append(out, source, file_index, path, piece + 1, 0, np.empty(0, np.int32), dict(bad - reported), "")
            except (OSError, ValueError) as e:
                self._append(out, source, file_index, path, -1, 0, np.empty(0, np.int32), {}, f"{type(e).__name__}: {e}")
        return out

    def _tokenize(self, documents: List[str]) -> np.ndarray:
        if not documents:
            return np.empty(0, np.int32)
        encodings = self.tokenizer.encode_batch_fast(documents, add_special_tokens=False)
        return np.concatenate([np.concatenate([np.asarray(e.ids, dtype=np.int32), self.eos]) for e in encodings])

    @staticmethod
    def _append(out, source, file_index, path, piece, num_documents, tokens, bad, error):
        for key, value in (("source", int(source)), ("file_index", int(file_index)), ("path", str(path)), ("piece", piece),
                           ("num_documents", num_documents), ("num_tokens", len(tokens)), ("tokens", tokens),
                           ("bad", json.dumps(bad)), ("error", error)):
            out[key].append(value)


def schedule(pieces_meta: List[dict], weights: List[float], plan: ExamplePlan, seed: int) -> List[dict]:
    """Piece visits in output order, each with its first global example index and example count."""
    by_source: Dict[int, List[dict]] = {}
    for meta in pieces_meta:
        by_source.setdefault(meta["source"], []).append(meta)
    total_tokens = sum(m["num_tokens"] for m in pieces_meta)
    share = np.array(weights) / sum(weights)
    visits = []
    for source, source_pieces in sorted(by_source.items()):
        target = share[source] * total_tokens
        usable = [m for m in source_pieces if m["num_tokens"]]
        emitted, repeat = 0, 0
        while usable and emitted < target:
            for meta in usable:
                if emitted >= target:  # share filled (a source always gets at least its first piece)
                    break
                # Position in the mixture: the middle of this visit's tokens, as a fraction of the source's share.
                visits.append({**meta, "repeat": repeat, "order_key": (emitted + meta["num_tokens"] / 2) / target})
                emitted += meta["num_tokens"]
            repeat += 1
    visits.sort(key=lambda v: (v["order_key"], v["source"]))
    start = 0
    for position, visit in enumerate(visits):
        visit["position"], visit["start"] = position, start
        visit["count"] = count_examples(visit["num_tokens"], start, plan, seed)
        start += visit["count"]
    return visits


def _build_and_write(batch: Dict[str, np.ndarray], visits_by_piece: Dict[tuple, List[dict]], plan: ExamplePlan,
                     seed: int, out: str) -> Dict[str, list]:
    """Ray Data task: all visits of the pieces in `batch` -> one Parquet file each; returns their stats."""
    import pyarrow as pa

    stats = {k: [] for k in ("position", "file", "examples", "input_tokens", "label_tokens", "used_tokens", "denoisers")}
    for source, file_index, piece, tokens in zip(batch["source"], batch["file_index"], batch["piece"], batch["tokens"]):
        for visit in visits_by_piece.get((int(source), int(file_index), int(piece)), []):
            if not visit["count"]:
                continue  # a piece too short for even one example
            columns = build_examples(np.asarray(tokens, dtype=np.int32), visit["start"], visit["count"], plan, seed)
            table = pa.table({
                "example_index": pa.array(columns["example_index"], pa.int64()),
                "input_ids": pa.array(columns["input_ids"], pa.list_(pa.int32())),
                "decoder_input_ids": pa.array(columns["decoder_input_ids"], pa.list_(pa.int32())),
                "labels": pa.array(columns["labels"], pa.list_(pa.int32())),
                "denoiser": pa.array(columns["denoiser"], pa.int32()),
            })
            name = f"part-{visit['position']:06d}.parquet"
            _write_parquet(table, out, name)
            lengths = [len(x) for x in columns["input_ids"]], [len(y) for y in columns["labels"]]
            used = sum(plan.denoisers[d].raw_length for d in columns["denoiser"])
            for key, value in (("position", visit["position"]), ("file", name), ("examples", visit["count"]),
                               ("input_tokens", sum(lengths[0])), ("label_tokens", sum(lengths[1])),
                               ("used_tokens", used), ("denoisers", json.dumps(Counter(columns["denoiser"])))):
                stats[key].append(value)
    return stats


def _write_parquet(table, out: str, name: str) -> None:
    """Into a local directory, or (s3:// output) uploaded by the worker that made it: on a multi-node
    cluster no file is left on a node's local disk."""
    import tempfile

    import pyarrow.parquet as pq

    if not storage.is_s3(out):
        pq.write_table(table, os.path.join(out, name), compression="zstd")
        return
    with tempfile.TemporaryDirectory(prefix="t5adapt-part-") as scratch:
        pq.write_table(table, os.path.join(scratch, name), compression="zstd")
        storage.upload_file(os.path.join(scratch, name), storage.join(out, name))


def run_prepare(cfg: DataConfig, tokenizer_spec: str, out: str, force: bool = False) -> dict:
    """Prepare examples into `out` (a local directory or an s3:// prefix); returns the metadata written.

    A committed output made from the same config and tokenizer is reused, an uncommitted one redone;
    committed output of another config is replaced only with force=True (orchestrator/commits.py).
    """
    import ray

    from jobs.adapt.sources import load_tokenizer
    from orchestrator.ray_runtime import ensure_ray

    digest = config_digest(cfg, tokenizer_spec)
    existing = reusable(out, METADATA, digest, force)
    if existing is not None:
        return existing
    tokenizer = load_tokenizer(tokenizer_spec)
    if not getattr(tokenizer, "backend_tokenizer", None):
        raise UserError(f"the tokenizer of {tokenizer_spec} is not a fast (Rust) tokenizer; t5adapt needs one "
                        "(save it with tokenizer.json)")
    plan = make_plan(cfg, tokenizer)
    files = []
    for source_index, source in enumerate(cfg.corpus):
        for file_index, path in enumerate(list_files(source, f"data.corpus[{source_index}]")):
            files.append({"source": source_index, "file_index": file_index, "path": path,
                          "format": file_format(path, source.format), "text_field": source.text_field})
    ensure_ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    started = time.perf_counter()
    tokenizer_ref = [ray.put(tokenizer.backend_tokenizer.to_str())]
    # One block per file, so every tokenizer actor gets work.
    tokenized = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        TokenizeFiles, fn_constructor_kwargs={"tokenizer_json_ref": tokenizer_ref, "eos_id": tokenizer.eos_token_id,
                                              "documents_per_piece": cfg.documents_per_piece},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.num_tokenizer_workers), num_cpus=1).materialize()
    pieces_meta = tokenized.drop_columns(["tokens"]).take_all()
    log.info("tokenized %d files into %d pieces in %.1f s", len(files), len(pieces_meta), time.perf_counter() - started)
    # Ray Data's own account of the tokenize operator (without actor and executor start-up).
    operator = re.search(r"TokenizeFiles\): .* in ([\d.]+)s", tokenized.stats())
    if operator:
        log.info("tokenize operator ran %s s", operator[1])
    errors = [m for m in pieces_meta if m["error"]]
    if errors:
        raise UserError(f"cannot read corpus file {errors[0]['path']}: {errors[0]['error']}")
    visits = schedule(pieces_meta, [s.weight for s in cfg.corpus], plan, cfg.seed)
    visits_by_piece: Dict[tuple, List[dict]] = {}
    for visit in visits:
        visits_by_piece.setdefault((visit["source"], visit["file_index"], visit["piece"]), []).append(visit)

    staging = staging_dir(out)
    started = time.perf_counter()
    stats = tokenized.map_batches(
        _build_and_write, fn_kwargs={"visits_by_piece": visits_by_piece, "plan": plan, "seed": cfg.seed, "out": staging},
        batch_size=1, num_cpus=1).take_all()
    log.info("built and wrote %d examples in %.1f s", sum(s["examples"] for s in stats), time.perf_counter() - started)
    metadata = _metadata(cfg, tokenizer_spec, tokenizer, plan, pieces_meta, visits, stats, digest)
    storage.write_text(storage.join(staging, METADATA), json.dumps(metadata, indent=1))
    commit(staging, out)
    return metadata


def _metadata(cfg, tokenizer_spec, tokenizer, plan: ExamplePlan, pieces_meta, visits, stats, digest) -> dict:
    stats = sorted(stats, key=lambda s: s["position"])
    visit_at = {v["position"]: v for v in visits}
    bad_by_file: Dict[str, Counter] = {}
    for meta in pieces_meta:
        bad_by_file.setdefault(meta["path"], Counter()).update(json.loads(meta["bad"]))
    bad_total = sum((c for c in bad_by_file.values()), Counter())
    examples = sum(s["examples"] for s in stats)
    real_tokens = sum(s["input_tokens"] + s["label_tokens"] for s in stats)
    per_denoiser = sum((Counter({int(k): v for k, v in json.loads(s["denoisers"]).items()}) for s in stats), Counter())
    sources = []
    for index, source in enumerate(cfg.corpus):
        own = [m for m in pieces_meta if m["source"] == index]
        own_visits = [v for v in visits if v["source"] == index]
        sources.append({"path": source.path, "weight": source.weight, "files": len({m["path"] for m in own}),
                        "documents": sum(m["num_documents"] for m in own), "tokens": sum(m["num_tokens"] for m in own),
                        "examples": sum(v["count"] for v in own_visits),
                        "passes": max([v["repeat"] + 1 for v in own_visits] or [0])})
    return {
        "format_version": 1,
        "config_hash": digest,
        "tokenizer": tokenizer_spec,
        "vocab_size": len(tokenizer),
        "bos_id": plan.bos_id, "eos_id": plan.eos_id, "pad_id": plan.pad_id,
        "objective": cfg.objective,
        "seed": cfg.seed,
        "encoder_length": cfg.encoder_length,
        "decoder_length": cfg.decoder_length,
        **denoising_tokens(plan, tokenizer),  # sentinel_ids, sentinel_tokens, mode_tokens, denoisers
        "num_examples": examples,
        "examples_per_denoiser": [per_denoiser.get(i, 0) for i in range(len(plan.denoisers))],
        # One Parquet file per piece visit, in output order, with where its examples came from.
        "files": [{"name": s["file"], "examples": s["examples"], "first_example": v["start"], "source": v["source"],
                   "corpus_file": v["path"], "piece": v["piece"], "pass": v["repeat"]}
                  for s, v in ((s, visit_at[s["position"]]) for s in stats)],
        "padding_fraction": 1.0 - real_tokens / max(1, examples * (cfg.encoder_length + cfg.decoder_length)),
        "tokens_unused_at_piece_ends": sum(v["num_tokens"] for v in visits) - sum(s["used_tokens"] for s in stats),
        "sources": sources,
        "bad_rows": {"total": sum(bad_total.values()), "by_reason": {r: bad_total.get(r, 0) for r in BAD_REASONS},
                     "by_file": {path: dict(c) for path, c in sorted(bad_by_file.items()) if c}},
        "config": asdict(cfg),
    }


def log_to_mlflow(tracking, root: str, job_name: str, metadata: dict, out: str) -> str:
    """The prepare stage as an MLflow run: data config as params; counts and padding as metrics;
    metadata.json (per-file bad-row counts, sentinel choice) as an artifact."""
    from orchestrator.tracking import flatten, log_stage_run

    bad = metadata["bad_rows"]
    metrics = {"num_examples": metadata["num_examples"], "padding_fraction": metadata["padding_fraction"],
               "bad_rows": bad["total"], "tokens_unused_at_piece_ends": metadata["tokens_unused_at_piece_ends"],
               **{f"bad_rows.{reason}": n for reason, n in bad["by_reason"].items()}}
    for i, source in enumerate(metadata["sources"]):
        metrics.update({f"source{i}.{k}": source[k] for k in ("documents", "tokens", "examples", "passes")})
    params = {**flatten("data", metadata["config"]), "data.tokenizer_source": metadata["tokenizer"]}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="t5adapt-mlflow-") as scratch:
        path = os.path.join(scratch, METADATA)
        with open(path, "w") as f:
            json.dump(metadata, f, indent=1)
        return log_stage_run(tracking, root, f"{job_name}/prepare", params, metrics, artifacts=[path],
                             tags={"t5adapt.stage": "prepare", "t5adapt.output": out,
                                   "t5adapt.config_hash": metadata["config_hash"]})
