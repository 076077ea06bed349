"""A training checkpoint -> a Hugging Face directory that plain transformers loads.

The checkpoint is consolidated into one fp32 state dict holding the optimizer's fp32 master weights
(under bf16 the module itself is only their bf16 copy), loaded into the adapted model's class, and saved
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
    """A checkpoint directory holding DeepSpeed's `ds` tag -> {state dict key: fp32 CPU tensor}, for
    any number of ranks. Trained parameters (and their tied aliases) hold the optimizer's fp32 master
    weights; buffers and untrained parameters the module's values, cast to fp32.

    What DeepSpeed writes depends on the optimizer it wrapped ours in (checked against 0.19):
    - ZeRO 1-3: DeepSpeedZeroOptimizer(_Stage3), one "[bf16_]zero_pp_rank_R_*optim_states.pt" per
      rank with a flat fp32 partition; read by DeepSpeed's zero_to_fp32.
    - ZeRO 1 with bf16 and data_types.grad_accum_dtype=fp32: BF16_Optimizer, the same file names,
      but a layout zero_to_fp32 refuses ("not a zero checkpoint"); read by _bf16_optimizer_masters.
    - ZeRO 0 with bf16: FP16_UnfusedOptimizer in bf16, no optimizer file; the model file's
      "optimizer" entry holds every master as a whole tensor ("fp32_groups").
    - ZeRO 0 with fp32: the bare torch optimizer; the module's weights are the weights.
    """
    ds_dir = os.path.join(checkpoint_local, checkpoints.DS_TAG)
    optim_files = sorted((n for n in os.listdir(ds_dir) if "zero_pp_rank_" in n and n.endswith("optim_states.pt")),
                         key=_dp_rank)
    if optim_files:
        # mmap: only the keys are read here; the flat partitions are read where they are used.
        first = torch.load(os.path.join(ds_dir, optim_files[0]), map_location="cpu", mmap=True, weights_only=False)
        if "zero_stage" in first["optimizer_state_dict"]:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(checkpoint_local, tag=checkpoints.DS_TAG)
    model_states = torch.load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                              weights_only=False)
    module = model_states["module"]
    if optim_files:
        masters = _bf16_optimizer_masters(ds_dir, optim_files, module)
    elif "fp32_groups" in (model_states.get("optimizer") or {}):
        masters = _unfused_masters(model_states["optimizer"], module)
    else:
        low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
        if low:
            raise RuntimeError(f"{ds_dir} holds {module[low[0]].dtype} weights ({low[0]}, ...) but no fp32 "
                               "master weights that t5adapt knows how to read")
        masters = {}
    return _with_masters(module, masters)


def _dp_rank(file_name: str) -> int:
    """"bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt" -> 12 (rank order, not string order)."""
    return int(file_name.split("zero_pp_rank_")[1].split("_")[0])


def _unfused_masters(optimizer_state: dict, module: dict) -> dict:
    """ZeRO 0 under bf16: FP16_UnfusedOptimizer's whole fp32 copies, named through the names that
    jobs/train/schedule.param_groups stores in each torch param group (DeepSpeed records none here)."""
    masters = {}
    groups = optimizer_state["optimizer_state_dict"]["param_groups"]
    for group, fp32_group in zip(groups, optimizer_state["fp32_groups"], strict=True):
        # DeepSpeed leaves zero-element parameters out of its groups (runtime/utils.is_optimized_parameter).
        names = [n for n in group["t5adapt_names"] if module[n].numel() > 0]
        for name, master in zip(names, fp32_group, strict=True):
            if master.shape != module[name].shape:
                raise RuntimeError(f"fp32 master of {name} has shape {tuple(master.shape)}, the module "
                                   f"{tuple(module[name].shape)}: the optimizer groups do not match their names")
            masters[name] = master.float()
    return masters


def _bf16_optimizer_masters(ds_dir: str, optim_files: list, module: dict) -> dict:
    """BF16_Optimizer: each rank holds one slice of each group's flat fp32 vector and records, per
    parameter name, where the part of that parameter it holds starts in its slice and how long it
    is (param_slice_mappings). A parameter is its parts in rank order."""
    parts: dict = {}
    for file_name in optim_files:
        state = torch.load(os.path.join(ds_dir, file_name), map_location="cpu", mmap=True, weights_only=False)
        state = state["optimizer_state_dict"]
        if len(optim_files) != max(state["partition_count"]):
            raise RuntimeError(f"{ds_dir} has {len(optim_files)} optimizer files for "
                               f"{max(state['partition_count'])} ranks")
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"], strict=True):
            for name, address in mapping.items():
                parts.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    masters = {}
    for name, pieces in parts.items():
        whole = torch.cat(pieces)
        if whole.numel() != module[name].numel():
            raise RuntimeError(f"{ds_dir}: the ranks hold {whole.numel()} elements of {name}, which has "
                               f"{module[name].numel()}")
        masters[name] = whole.view(module[name].shape).float()
    return masters


def _with_masters(module: dict, masters: dict) -> dict:
    """The module's state dict in fp32, each trained parameter replaced by its master. A tied alias
    (the LM head, the decoder embedding) shares its tensor's storage in the loaded file, so it gets
    the same master; left as the bf16 copy it would overwrite the master when loaded after it."""
    missing = sorted(set(masters) - set(module))
    if missing:
        raise RuntimeError(f"fp32 masters without a module entry: {missing[:5]}")
    by_storage = {_storage_key(module[name]): master for name, master in masters.items()}
    state = {}
    for key, value in module.items():
        master = masters.get(key, by_storage.get(_storage_key(value)))
        state[key] = master if master is not None else (value.float() if value.is_floating_point() else value)
    return state


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


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
        raise checkpoints.DamagedCheckpoint(f"checkpoint {checkpoints.step_dir(storage_root, step)} is damaged "
                                            f"({problem}): export an earlier one (t5adapt export --step N)")
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
    from jobs.core.pretrained import load_seq2seq

    path = os.path.join(local_ckpt, checkpoints.PROBE)
    if not os.path.exists(path):
        return None
    probe = torch.load(path, map_location="cpu")
    model = load_seq2seq(local_out).eval()
    with torch.no_grad():
        logits = model(**probe["inputs"]).logits.float()
    diff = float((logits - probe["logits"]).abs().max())
    # fp32 training: the export is the engine's weights, so the logits match to the bit. bf16: the
    # engine ran bf16 copies of the fp32 master weights exported here, in bf16 arithmetic, so they
    # differ by rounding. That tolerance cannot tell the masters from their bf16 copies cast up;
    # tests/test_bf16_export.py checks that the export holds the masters.
    tolerance = 1.0 if probe.get("bf16") else 1e-4
    if not diff <= tolerance:  # also catches NaN
        log.warning("the export's logits differ from the engine's by up to %.3g on the probe batch "
                    "(expected <= %g): check the export before using it", diff, tolerance)
    else:
        log.info("export reproduces the engine's logits on the probe batch: max |diff| = %.3g", diff)
    return diff
