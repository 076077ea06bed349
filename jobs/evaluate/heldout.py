"""Held-out loss: the training objective on prepared examples that training never saw."""

from typing import Dict

import numpy as np
import torch

from jobs.core.examples_io import denoiser_names, make_collate, token_losses
from jobs.core.progress import progress as progress_bar


@torch.no_grad()
def heldout_loss(model, rows: Dict[str, np.ndarray], metadata: dict, batch_size: int, progress: bool = True) -> dict:
    """Mean token cross-entropy (nats/token) of the decoder targets, padding ignored, as training
    computes it (jobs/train/loop.forward_loss), overall and per denoiser.

    rows: ragged example columns (jobs.core.examples_io.read_heldout_examples). Each batch is padded
    to its own longest example; masked padding changes no real position's logits.
    Out: {"loss", "tokens", "examples", "by_denoiser": {name: {"loss", "tokens", "examples"}}};
    denoisers without held-out examples are left out.
    """
    names = denoiser_names(metadata)
    # [loss sum, tokens, examples] per denoiser, float64 so long sums do not drift.
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    count = len(rows["input_ids"])
    for start in progress_bar(range(0, count, batch_size), desc="evaluate: held-out loss", unit="batch",
                              disable=not progress):
        chunk = {c: v[start:start + batch_size] for c, v in rows.items()}
        collate = make_collate(max(len(r) for r in chunk["input_ids"]), max(len(r) for r in chunk["labels"]),
                               metadata["pad_id"])
        batch = collate(chunk)
        token_loss, mask = token_losses(model, batch)
        which = batch["denoiser"]
        sums[:, 0].index_add_(0, which, token_loss.sum(1).double())
        sums[:, 1].index_add_(0, which, mask.sum(1).double())
        sums[:, 2].index_add_(0, which, torch.ones(len(which), dtype=torch.float64))
    total = sums.sum(0)
    by_denoiser = {name: {"loss": float(s[0] / s[1]) if s[1] else None, "tokens": int(s[1]), "examples": int(s[2])}
                   for name, s in zip(names, sums) if s[2]}
    return {"loss": float(total[0] / total[1]) if total[1] else None, "tokens": int(total[1]),
            "examples": int(total[2]), "by_denoiser": by_denoiser}
