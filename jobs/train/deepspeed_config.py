"""The DeepSpeed config, generated from TrainConfig so batch sizes, ZeRO and precision cannot disagree.

A user's `train.deepspeed` keys are merged in; a key that our fields own is refused with the field to
use instead (a silent override would make the typed config lie about the run).
"""

from typing import Any, Dict, List, Tuple

# DeepSpeed keys this module sets, and the TrainConfig field that owns each.
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.micro_batch_size * train.grad_accum_steps * train.num_workers",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload_optimizer",
    "zero_optimization.offload_param": "train.offload_params",
    "bf16": "train.precision",
    "bfloat16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "train.lr / train.adam_* / train.weight_decay (t5adapt builds AdamW itself)",
    "scheduler": "train.schedule / train.warmup_steps (t5adapt sets the learning rate each step)",
    "zero_force_ds_cpu_optimizer": "train.offload_optimizer",
    "activation_checkpointing": "train.activation_checkpointing",
}


def build_deepspeed_config(cfg) -> Dict[str, Any]:
    """TrainConfig -> the dict passed to deepspeed.initialize(config=...).

    Raises ValueError naming the `train.deepspeed` key that conflicts with a generated one.
    """
    zero: Dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    ours: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": 0.0 if loop_clips(cfg) else cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        # Our AdamW is torch's; with offload DeepSpeed would insist on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # progress is ours (MLflow, the log); DeepSpeed's prints would interleave
        "wall_clock_breakdown": False,
    }
    for path, _ in _leaves(cfg.deepspeed):
        owner = _owner(path)
        if owner:
            raise ValueError(f"train.deepspeed.{path} conflicts with the generated DeepSpeed config: "
                             f"set it through {owner} instead")
    return _merge(ours, cfg.deepspeed)


def loop_clips(cfg) -> bool:
    """ZeRO-0 in fp32: DeepSpeed clips with torch's clip_grad_norm_ but drops the norm it computes,
    so the loop clips instead (the same operation) and logs grad_norm. Every other setup clips in
    DeepSpeed's optimizer, which records the norm."""
    return cfg.zero_stage == 0 and not cfg.bf16


def _owner(path: str) -> str:
    """The field owning a DeepSpeed key path ("zero_optimization.stage"), or "" when it is free."""
    for key, field in _OWNED.items():
        if path == key or path.startswith(key + "."):
            return field
    return ""


def _leaves(tree: Dict[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out += _leaves(value, path) if isinstance(value, dict) and value else [(path, value)]
    return out


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
