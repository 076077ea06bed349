"""Knowledge distillation from the decoder-only source (T5Gemma's PrefixLM recipe): the loss.

Per target token with a teacher (jobs/core/teacher_io.py says which), over the teacher's top-k ids
renormalised at temperature T:
    kd = T^2 * sum_i q_i (log q_i - log p_i),  q = softmax(teacher log-probs / T),
                                               p = softmax(student logits / T) at the same ids
which is the KL divergence when k covers the vocabulary (0 when the student equals the teacher).
A target with a teacher counts (1 - weight) * cross-entropy + weight * kd; one without (R/X
examples, the closing EOS) its cross-entropy alone; the sum is divided by the step's target tokens
(jobs/train/loop.py). Teacher log-probs are kept at temperature 1: dividing log-probs by T and
renormalising over the kept ids gives softmax(logits / T) over them, so T is a training choice and
stored log-probs serve any T.
"""

from typing import Dict, Optional

import torch


def kd_token_losses(student_logits: torch.Tensor, teacher: Dict[str, Optional[torch.Tensor]],
                    temperature: float) -> torch.Tensor:
    """Per-token distillation loss [S rows, D] (0 where there is no teacher); see the module docstring.
    student_logits: the whole micro-batch's [B, D, vocab]; the teacher's rows are picked from it."""
    logits = student_logits[teacher["teacher_rows"]].float() / temperature
    student = torch.log_softmax(logits, dim=-1)
    if teacher["teacher_ids"] is not None:
        student = torch.gather(student, -1, teacher["teacher_ids"])
    log_q = torch.log_softmax(teacher["teacher_logprobs"].float() / temperature, dim=-1)
    kd = (log_q.exp() * (log_q - student)).sum(-1) * temperature ** 2
    return torch.where(teacher["teacher_mask"], kd, torch.zeros_like(kd))


def load_teacher(source_spec: str, device: torch.device, bf16: bool) -> torch.nn.Module:
    """The frozen source for online distillation, on `device` (bf16 when training in bf16)."""
    from jobs.core.sources import load_causal_lm

    teacher = load_causal_lm(source_spec, torch.bfloat16 if bf16 else torch.float32).to(device)
    teacher.requires_grad_(False)
    return teacher.eval()


def with_teacher(collate, cfg, metadata: dict, decoder_length: int):
    """`collate` plus the teacher's keys (jobs/core/teacher_io.py): the online teacher's inputs, or
    the stored top-k read beside the examples. cfg: train.distill."""
    from jobs.core.teacher_io import TeacherLayout, collate_online, collate_stored

    layout = TeacherLayout.of(metadata)

    def collate_with_teacher(rows):
        batch = collate(rows)
        if cfg.teacher == "online":
            batch.update(collate_online(rows, layout, decoder_length))
        else:
            batch.update(collate_stored(rows, cfg.top_k, decoder_length))
        return batch

    return collate_with_teacher
