"""Token cross-entropy without the full logits: the LM head runs on a few target positions at a time.

With Gemma's 262,144-token vocabulary the logits take 1 MiB per target token in fp32 (256 MiB for an
example with 256 targets); examples_io.token_losses keeps the log-softmax of all of them for backward
and makes two more tensors of that size there. Here the encoder-decoder body runs as usual, but the
head projects only the decoder positions that have a label, `chunk_tokens` at a time, each chunk in a
non-reentrant activation checkpoint: backward recomputes one chunk's logits instead of keeping all.
The result is token_losses's, to float rounding.

When it pays: each chunk's backward makes its own [vocab, hidden] gradient of the head weight (640
MiB for the 270M in fp32), summed into the first. Chunks lower the peak only when a micro-batch's
logits are several times that (targets per micro-batch well above the hidden size), and each extra
chunk costs one such gradient (bench/chunked_loss.py). Without gradients (evaluation) chunks only save.
"""
import torch
from torch.utils.checkpoint import checkpoint

from jobs.core.examples_io import IGNORE, token_losses


def _softcap_t5gemma(model):
    # As T5GemmaForConditionalGeneration.forward reads it.
    return model.get_decoder().config.final_logit_softcapping


def _softcap_t5gemma2(model):
    # As T5Gemma2ForConditionalGeneration.forward reads it.
    return model.config.decoder.final_logit_softcapping


# The models whose forward this module reproduces: class name -> where that forward reads the cap.
# By name, so importing this module does not import transformers' model code.
SOFTCAP_OF = {"T5GemmaForConditionalGeneration": _softcap_t5gemma,
              "T5Gemma2ForConditionalGeneration": _softcap_t5gemma2}


def chunked_token_losses(model, batch: dict, chunk_tokens: int = 1024):
    """(token_loss, mask), as examples_io.token_losses returns them, without materialising logits.

    model: a T5GemmaForConditionalGeneration or T5Gemma2ForConditionalGeneration, or a DeepSpeed
      engine around one (engine.module). Anything else, or an engine running torch.autocast (its
      context covers only the engine's own forward, not the head run here), falls back to
      token_losses, which computes the full logits.
    batch: input_ids, attention_mask [B, encoder length]; decoder_input_ids, decoder_attention_mask,
      labels [B, T] (labels IGNORE at padding), as examples_io.make_collate builds them.
    chunk_tokens: target positions whose logits exist at once: about chunk_tokens * vocab * 4 bytes,
      three such tensors in a chunk's backward.
    Returns token_loss float32 [B, T], 0 where labels == IGNORE, and mask bool [B, T] = labels != IGNORE.

    The head is called as a module, so ZeRO-3's hooks gather its weight (the input embedding, tied
    as the model ties it), then the model's own final logit soft-capping. Under ZeRO-3 every rank
    calls it equally often (padding with empty chunks), as each call is a collective. Under
    DeepSpeed the head's chunks run backward before the engine output whose hook starts DeepSpeed's
    backward prologue (decoder_hidden_states); a tied head (every checkpoint t5adapt adapts) gets its
    gradient only after the embeddings' backward, so after the prologue, but an untied head's would
    come before it.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be at least 1")
    module = getattr(model, "module", model)  # a DeepSpeed engine keeps the model as .module
    softcap_of = SOFTCAP_OF.get(type(module).__name__)
    autocast = getattr(model, "torch_autocast_enabled", None)
    if softcap_of is None or (autocast is not None and autocast()):
        return token_losses(model, batch)

    labels = batch["labels"]
    mask = labels != IGNORE
    hidden = decoder_hidden_states(model, batch)  # [B, T, H]
    positions = mask.flatten().nonzero().squeeze(1)  # [N] flat indices of the real targets (a host sync)
    targets = labels.flatten()[positions]
    chosen = hidden.flatten(0, 1)[positions]  # [N, H]
    head, softcap = module.lm_head, softcap_of(module)

    def chunk_loss(rows: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = head(rows)
        if softcap is not None:  # the same three steps as transformers' forward, in the head's dtype
            logits = logits / softcap
            logits = torch.tanh(logits)
            logits = logits * softcap
        return torch.nn.functional.cross_entropy(logits.float(), chunk_targets, reduction="none")

    chunks = list(zip(chosen.split(chunk_tokens), targets.split(chunk_tokens)))
    if any(hasattr(param, "ds_id") for param in head.parameters()):
        # ZeRO-3 partitions the head's weight: each call of the head gathers it from every rank (in
        # forward, and again in backward's recompute), so every rank must call it as often as the
        # others, however many targets it has. Ranks short of chunks call it on empty ones.
        chunks += [(chosen[:0], targets[:0])] * (_most_on_any_rank(len(chunks), labels.device) - len(chunks))
    losses = []
    for rows, chunk_targets in chunks:
        if torch.is_grad_enabled():
            losses.append(checkpoint(chunk_loss, rows, chunk_targets, use_reentrant=False))
        else:  # evaluation: nothing to recompute
            losses.append(chunk_loss(rows, chunk_targets))
    if not losses:  # no target at all: zeros, still attached to the graph as token_losses' are
        losses = [chosen[:, 0].float() * 0]
    flat = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    return flat.index_copy(0, positions, torch.cat(losses)).view_as(labels), mask


def _most_on_any_rank(count: int, device: torch.device) -> int:
    """The largest `count` over all ranks (one all-reduce and a host sync)."""
    import torch.distributed as dist

    most = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def decoder_hidden_states(model, batch: dict) -> torch.Tensor:
    """The decoder's final hidden states [B, T, H] (after its final norm), from a forward of `model`
    (a supported transformers model or a DeepSpeed engine around one) that projects no logits."""
    # Through model(...) rather than its inner model.model: a DeepSpeed engine starts its backward
    # bookkeeping from hooks on the forward's outputs, so the hidden states must be one of them.
    # transformers makes decoder_hidden_states[-1] the very last_hidden_state its forward gives the
    # head; logits_to_keep with no position leaves the head nothing to project.
    nothing = torch.zeros(0, dtype=torch.long, device=batch["decoder_input_ids"].device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"],
                logits_to_keep=nothing, output_hidden_states=True)
    return out.decoder_hidden_states[-1]
