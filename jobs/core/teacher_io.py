"""The teacher's view of prepared examples, shared by the teacher stage (jobs/teacher) and training
(jobs/train/distill.py).

The teacher (the decoder-only source) reads an S (PrefixLM) example as one causal sequence,
BOS + prefix + target[:-1]; the student's encoder reads [mode] prefix EOS and its decoder BOS +
target (jobs/data/examples.py). Position t of the teacher's target part predicts target token t
exactly where decoder position t does, one to one. The closing EOS of every prepared target has no
teacher (the source would predict the text that follows), and R/X examples have none at all: their
targets are sentinel-separated spans that no causal reading of the text predicts.

One layout for the teacher's log-probs (temperature 1), computed online or stored:
teacher_ids / teacher_logprobs [S rows, D, k], teacher_rows [S rows] (places in the micro-batch),
teacher_mask [S rows, D] (targets with a teacher). Stored per example as flattened lists
[targets * k] (TEACHER_COLUMNS; empty for R/X rows), int32 ids and float32 log-probs, exactly.
"""

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from jobs.core.errors import UserError

TEACHER_INFO = "teacher.json"  # the teacher stage's record: top_k, data_key, source, parts, config_hash
# Columns the teacher stage stores per example: top-k ids and log-probs, flattened [targets * k].
TEACHER_COLUMNS = ["teacher_ids", "teacher_logprobs"]


@dataclass(frozen=True)
class TeacherLayout:
    """Where an S example's prefix and target are in the prepared columns (jobs/data/examples.py)."""
    s_index: int  # the S denoiser's index in metadata["denoisers"]
    mode_offset: int  # 1 when the encoder input starts with a mode token
    bos_id: int
    pad_id: int

    @staticmethod
    def of(metadata: dict) -> "TeacherLayout":
        names = [d["name"] for d in metadata["denoisers"]]
        if "S" not in names:
            raise UserError("train.distill.enabled=true needs PrefixLM (S) examples, and this prepared data has only "
                            f"R/X denoisers ({', '.join(names)}): set data.objective=prefix_lm, add an S entry to "
                            "data.denoisers, or set train.distill.enabled=false")
        s = names.index("S")
        return TeacherLayout(s, int(bool(metadata["denoisers"][s].get("mode_token"))), metadata["bos_id"],
                             metadata["pad_id"])


def teacher_sequence(input_ids: np.ndarray, labels: np.ndarray, layout: TeacherLayout):
    """(ids, first, targets): the teacher's causal input for one S example, BOS + prefix + target[:-1];
    the position whose logits predict the first target token (the last prefix token, or BOS); and
    how many target tokens have a teacher (all but the closing EOS)."""
    prefix = np.asarray(input_ids)[layout.mode_offset:-1]  # drop [mode] and the closing EOS
    target = np.asarray(labels)[:-1]  # drop the closing EOS: it has no teacher
    ids = np.concatenate([[layout.bos_id], prefix, target[:-1]]).astype(np.int64)
    return ids, len(prefix), len(target)


def collate_online(rows: Dict[str, np.ndarray], layout: TeacherLayout, decoder_length: int) -> Dict[str, torch.Tensor]:
    """The teacher's inputs for the S rows of a micro-batch (numpy, in the data thread):
    teacher_input_ids / teacher_attention_mask [S rows, longest], teacher_positions [S rows, D]
    (the teacher position whose logits go with decoder position t; 0 and masked where none),
    teacher_rows [S rows] (their places in the micro-batch), teacher_mask [S rows, D]."""
    chosen = [i for i, d in enumerate(rows["denoiser"]) if int(d) == layout.s_index]
    sequences = [teacher_sequence(rows["input_ids"][i], rows["labels"][i], layout) for i in chosen]
    longest = max((len(ids) for ids, _, _ in sequences), default=1)
    input_ids = np.full((len(chosen), longest), layout.pad_id, dtype=np.int64)
    attention = np.zeros((len(chosen), longest), dtype=np.int64)
    positions = np.zeros((len(chosen), decoder_length), dtype=np.int64)
    mask = np.zeros((len(chosen), decoder_length), dtype=bool)
    for row, (ids, first, targets) in enumerate(sequences):
        input_ids[row, :len(ids)] = ids
        attention[row, :len(ids)] = 1
        positions[row, :targets] = first + np.arange(targets)
        mask[row, :targets] = True
    return {"teacher_input_ids": torch.from_numpy(input_ids), "teacher_attention_mask": torch.from_numpy(attention),
            "teacher_positions": torch.from_numpy(positions), "teacher_rows": torch.tensor(chosen, dtype=torch.long),
            "teacher_mask": torch.from_numpy(mask)}


def collate_stored(rows: Dict[str, np.ndarray], top_k: int, decoder_length: int) -> Dict[str, torch.Tensor]:
    """The stored top-k of the rows that have one (S rows; R/X rows store none), in the same layout
    as teacher_topk's output."""
    chosen = [i for i, ids in enumerate(rows["teacher_ids"]) if len(ids)]
    ids = np.zeros((len(chosen), decoder_length, top_k), dtype=np.int64)
    logprobs = np.zeros((len(chosen), decoder_length, top_k), dtype=np.float32)
    mask = np.zeros((len(chosen), decoder_length), dtype=bool)
    for row, i in enumerate(chosen):
        targets = len(rows["teacher_ids"][i]) // top_k
        ids[row, :targets] = np.asarray(rows["teacher_ids"][i]).reshape(targets, top_k)
        logprobs[row, :targets] = np.asarray(rows["teacher_logprobs"][i]).reshape(targets, top_k)
        mask[row, :targets] = True
    return {"teacher_ids": torch.from_numpy(ids), "teacher_logprobs": torch.from_numpy(logprobs),
            "teacher_rows": torch.tensor(chosen, dtype=torch.long), "teacher_mask": torch.from_numpy(mask)}


def causal_logits(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at `positions` [B, D] only ([B, D, vocab]): the 262k-wide LM head runs
    on the gathered hidden states, not on every prefix position. Applies the model's final logit
    soft-capping (Gemma 2) as its own forward does."""
    hidden = teacher.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    picked = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = teacher.lm_head(picked)
    cap = getattr(teacher.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: Dict[str, torch.Tensor], top_k: int) -> Dict[str, torch.Tensor]:
    """The teacher's log-probs (temperature 1) for the S rows of a collated micro-batch (collate_online's
    keys): teacher_ids / teacher_logprobs [S rows, D, k] (k = vocabulary when top_k is 0: ids None),
    teacher_rows, teacher_mask."""
    logits = causal_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                           batch["teacher_positions"])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = None
    if top_k:
        logprobs, ids = logprobs.topk(top_k, dim=-1)
    return {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_rows": batch["teacher_rows"],
            "teacher_mask": batch["teacher_mask"]}
