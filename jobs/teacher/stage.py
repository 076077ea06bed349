"""The teacher stage: prepared examples + the decoder-only source -> the source's top-k log-probs
for every PrefixLM (S) target token, stored beside the prepared data for distillation
(train.distill.teacher=precomputed).

Ray Data runs the teacher on its own actors (train.distill.teacher_workers, each loading the source
once): one task per prepared Parquet part, written as a file of the same name holding, row for row,
example_index and the flattened top-k ids (int32) and log-probs (float32, temperature 1) of each
example; R/X rows store empty lists (jobs/core/teacher_io.py has the layout). Training reads each
part's file beside the part (jobs/train/batches.RankReader). The output is a commit with its own
stage key, so the controller skips a finished one and rebuilds when its key changes.
"""

import json
import logging
import time
from typing import Dict, List

import numpy as np

from jobs.core import storage
from jobs.core.commits import commit, reusable, staging_dir
from jobs.core.examples_io import COLUMNS, read_metadata, read_table, write_parquet
from jobs.core.teacher_io import TEACHER_COLUMNS, TEACHER_INFO, TeacherLayout, collate_online, teacher_topk

log = logging.getLogger("t5adapt.teacher")


class TeachParts:
    """A Ray Data actor: loads the source once, then writes the top-k of whole prepared parts."""

    def __init__(self, source_spec: str, data_dir: str, out: str, metadata: dict, top_k: int, batch_size: int,
                 threads: int):
        import torch

        from jobs.core.sources import load_causal_lm

        torch.set_num_threads(max(1, threads))
        self.teacher = load_causal_lm(source_spec, torch.float32)
        self.data_dir, self.out, self.top_k, self.batch_size = data_dir, out, top_k, batch_size
        self.layout = TeacherLayout.of(metadata)
        self.decoder_length = metadata["decoder_length"]

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        stats = {"name": [], "examples": [], "teacher_examples": [], "targets": [], "seconds": []}
        for name in batch["name"]:
            started = time.perf_counter()
            table = teach_part(self.teacher, read_table(self.data_dir, name, COLUMNS), self.layout, self.top_k,
                               self.batch_size, self.decoder_length)
            write_parquet(table, self.out, name)
            lengths = np.array([len(x) for x in table.column("teacher_ids").to_pylist()])
            stats["name"].append(name)
            stats["examples"].append(table.num_rows)
            stats["teacher_examples"].append(int((lengths > 0).sum()))
            stats["targets"].append(int(lengths.sum() // self.top_k))
            stats["seconds"].append(round(time.perf_counter() - started, 3))
        return stats


def teach_part(teacher, table, layout: TeacherLayout, top_k: int, batch_size: int, decoder_length: int):
    """The teacher table of one prepared part (an Arrow table of COLUMNS): example_index +
    TEACHER_COLUMNS, in the part's row order."""
    import pyarrow as pa
    import torch

    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
    ids: List[np.ndarray] = [np.zeros(0, np.int32)] * table.num_rows
    logprobs: List[np.ndarray] = [np.zeros(0, np.float32)] * table.num_rows
    with torch.no_grad():
        for start in range(0, table.num_rows, batch_size):
            chunk = {c: v[start:start + batch_size] for c, v in rows.items()}
            inputs = collate_online(chunk, layout, decoder_length)
            if not inputs["teacher_rows"].numel():
                continue
            soft = teacher_topk(teacher, inputs, top_k)
            targets = soft["teacher_mask"].sum(1).tolist()
            for row, count, top_ids, top_logprobs in zip(soft["teacher_rows"].tolist(), targets, soft["teacher_ids"],
                                                          soft["teacher_logprobs"]):
                ids[start + row] = top_ids[:count].numpy().astype(np.int32).ravel()
                logprobs[start + row] = top_logprobs[:count].numpy().astype(np.float32).ravel()
    return pa.table({"example_index": table.column("example_index"),
                     TEACHER_COLUMNS[0]: pa.array(ids, pa.list_(pa.int32())),
                     TEACHER_COLUMNS[1]: pa.array(logprobs, pa.list_(pa.float32()))})


def run_teacher(cfg, source_spec: str, data_dir: str, out: str, key: str, force: bool = False) -> dict:
    """Store the source's top-k log-probs (cfg: train.distill) for the S examples of the prepared data
    in `data_dir` into `out` (a directory or s3:// prefix) as a commit; returns teacher.json's content.
    A committed output of the same key is reused; another key's is replaced only with force."""
    import ray

    from jobs.core.ray_runtime import ensure_ray

    existing = reusable(out, TEACHER_INFO, key, force)
    if existing is not None:
        return existing
    metadata = read_metadata(data_dir)
    TeacherLayout.of(metadata)  # the data has S examples
    names = [f["name"] for f in metadata["files"]]
    staging = staging_dir(out)
    ensure_ray()
    started = time.perf_counter()
    threads = max(1, int(cfg.teacher_cpus))
    stats = ray.data.from_items([{"name": n} for n in names], override_num_blocks=len(names)).map_batches(
        TeachParts, fn_constructor_kwargs={"source_spec": source_spec, "data_dir": data_dir, "out": staging,
                                           "metadata": metadata, "top_k": cfg.top_k,
                                           "batch_size": cfg.teacher_batch_size, "threads": threads},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.teacher_workers), num_cpus=cfg.teacher_cpus).take_all()
    by_name = {s["name"]: s for s in stats}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RuntimeError(f"the teacher stage wrote no output for {len(missing)} parts (first: {missing[0]})")
    info = {"top_k": cfg.top_k, "teacher_batch_size": cfg.teacher_batch_size, "source": source_spec,
            "data": data_dir, "data_key": metadata["config_hash"], "logprobs": "log-softmax at temperature 1, float32",
            "examples": sum(s["examples"] for s in stats),
            "teacher_examples": sum(s["teacher_examples"] for s in stats),
            "targets": sum(s["targets"] for s in stats), "seconds": round(time.perf_counter() - started, 1),
            "parts": [by_name[n] for n in names], "config_hash": key}
    storage.write_text(storage.join(staging, TEACHER_INFO), json.dumps(info, indent=1))
    commit(staging, out)
    log.info("teacher: top-%d log-probs of %d S examples (%d target tokens) in %s s", cfg.top_k,
             info["teacher_examples"], info["targets"], info["seconds"])
    return info


def tracking_record(info: dict) -> dict:
    """Metrics the teacher stage leaves in its MLflow run."""
    return {k: info[k] for k in ("examples", "teacher_examples", "targets", "seconds")}
