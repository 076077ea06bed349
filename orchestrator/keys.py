"""Stage keys: which config fields change a stage's output bytes, and where that output lives.

A key is a hash of the stage name, those fields (with the identity of the files the stage reads:
corpus files, source checkpoints) and the keys of its inputs (jobs/core/commits.stage_key). Fields
that only change how fast or where work runs (worker counts, checkpoint cadence, retries, storage
locations) stay out, so changing them reuses finished work; a field that changes the bytes makes a
new output beside the old one, which stays reusable. Outputs live at STORE/<stage>-<key>.
"""

import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from jobs.core import storage
from jobs.core.commits import stage_key
from jobs.core.sources import source_identity
from jobs.train.batches import DATA_ORDER

STAGES = ("prepare", "adapt", "teacher", "train", "evaluate", "export")  # teacher: only with a precomputed one
# Fields that never change a stage's output bytes.
_DATA_NOT_KEYED = ("num_tokenizer_workers", "tokenizer")  # the tokenizer enters by identity
_TRAIN_NOT_KEYED = ("max_failures", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "cpus_per_worker",
                    "gpus_per_worker", "peak_tflops_per_device", "global_batch_size", "heldout_examples",
                    "placement_strategy")
_DISTILL_NOT_KEYED = ("teacher_workers", "teacher_cpus")
# How the teacher stage lays out what it stores (jobs/core/teacher_io.py): a new layout is a new key.
TEACHER_LAYOUT = "BOS + prefix + target[:-1]; top-k log-softmax at T=1, float32; no EOS, no R/X"


def uses_teacher_stage(job) -> bool:
    return job.train.distill.enabled and job.train.distill.teacher == "precomputed"


def train_fields(train_cfg) -> dict:
    """The train fields in the train key. Fields added later stay out while they are off (no
    distillation, no encoder warm-up), so adding them changed no existing key."""
    fields = {k: v for k, v in asdict(train_cfg).items() if k not in _TRAIN_NOT_KEYED}
    if train_cfg.distill.enabled:
        fields["distill"] = {k: v for k, v in fields["distill"].items() if k not in _DISTILL_NOT_KEYED}
    else:
        del fields["distill"]
    if not train_cfg.encoder_warmup_steps:
        del fields["encoder_warmup_steps"]
    fields["data_order"] = DATA_ORDER
    return fields


@dataclass(frozen=True)
class Stage:
    name: str
    key: str
    output: str  # a local directory or an s3:// prefix
    inputs: Dict[str, str]  # input stage name -> its key


def tokenizer_spec(job) -> str:
    return job.data.tokenizer or job.adapt.source


def prepare_key(data_cfg, tokenizer: str) -> str:
    from jobs.data.corpus import corpus_identity

    fields = {k: v for k, v in asdict(data_cfg).items() if k not in _DATA_NOT_KEYED}
    fields.update(tokenizer=[tokenizer, source_identity(tokenizer)], corpus_files=corpus_identity(data_cfg.corpus))
    return stage_key("prepare", fields)


def adapt_key(adapt_cfg, denoising: Optional[dict]) -> str:
    """`denoising`: the sentinel/mode-token plan the adapted tokenizer records (not the rest of data.*)."""
    sources = [source_identity(adapt_cfg.source)]
    if adapt_cfg.decoder_source not in (None, adapt_cfg.source):
        sources.append(source_identity(adapt_cfg.decoder_source))
    return stage_key("adapt", {"adapt": asdict(adapt_cfg), "sources": sources, "denoising": denoising})


def denoising_plan(job) -> dict:
    """The sentinel and mode tokens preprocessing with job.data uses (jobs/data/plan.py), resolved
    against the tokenizer: adapt records it, so it is part of adapt's key."""
    from jobs.core.sources import load_tokenizer
    from jobs.data.plan import denoising_tokens, make_plan

    tokenizer = load_tokenizer(tokenizer_spec(job))
    return denoising_tokens(make_plan(job.data, tokenizer), tokenizer)


def store_of(job, root: str) -> str:
    """Where stage outputs live: job.store (a directory or s3:// prefix), else ROOT/stages."""
    store = job.store or storage.join(root, "stages")
    return store if storage.is_s3(store) else os.path.abspath(store)


def plan_stages(job, root: str, denoising: dict, outputs: Optional[Dict[str, str]] = None) -> Dict[str, Stage]:
    """Every stage's key, inputs and output location. `outputs` overrides a stage's location (the
    `--out` of `t5adapt prepare|adapt|export`); the key stays what it is."""
    keys: Dict[str, str] = {}
    teacher = uses_teacher_stage(job)
    inputs = {"prepare": {}, "adapt": {}, "teacher": ("prepare",),
              "train": ("prepare", "adapt", "teacher") if teacher else ("prepare", "adapt"),
              "evaluate": ("prepare", "train"), "export": ("train", "evaluate")}
    keys["prepare"] = prepare_key(job.data, tokenizer_spec(job))
    keys["adapt"] = adapt_key(job.adapt, denoising)
    if teacher:
        distill = job.train.distill
        keys["teacher"] = stage_key("teacher", {"top_k": distill.top_k, "batch_size": distill.teacher_batch_size,
                                                "source": source_identity(job.adapt.source), "layout": TEACHER_LAYOUT},
                                    {"prepare": keys["prepare"]})
    keys["train"] = stage_key("train", train_fields(job.train), {k: keys[k] for k in inputs["train"]})
    keys["evaluate"] = stage_key("evaluate", {"evaluate": asdict(job.evaluate), "source": source_identity(job.adapt.source)},
                                 {k: keys[k] for k in inputs["evaluate"]})
    keys["export"] = stage_key("export", {}, {k: keys[k] for k in inputs["export"]})
    store = store_of(job, root)
    outputs = outputs or {}
    return {name: Stage(name, keys[name], outputs.get(name) or storage.join(store, f"{name}-{keys[name]}"),
                        {k: keys[k] for k in inputs[name]})
            for name in STAGES if name in keys}


def changed_train_fields(old_config_yaml: str, job) -> Dict[str, tuple]:
    """{"train.<field>": (old, new)} for the keyed train fields that differ between a run's previous
    resolved config (its config.yaml) and `job`."""
    import yaml

    old = (yaml.safe_load(old_config_yaml) or {}).get("train") or {}
    new = asdict(job.train)
    changed = {f"train.{k}": (old.get(k), v) for k, v in new.items()
               if k not in _TRAIN_NOT_KEYED + ("distill",) and old.get(k) != v}
    old_distill, new_distill = old.get("distill") or {}, new["distill"]
    if old_distill.get("enabled", False) or new_distill["enabled"]:
        changed.update({f"train.distill.{k}": (old_distill.get(k), v) for k, v in new_distill.items()
                        if k not in _DISTILL_NOT_KEYED and old_distill.get(k) != v})
    return changed


def run_key(job, stages: Dict[str, Stage]) -> str:
    """One adaptation run: its name and the key of its last stage (which covers all the others)."""
    return stage_key("run", {"name": job.name}, {"export": stages["export"].key})
