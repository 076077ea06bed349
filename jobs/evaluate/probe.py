"""The adaptation probe: does the encoder help the decoder predict held-out text?

Held-out documents are cut into passages of prefix + target tokens. Target cross-entropy
(nats/token, averaged over every target token of every passage) of:
  encoder              the encoder-decoder, prefix in the encoder, target in the decoder
  encoder_masked       the same decoder with the encoder masked out: the decoder alone
  source_with_context  the decoder-only source, prefix + target as one causal sequence
  source_target_only   the source given only the target (after BOS)
encoder_gain = encoder_masked - encoder (what the encoder is worth to the decoder) and
source_context_gain = source_target_only - source_with_context (what the prefix is worth to the
source: the ceiling).
At adaptation init "encoder_masked" equals "source_target_only": the decoder is the source model.
"""

from typing import List, Tuple

import numpy as np
import torch

from jobs.core.progress import progress as progress_bar

HOW = ("each held-out document (its closing EOS dropped) is cut into consecutive non-overlapping windows; "
       "passages are taken round-robin over documents (every document's first window, then every second "
       "window, ...), so no passage crosses a document boundary; documents shorter than one window are skipped")


LAYOUT = ("encoder input: the prefix laid out like a training PrefixLM (S) example, [S mode token] prefix EOS; "
          "decoder input: BOS + target[:-1] (teacher forcing); source inputs: BOS + prefix + target, BOS + target")


def cut_passages(documents: List[np.ndarray], prefix_tokens: int, target_tokens: int,
                 count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prefixes [P, prefix_tokens], targets [P, target_tokens]) int64, P <= count (see HOW)."""
    window = prefix_tokens + target_tokens
    usable = [d[:-1] for d in documents]  # the closing EOS
    per_document = [[d[i:i + window] for i in range(0, len(d) - window + 1, window)] for d in usable]
    chosen = []
    for rank in range(max((len(w) for w in per_document), default=0)):
        chosen += [windows[rank] for windows in per_document if rank < len(windows)]
    chosen = chosen[:count]
    if not chosen:
        return torch.empty(0, prefix_tokens, dtype=torch.long), torch.empty(0, target_tokens, dtype=torch.long)
    passages = torch.from_numpy(np.stack(chosen).astype(np.int64))
    return passages[:, :prefix_tokens], passages[:, prefix_tokens:]


def encoder_inputs(prefixes: torch.Tensor, metadata: dict) -> torch.Tensor:
    """The encoder side as training's PrefixLM (S) examples lay it out: [S mode token] prefix EOS
    (jobs/data/examples.py); the mode token only when the data has an S denoiser with one."""
    mode = next((d.get("mode_token") for d in metadata["denoisers"] if d["name"] == "S"), None)
    parts = [prefixes, torch.full((len(prefixes), 1), metadata["eos_id"])]
    if mode:
        parts.insert(0, torch.full((len(prefixes), 1), metadata["mode_tokens"][mode]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def probe(model, source, prefixes: torch.Tensor, targets: torch.Tensor, metadata: dict, batch_size: int,
          progress: bool = True) -> dict:
    """The four target cross-entropies (nats/token) and the two gains; see the module docstring."""
    result = dict(model_probe(model, prefixes, targets, metadata, batch_size, progress),
                  **source_probe(source, prefixes, targets, metadata, batch_size))
    result["encoder_gain"] = result["encoder_masked"] - result["encoder"]
    result["source_context_gain"] = result["source_target_only"] - result["source_with_context"]
    return result


@torch.no_grad()
def model_probe(model, prefixes: torch.Tensor, targets: torch.Tensor, metadata: dict, batch_size: int,
                progress: bool = True) -> dict:
    """{"encoder", "encoder_masked"}: the encoder-decoder's two target cross-entropies."""
    from transformers.modeling_outputs import BaseModelOutput

    bos = metadata["bos_id"]
    sums = dict.fromkeys(("encoder", "encoder_masked"), 0.0)
    for start in progress_bar(range(0, len(targets), batch_size), desc="evaluate: adaptation probe", unit="batch",
                              disable=not progress):
        prefix, target = prefixes[start:start + batch_size], targets[start:start + batch_size]
        begin = torch.full((len(target), 1), bos)
        encoder_ids = encoder_inputs(prefix, metadata)
        decoder_ids = torch.cat([begin, target[:, :-1]], dim=1)  # teacher forcing, as in training
        visible = torch.ones_like(encoder_ids)
        encoded = model.get_encoder()(input_ids=encoder_ids, attention_mask=visible)
        sums["encoder"] += _ce_sum(model(encoder_outputs=encoded, attention_mask=visible,
                                         decoder_input_ids=decoder_ids).logits, target)
        # The encoder masked out: an all-zero attention_mask on the encoder side AND zero encoder
        # states. T5Gemma 2 merges decoder self- and cross-attention into one softmax: its decoder
        # turns the model's attention_mask (passed on as encoder_attention_mask) into a bidirectional
        # mask and concatenates it to the causal self-attention mask (transformers 5.x,
        # T5Gemma2Decoder.forward, merged_attn_mask_mapping), so every encoder key gets the dtype's
        # minimum added, exactly zero weight, and the decoder computes what the source decoder-only
        # model computes. T5Gemma's separate cross-attention turns a fully masked row into a uniform
        # average instead (equal scores); there the zero states silence it: bias-free projections of
        # zeros give zero values and a zero output, and the residual stream passes unchanged.
        # tests/test_evaluate.py checks both families against the source at adaptation init.
        silent = BaseModelOutput(last_hidden_state=torch.zeros_like(encoded.last_hidden_state))
        sums["encoder_masked"] += _ce_sum(model(encoder_outputs=silent, attention_mask=torch.zeros_like(encoder_ids),
                                                decoder_input_ids=decoder_ids).logits, target)
    return {name: total / targets.numel() for name, total in sums.items()}


@torch.no_grad()
def source_probe(source, prefixes: torch.Tensor, targets: torch.Tensor, metadata: dict, batch_size: int) -> dict:
    """{"source_with_context", "source_target_only"}: the decoder-only source's references."""
    bos = metadata["bos_id"]
    sums = dict.fromkeys(("source_with_context", "source_target_only"), 0.0)
    for start in range(0, len(targets), batch_size):
        prefix, target = prefixes[start:start + batch_size], targets[start:start + batch_size]
        begin = torch.full((len(target), 1), bos)
        # Logits at position t predict token t + 1: the target is predicted by the positions before it.
        # logits_to_keep: the LM head (262k x 640 on Gemma 3) runs only where a target is predicted.
        together = source(input_ids=torch.cat([begin, prefix, target], dim=1), logits_to_keep=target.shape[1] + 1).logits
        sums["source_with_context"] += _ce_sum(together[:, :-1], target)
        alone = source(input_ids=torch.cat([begin, target], dim=1)).logits
        sums["source_target_only"] += _ce_sum(alone[:, :-1], target)
    return {name: total / targets.numel() for name, total in sums.items()}


def _ce_sum(logits: torch.Tensor, target: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum").item()
