"""A training checkpoint -> a Hugging Face directory that plain transformers loads.

The ZeRO shards of every rank are consolidated into one fp32 state dict (DeepSpeed's zero_to_fp32
for stages 1-3; the module weights for stage 0), loaded into the adapted model's class, and saved
with the adapted checkpoint's tokenizer and generation config. If the checkpoint carries a probe
(the final one does), the export is reloaded from disk and its logits compared with the logits the
training engine gave the same batch; the difference is recorded in t5adapt_train.json.
"""

import json
import logging
import os
import shutil
from typing import Optional

import torch

from jobs.train import checkpoints
from jobs.core import storage
from jobs.core.commits import finish, local_staging, reusable

log = logging.getLogger("t5adapt.train")
INFO = "t5adapt_train.json"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
           "generation_config.json", "chat_template.jinja", "t5adapt_adapt.json")


def consolidated_state(checkpoint_local: str) -> dict:
    """One full fp32 state dict from a checkpoint directory holding DeepSpeed's `ds` tag."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = os.path.join(checkpoint_local, checkpoints.DS_TAG)
    # ZeRO 1-3 write per-rank optimizer files ("zero_pp_rank_*", "bf16_zero_pp_rank_*" under bf16),
    # which hold the fp32 master weights; zero_to_fp32 finds either.
    if any("zero_pp_rank_" in name and name.endswith("optim_states.pt") for name in os.listdir(ds_dir)):
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_local, tag=checkpoints.DS_TAG)
    # ZeRO stage 0: rank 0's model file holds the whole module.
    states = torch.load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export(storage_root: str, step: int, init_dir: str, out: str, config_hash: str, force: bool = False,
           verified: bool = False) -> dict:
    """Write checkpoint `step` of `storage_root` as a Hugging Face directory at `out` (local or s3://).
    Returns the info dict (also written as t5adapt_train.json). A committed export of the same
    checkpoint and config is reused. verified=True: the caller has just checked the checkpoint
    against its manifest, so it is not hashed again."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    digest = f"{config_hash}-step{step}"
    done = None if force else _reusable_quietly(out, digest)
    if done is not None:
        return done
    local_ckpt = checkpoints.fetch(storage_root, step)
    problem = None if verified else checkpoints.verify(storage_root, step, local_ckpt)
    if problem:
        from jobs.core.errors import UserError

        raise UserError(f"checkpoint {checkpoints.step_dir(storage_root, step)} is damaged ({problem}): "
                        "export an earlier one (t5adapt export --step N)")
    init_local = storage.local_copy(init_dir)
    local_out = local_staging(out)
    try:
        state = consolidated_state(local_ckpt)
        config = AutoConfig.from_pretrained(init_local)
        model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        untied = [k for k in missing if not _is_tied_alias(config, k)]
        if untied or unexpected:
            raise RuntimeError(f"checkpoint step {step} does not fit {type(model).__name__}: "
                               f"missing {untied[:5]}, unexpected {unexpected[:5]}")
        model.save_pretrained(local_out)
        for name in _COPIED:
            if os.path.exists(os.path.join(init_local, name)):
                shutil.copy(os.path.join(init_local, name), os.path.join(local_out, name))
        info = {"config_hash": digest, "checkpoint": checkpoints.step_dir(storage_root, step), "step": step,
                "init": init_dir, "probe_max_abs_diff": _check_probe(local_ckpt, local_out)}
        with open(os.path.join(local_out, INFO), "w") as f:
            json.dump(info, f, indent=1)
        finish(local_out, out)
        return info
    finally:
        if local_ckpt != checkpoints.step_dir(storage_root, step):
            shutil.rmtree(local_ckpt, ignore_errors=True)
        if storage.is_s3(out):
            shutil.rmtree(local_out, ignore_errors=True)


def _reusable_quietly(out: str, digest: str) -> Optional[dict]:
    """An export of another checkpoint is simply replaced (it is derived data, not user work)."""
    from jobs.core.errors import UserError

    try:
        return reusable(out, INFO, digest, force=False)
    except UserError:
        return None


def _is_tied_alias(config, key: str) -> bool:
    """Keys the state dict may lack because they alias the shared embedding (tie_weights restores them)."""
    decoder = getattr(config, "decoder", None)
    tied = getattr(config, "tie_word_embeddings", None) or getattr(decoder, "tie_word_embeddings", False)
    return bool(tied) and ("lm_head" in key or "decoder.embed_tokens" in key)


def _check_probe(local_ckpt: str, local_out: str) -> Optional[float]:
    """Max |logits(export) - logits(engine)| on the checkpoint's probe batch; None without a probe."""
    from transformers import AutoModelForSeq2SeqLM

    path = os.path.join(local_ckpt, checkpoints.PROBE)
    if not os.path.exists(path):
        return None
    probe = torch.load(path, map_location="cpu")
    model = AutoModelForSeq2SeqLM.from_pretrained(local_out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**probe["inputs"]).logits.float()
    diff = float((logits - probe["logits"]).abs().max())
    # fp32 training: the export is the engine's weights, so the logits match to the bit. bf16: the
    # engine ran bf16 copies of the fp32 master weights exported here, so they differ by rounding.
    tolerance = 1.0 if probe.get("bf16") else 1e-4
    if not diff <= tolerance:  # also catches NaN
        log.warning("the export's logits differ from the engine's by up to %.3g on the probe batch "
                    "(expected <= %g): check the export before using it", diff, tolerance)
    else:
        log.info("export reproduces the engine's logits on the probe batch: max |diff| = %.3g", diff)
    return diff
