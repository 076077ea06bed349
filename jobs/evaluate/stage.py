"""The evaluate stage: a trained encoder-decoder + its decoder-only source + held-out data ->
evaluation.json and evaluation.md, as a commit (jobs/core/commits.py).

  1. held-out loss: the training objective on held-out examples, overall and per denoiser
  2. adaptation probe: does the encoder help? (probe.py: four target cross-entropies)
  3. inference cost: the same fixed workload on both models (cost.py)
  4. samples: greedy continuations of held-out prefixes by both models
The controller calls run_evaluate and logs what it returns; this stage opens no MLflow run.
"""

import json
import logging
import os
import time
from dataclasses import asdict

import torch

from jobs.core import storage
from jobs.core.commits import commit, reusable, staging_dir
from jobs.core.examples_io import read_heldout_documents, read_heldout_examples
from jobs.evaluate.config import EvaluateConfig
from jobs.evaluate.cost import causal_cost, cost_input, parameter_counts, seq2seq_cost, source_parameter_counts
from jobs.evaluate.heldout import heldout_loss
from jobs.evaluate.probe import HOW, LAYOUT, cut_passages, probe
from jobs.evaluate.report import evaluation_markdown, evaluation_table
from jobs.evaluate.samples import sample_generations

log = logging.getLogger("t5adapt.evaluate")
RESULT = "evaluation.json"
REPORT = "evaluation.md"


def run_evaluate(cfg: EvaluateConfig, model_dir: str, source_spec: str, data_dir: str, out: str, key: str,
                 force: bool = False) -> dict:
    """Evaluate the encoder-decoder in `model_dir` (a Hugging Face directory, local or s3://) against
    its decoder-only source (`source_spec`: builtin:*, a directory, a .gguf, s3://) on the held-out
    split of the prepared data in `data_dir`. Writes evaluation.json and evaluation.md to `out`
    (local or s3://) as a commit and returns the evaluation dict ("config_hash": key). A committed
    output of the same key is reused without recomputing; another key's is replaced only with force.
    """
    existing = reusable(out, RESULT, key, force)
    if existing is not None:
        return existing
    evaluation = evaluate(cfg, model_dir, source_spec, data_dir)
    evaluation["config_hash"] = key
    staging = staging_dir(out)
    storage.write_text(storage.join(staging, RESULT), json.dumps(evaluation, indent=1))
    storage.write_text(storage.join(staging, REPORT), evaluation_markdown(evaluation))
    commit(staging, out)
    log.info("evaluation written to %s\n%s", out, evaluation_table(evaluation))
    return evaluation


def evaluate(cfg: EvaluateConfig, model_dir: str, source_spec: str, data_dir: str, progress: bool = True) -> dict:
    """The evaluation dict (evaluation.json's content, without config_hash); nothing is written."""
    started = time.perf_counter()
    timings = {}

    def lap(name):
        nonlocal started
        now = time.perf_counter()
        timings[name] = round(now - started, 3)
        started = now

    model, tokenizer = load_model(model_dir, source_spec)
    source = load_source(source_spec)
    lap("load_s")
    metadata, rows = read_heldout_examples(data_dir, limit=cfg.max_examples)
    documents = read_heldout_documents(data_dir)
    log.info("evaluating on %d held-out examples and %d held-out documents", len(rows["input_ids"]), len(documents))
    loss = heldout_loss(model, rows, metadata, cfg.batch_size, progress)
    lap("heldout_loss_s")

    prefixes, targets = cut_passages(documents, cfg.probe_prefix_tokens, cfg.probe_target_tokens, cfg.probe_passages)
    probe_result = {"passages": len(prefixes), "prefix_tokens": cfg.probe_prefix_tokens,
                    "target_tokens": cfg.probe_target_tokens, "how": HOW, "layout": LAYOUT}
    if len(prefixes):
        probe_result.update(probe(model, source, prefixes, targets, metadata, cfg.batch_size, progress))
    else:
        log.warning("no held-out document has %d tokens: the adaptation probe is skipped (lower "
                    "evaluate.probe_prefix_tokens / probe_target_tokens)", cfg.probe_prefix_tokens + cfg.probe_target_tokens)
    lap("probe_s")

    log.info("evaluate: measuring inference cost (%d in, %d out, median of %d)", cfg.cost_input_tokens,
             cfg.cost_output_tokens, cfg.cost_repeats)
    inputs = cost_input(documents, cfg.cost_input_tokens)
    cost = {"input_tokens": cfg.cost_input_tokens, "output_tokens": cfg.cost_output_tokens, "repeats": cfg.cost_repeats,
            "input": "the held-out documents as one stream, its first tokens (repeated when too short)",
            "torch_threads": torch.get_num_threads(),
            "model": {"parameters": parameter_counts(model),
                      **seq2seq_cost(model, inputs, cfg.cost_output_tokens, cfg.cost_repeats)},
            "source": {"parameters": source_parameter_counts(source),
                       **causal_cost(source, inputs, cfg.cost_output_tokens, cfg.cost_repeats)}}
    lap("cost_s")

    count = min(cfg.num_samples, len(prefixes))
    samples = sample_generations(model, source, tokenizer, prefixes[:count], targets[:count], metadata,
                                 cfg.sample_new_tokens)
    lap("samples_s")
    return {"model": model_dir, "source": source_spec, "data": data_dir, "model_class": type(model).__name__,
            "heldout": loss, "probe": probe_result, "cost": cost, "samples": samples, "timings_s": timings,
            "config": asdict(cfg)}


def load_model(model_dir: str, source_spec: str):
    """(model, tokenizer): the encoder-decoder in float32, eval mode, and its own tokenizer (the
    source's when the directory has none)."""
    from transformers import AutoTokenizer

    from jobs.core.pretrained import load_seq2seq
    from jobs.core.sources import load_tokenizer

    local = storage.local_copy(model_dir)
    log.info("evaluate: loading %s", model_dir)
    model = load_seq2seq(local).eval()
    has_tokenizer = any(os.path.isfile(os.path.join(local, f)) for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(local) if has_tokenizer else load_tokenizer(source_spec)
    return model, tokenizer


def load_source(source_spec: str):
    from jobs.core.sources import load_causal_lm

    log.info("evaluate: loading the source %s", source_spec)
    return load_causal_lm(source_spec, torch.float32)
