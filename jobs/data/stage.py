"""The prepare stage: corpus files -> Parquet shards of UL2 / PrefixLM examples, on Ray Data.

  1. tokenize (Ray Data, actors: the tokenizer loads once per worker): each file is read
     (decompressed if .gz/.zst), bad rows are skipped and counted, held-out documents are set aside
     (jobs/data/corpus.py: hold_out), the training documents are grouped into pieces, tokenized,
     joined with EOS.
  2. schedule (driver, token counts only): pieces of all sources are interleaved in proportion to
     the sources' weights (a source is cycled to fill its share), and each piece visit gets its
     range of global example indices. A source that yields no document, or no example, stops the
     run here with the reasons and the fix.
  3. build (Ray Data tasks): each visit cuts, corrupts and writes its examples to one Parquet file
     named by its position, so the output is the same whatever the parallelism.
  4. held out (driver): held-out documents, in the order of their draws, up to
     data.heldout_max_tokens, go to heldout/documents.parquet, and examples made from them exactly
     as training examples are (their own indices from 0) to heldout/examples.parquet.
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
from jobs.data.corpus import (BAD_HINTS, BAD_REASONS, file_format, hold_out, list_files, pieces, read_documents,
                              take_heldout)
from jobs.data.examples import build_examples, count_examples, examples_table
from jobs.data.plan import ExamplePlan, denoising_tokens, make_plan
from jobs.core import storage
from jobs.core.commits import commit, reusable, staging_dir
from jobs.core.errors import UserError
from jobs.core.examples_io import write_parquet

log = logging.getLogger("t5adapt.prepare")
METADATA = "metadata.json"
HELDOUT_EXAMPLES, HELDOUT_DOCUMENTS = "heldout/examples.parquet", "heldout/documents.parquet"
# Per tokenized row: the held-out documents of its file kept within budget (all on the file's last
# row, empty elsewhere); num_heldout counts all of them, over budget or not.
_HELDOUT_ARRAYS = ("heldout_tokens", "heldout_lengths", "heldout_draws", "heldout_documents")


class TokenizeFiles:
    """Ray Data actor: file rows in, one row per piece out (tokens with EOS after each document).

    It builds the Rust tokenizer from its JSON (shipped once through the object store, in a list so
    Ray hands the reference over unresolved): no transformers import and no pickled tokenizer per
    worker, which cost ~10 s per actor for Gemma's 262k vocabulary.
    """

    def __init__(self, tokenizer_json_ref: list, eos_id: int, documents_per_piece: int, seed: int,
                 heldout_fraction: float, heldout_max_tokens: int):
        import ray
        from tokenizers import Tokenizer

        # One tokenizer thread per actor: Ray gave this actor one CPU; parallelism comes from actors.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tokenizer = Tokenizer.from_str(ray.get(tokenizer_json_ref[0]))
        # Text that spells a special token ("<unused7>") is split into ordinary pieces, never turned into it.
        self.tokenizer.encode_special_tokens = True
        self.documents_per_piece = documents_per_piece
        self.seed, self.heldout_fraction, self.heldout_max_tokens = seed, heldout_fraction, heldout_max_tokens
        self.eos = np.array([eos_id], dtype=np.int32)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        out = {k: [] for k in ("source", "file_index", "path", "piece", "num_documents", "num_tokens", "tokens", "bad",
                               "error", *_HELDOUT_ARRAYS, "num_heldout")}
        for source, file_index, path, fmt, field in zip(batch["source"], batch["file_index"], batch["path"],
                                                        batch["format"], batch["text_field"]):
            bad, reported, piece, heldout = Counter(), Counter(), -1, []
            try:
                training = hold_out(read_documents(path, fmt, field, bad), self.heldout_fraction, self.seed,
                                    int(source), int(file_index), heldout)
                for piece, documents in pieces(training, self.documents_per_piece):
                    tokens = self._tokenize(documents)
                    # Each piece reports the bad rows read since the previous one.
                    self._append(out, source, file_index, path, piece, len(documents), tokens, dict(bad - reported), "")
                    reported = Counter(bad)
                if bad - reported:  # bad rows after the last full piece
                    self._append(out, source, file_index, path, piece + 1, 0, np.empty(0, np.int32), dict(bad - reported), "")
                self._set_heldout(out, heldout)
            except (OSError, ValueError) as e:
                self._append(out, source, file_index, path, -1, 0, np.empty(0, np.int32), {}, f"{type(e).__name__}: {e}")
        return out

    def _tokenize(self, documents: List[str]) -> np.ndarray:
        if not documents:
            return np.empty(0, np.int32)
        encodings = self.tokenizer.encode_batch_fast(documents, add_special_tokens=False)
        return np.concatenate([np.concatenate([np.asarray(e.ids, dtype=np.int32), self.eos]) for e in encodings])

    def _set_heldout(self, out: Dict[str, list], heldout: List[tuple]) -> None:
        """The file's held-out documents onto its last row, in draw order, tokenized, each with EOS.
        Only the longest draw-order prefix within data.heldout_max_tokens is kept: the driver takes
        a draw-order prefix of the whole corpus within that budget, so no document past it here
        could be chosen there."""
        heldout.sort()
        kept, total = [], 0
        for start in range(0, len(heldout), 256):
            chunk = heldout[start:start + 256]
            for (draw, document, _), encoding in zip(chunk, self.tokenizer.encode_batch_fast(
                    [text for _, _, text in chunk], add_special_tokens=False)):
                tokens = np.concatenate([np.asarray(encoding.ids, dtype=np.int32), self.eos])
                if total + len(tokens) > self.heldout_max_tokens:
                    break
                kept.append((draw, document, tokens))
                total += len(tokens)
            if len(kept) < start + len(chunk):
                break
        out["heldout_tokens"][-1] = np.concatenate([t for _, _, t in kept]) if kept else np.empty(0, np.int32)
        out["heldout_lengths"][-1] = np.array([len(t) for _, _, t in kept], dtype=np.int64)
        out["heldout_draws"][-1] = np.array([d for d, _, _ in kept], dtype=np.float64)
        out["heldout_documents"][-1] = np.array([n for _, n, _ in kept], dtype=np.int64)
        out["num_heldout"][-1] = len(heldout)

    @staticmethod
    def _append(out, source, file_index, path, piece, num_documents, tokens, bad, error):
        for key, value in (("source", int(source)), ("file_index", int(file_index)), ("path", str(path)), ("piece", piece),
                           ("num_documents", num_documents), ("num_tokens", len(tokens)), ("tokens", tokens),
                           ("bad", json.dumps(bad)), ("error", error), ("heldout_tokens", np.empty(0, np.int32)),
                           ("heldout_lengths", np.empty(0, np.int64)), ("heldout_draws", np.empty(0, np.float64)),
                           ("heldout_documents", np.empty(0, np.int64)), ("num_heldout", 0)):
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
    stats = {k: [] for k in ("position", "file", "examples", "input_tokens", "label_tokens", "used_tokens", "denoisers")}
    for source, file_index, piece, tokens in zip(batch["source"], batch["file_index"], batch["piece"], batch["tokens"]):
        for visit in visits_by_piece.get((int(source), int(file_index), int(piece)), []):
            if not visit["count"]:
                continue  # a piece too short for even one example
            columns = build_examples(np.asarray(tokens, dtype=np.int32), visit["start"], visit["count"], plan, seed)
            name = f"part-{visit['position']:06d}.parquet"
            write_parquet(examples_table(columns), out, name)
            lengths = [len(x) for x in columns["input_ids"]], [len(y) for y in columns["labels"]]
            used = sum(plan.denoisers[d].raw_length for d in columns["denoiser"])
            for key, value in (("position", visit["position"]), ("file", name), ("examples", visit["count"]),
                               ("input_tokens", sum(lengths[0])), ("label_tokens", sum(lengths[1])),
                               ("used_tokens", used), ("denoisers", json.dumps(Counter(columns["denoiser"])))):
                stats[key].append(value)
    return stats


def _write_heldout(kept: List[tuple], plan: ExamplePlan, seed: int, out: str) -> dict:
    """heldout/documents.parquet (tokens, source) and heldout/examples.parquet, built from the kept
    documents packed with EOS exactly like a training piece, example indices from 0."""
    import pyarrow as pa

    stream = np.concatenate([tokens for *_, tokens in kept]) if kept else np.empty(0, np.int32)
    count = count_examples(len(stream), 0, plan, seed)
    columns = build_examples(stream, 0, count, plan, seed)
    write_parquet(examples_table(columns), out, HELDOUT_EXAMPLES)
    write_parquet(pa.table({"tokens": pa.array([tokens for *_, tokens in kept], pa.list_(pa.int32())),
                             "source": pa.array([source for source, *_ in kept], pa.int32())}), out, HELDOUT_DOCUMENTS)
    per_denoiser = Counter(columns["denoiser"])
    return {"documents": len(kept), "tokens": len(stream), "examples": count,
            "examples_per_denoiser": [per_denoiser.get(i, 0) for i in range(len(plan.denoisers))],
            "files": [HELDOUT_EXAMPLES, HELDOUT_DOCUMENTS]}


def run_prepare(cfg: DataConfig, tokenizer_spec: str, out: str, key: str, force: bool = False) -> dict:
    """Prepare examples into `out` (a local directory or an s3:// prefix); returns the metadata written.

    `key` is the stage key the controller derived from this config and the corpus files' identity;
    it is recorded as metadata.json's config_hash. A committed output of the same key is reused, an
    uncommitted one redone; committed output of another key is replaced only with force=True
    (jobs/core/commits.py).
    """
    import ray

    from jobs.core.sources import load_tokenizer
    from jobs.core.ray_runtime import ensure_ray

    digest = key
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
                                              "documents_per_piece": cfg.documents_per_piece, "seed": cfg.seed,
                                              "heldout_fraction": cfg.heldout_fraction,
                                              "heldout_max_tokens": cfg.heldout_max_tokens},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.num_tokenizer_workers), num_cpus=1).materialize()
    pieces_meta = tokenized.drop_columns(["tokens"]).take_all()
    # The held-out tokens stay on the driver, out of the piece records that travel to the build tasks.
    heldout_rows = [{"source": meta["source"], "file_index": meta["file_index"], **{k: meta.pop(k) for k in _HELDOUT_ARRAYS}}
                    for meta in pieces_meta]
    log.info("tokenized %d files into %d pieces in %.1f s", len(files), len(pieces_meta), time.perf_counter() - started)
    # Ray Data's own account of the tokenize operator (without actor and executor start-up).
    operator = re.search(r"TokenizeFiles\): .* in ([\d.]+)s", tokenized.stats())
    if operator:
        log.info("tokenize operator ran %s s", operator[1])
    errors = [m for m in pieces_meta if m["error"]]
    if errors:
        raise UserError(f"cannot read corpus file {errors[0]['path']}: {errors[0]['error']}")
    _check_documents(cfg, files, pieces_meta)
    visits = schedule(pieces_meta, [s.weight for s in cfg.corpus], plan, cfg.seed)
    _check_examples(cfg, plan, pieces_meta, visits)
    visits_by_piece: Dict[tuple, List[dict]] = {}
    for visit in visits:
        visits_by_piece.setdefault((visit["source"], visit["file_index"], visit["piece"]), []).append(visit)

    staging = staging_dir(out)
    started = time.perf_counter()
    stats = tokenized.select_columns(["source", "file_index", "piece", "tokens"]).map_batches(
        _build_and_write, fn_kwargs={"visits_by_piece": visits_by_piece, "plan": plan, "seed": cfg.seed, "out": staging},
        batch_size=1, num_cpus=1).take_all()
    log.info("built and wrote %d examples in %.1f s", sum(s["examples"] for s in stats), time.perf_counter() - started)
    written = {"documents": 0, "tokens": 0, "examples": 0, "examples_per_denoiser": [0] * len(plan.denoisers), "files": []}
    if cfg.heldout_fraction > 0:
        written = _write_heldout(take_heldout(heldout_rows, cfg.heldout_max_tokens), plan, cfg.seed, staging)
    heldout = {"fraction": cfg.heldout_fraction, "max_tokens": cfg.heldout_max_tokens, **written,
               "documents_over_budget": sum(int(m["num_heldout"]) for m in pieces_meta) - written["documents"]}
    metadata = _metadata(cfg, tokenizer_spec, tokenizer, plan, pieces_meta, visits, stats, heldout, digest)
    storage.write_text(storage.join(staging, METADATA), json.dumps(metadata, indent=1))
    commit(staging, out)
    return metadata


def _check_documents(cfg: DataConfig, files: List[dict], pieces_meta: List[dict]) -> None:
    """A source that yields no training document fails here, naming its files, the bad-row reasons
    with counts and the likely fix, instead of committing a dataset without it."""
    for index, source in enumerate(cfg.corpus):
        own = [m for m in pieces_meta if m["source"] == index]
        if sum(m["num_documents"] for m in own):
            continue
        key = f"data.corpus[{index}]"
        paths = sorted({f["path"] for f in files if f["source"] == index})
        named = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        formats = ", ".join(sorted({f["format"] for f in files if f["source"] == index}))
        heldout = sum(int(m["num_heldout"]) for m in own)
        if heldout:
            raise UserError(f"{key} ({source.path}) has {heldout} usable documents, all held out of training by "
                            f"data.heldout_fraction={cfg.heldout_fraction}: add documents to it or lower "
                            "data.heldout_fraction")
        bad = sum((Counter(json.loads(m["bad"])) for m in own), Counter())
        if not bad:
            raise UserError(f"{key} ({source.path}) holds no rows at all in {len(paths)} file(s) ({named}): "
                            f"are they empty? Check {key}.path")
        reasons = ", ".join(f"{reason} {count}" for reason, count in bad.most_common())
        hint = BAD_HINTS[bad.most_common(1)[0][0]].format(field=source.text_field)
        raise UserError(f"{key} ({source.path}) yields no usable document: all {sum(bad.values())} rows of its "
                        f"{len(paths)} file(s) ({named}) are bad ({reasons}); {hint}. Check {key}.text_field "
                        f"(now {source.text_field!r}) and {key}.format (now {source.format}, read as {formats})")


def _check_examples(cfg: DataConfig, plan: ExamplePlan, pieces_meta: List[dict], visits: List[dict]) -> None:
    """A source whose pieces are all too short for one example fails here, naming the lengths."""
    raw = sorted(d.raw_length for d in plan.denoisers)
    for index, source in enumerate(cfg.corpus):
        if sum(v["count"] for v in visits if v["source"] == index):
            continue
        own = [m for m in pieces_meta if m["source"] == index]
        need = f"{raw[0]}" if raw[0] == raw[-1] else f"{raw[0]} to {raw[-1]}"
        raise UserError(
            f"data.corpus[{index}] ({source.path}) yields no example: its {sum(m['num_documents'] for m in own)} "
            f"training documents hold {sum(m['num_tokens'] for m in own)} tokens, its longest piece "
            f"{max(m['num_tokens'] for m in own)}, but one example consumes {need} tokens at "
            f"data.encoder_length={cfg.encoder_length} and data.decoder_length={cfg.decoder_length}: add text, "
            "raise data.documents_per_piece, or lower data.encoder_length / data.decoder_length")


def _metadata(cfg, tokenizer_spec, tokenizer, plan: ExamplePlan, pieces_meta, visits, stats, heldout, digest) -> dict:
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
                        # Training documents and their tokens; held-out ones (kept or over budget) apart.
                        "documents": sum(m["num_documents"] for m in own), "tokens": sum(m["num_tokens"] for m in own),
                        "heldout_documents": sum(int(m["num_heldout"]) for m in own),
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
        # Documents never trained on, and examples made from them (heldout/, see _write_heldout).
        "heldout": heldout,
        "bad_rows": {"total": sum(bad_total.values()), "by_reason": {r: bad_total.get(r, 0) for r in BAD_REASONS},
                     "by_file": {path: dict(c) for path, c in sorted(bad_by_file.items()) if c}},
        "config": asdict(cfg),
    }


def tracking_record(metadata: dict) -> tuple:
    """(params, metrics) that describe a prepare output in MLflow: the data config as params; counts
    and padding as metrics."""
    from jobs.core.tracking import flatten

    bad = metadata["bad_rows"]
    metrics = {"num_examples": metadata["num_examples"], "padding_fraction": metadata["padding_fraction"],
               "bad_rows": bad["total"], "tokens_unused_at_piece_ends": metadata["tokens_unused_at_piece_ends"],
               **{f"bad_rows.{reason}": n for reason, n in bad["by_reason"].items()},
               **{f"heldout.{k}": metadata["heldout"][k] for k in ("documents", "tokens", "examples")}}
    for i, source in enumerate(metadata["sources"]):
        metrics.update({f"source{i}.{k}": source[k] for k in ("documents", "tokens", "examples", "passes")})
    params = {**flatten("data", metadata["config"]), "data.tokenizer_source": metadata["tokenizer"]}
    return params, metrics
