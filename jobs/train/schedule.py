"""Parameter groups and the learning rate of each group at each step.

The cross-attention warm-up of unbalanced pairs is a learning-rate matter: during the first
`warmup_cross_attn` steps every group but the cross-attention ones gets lr 0, so those parameters
do not move at all (AdamW's decoupled decay is lr * weight_decay * p, also 0), and every ZeRO stage
keeps one optimizer over all parameters from step 0: no re-initialisation between the phases.
"""

import math
from typing import Dict, List, Sequence

import torch

from jobs.train.partitioned import full_numel, full_shape

# The encoder's own weights (T5Gemma: encoder.layers / encoder.norm; T5Gemma 2: the text model under
# encoder.text_model), never the shared embedding: what train.encoder_warmup_steps trains alone.
ENCODER_PATTERNS = ("encoder.layers.", "encoder.norm.", "encoder.text_model.layers.", "encoder.text_model.norm.")


def param_groups(model: torch.nn.Module, cross_attn_patterns: Sequence[str], weight_decay: float) -> List[Dict]:
    """AdamW groups: {cross-attention or not} x {decayed (matrices) or not (norms, biases)}.

    Each group carries "t5adapt_phase": "cross_attn" or "rest", read by set_learning_rate. Tied
    parameters appear once (named_parameters deduplicates them).
    """
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        phase = "cross_attn" if any(p in name for p in cross_attn_patterns) else "rest"
        decay = len(full_shape(param)) >= 2  # a ZeRO-3 placeholder is 1-d whatever its shape
        group = groups.setdefault((phase, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "t5adapt_phase": phase, "t5adapt_names": []})
        group["params"].append(param)
        group["t5adapt_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def learning_rate(step: int, cfg) -> float:
    """The scheduled lr for optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over
    train.warmup_steps, then cosine down to lr * min_lr_ratio at max_steps (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, step: int, cfg, warmup_cross_attn: int) -> float:
    """Write each group's lr for `step`; returns the scheduled lr (what the trained groups get)."""
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        frozen = step < warmup_cross_attn and group.get("t5adapt_phase") != "cross_attn"
        group["lr"] = 0.0 if frozen else lr
    return lr


def count_parameters(groups: List[Dict], step: int, warmup_cross_attn: int) -> Dict[str, int]:
    """Trainable and frozen parameter counts at `step` (full numel of unique tensors, also when
    ZeRO-3 built them partitioned)."""
    trainable = frozen = 0
    for group in groups:
        n = sum(full_numel(p) for p in group["params"])
        if step < warmup_cross_attn and group["t5adapt_phase"] != "cross_attn":
            frozen += n
        else:
            trainable += n
    return {"trainable": trainable, "frozen": frozen}
