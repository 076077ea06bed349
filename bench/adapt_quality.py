"""Quality of the untrained adapted model on real English text, and mapping fidelity.

Passages of shipped English prose (the Python documentation in pydoc_data) are split into a
128-token prefix and a 64-token target. Mean target cross-entropy (nats/token) for:
  (a) the source Gemma 3 270M given prefix + target in context
  (b) the adapted T5Gemma 2 270M-270M, encoder = prefix, decoder = target, before any training,
      with the paper's initialisation and with the step-0-preserving option (adapt.encoder_scale)
  (c) the same architecture randomly initialised (transformers' init, seed 0)
  (d) (b) with the encoder masked out of the decoder's merged attention
and the reference the identity promises (d) equals: the source given only the target.
Fidelity: max |logits(d) - logits(source on the target alone)|.

Run: .venv/bin/python bench/adapt_quality.py [--passages 48] [--scales 1.0,0.01,0.0]
"""

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PREFIX_TOKENS, TARGET_TOKENS = 128, 64


def passages(tokenizer, count):
    """(prefix, target) token tensors, the first 192-token window of each long enough document."""
    from jobs.core.shipped_text import prose_documents

    pairs = []
    for document in prose_documents():
        ids = tokenizer(document, add_special_tokens=False).input_ids
        if len(ids) >= PREFIX_TOKENS + TARGET_TOKENS:
            window = torch.tensor(ids[:PREFIX_TOKENS + TARGET_TOKENS])
            pairs.append((window[:PREFIX_TOKENS], window[PREFIX_TOKENS:]))
        if len(pairs) == count:
            break
    return pairs


def target_ce(logits, target):
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)).item()


@torch.no_grad()
def decoder_only_ce(model, pairs, bos, with_prefix):
    """Mean target CE; also the target logits of each passage (kept only when with_prefix is False)."""
    losses, kept = [], []
    for prefix, target in pairs:
        context = torch.cat([torch.tensor([bos]), prefix, target]) if with_prefix else torch.cat([torch.tensor([bos]), target])
        logits = model(input_ids=context[None]).logits[0]
        # logits at position t predict token t+1: the last 64 predictions before the end are the target
        predicted = logits[-TARGET_TOKENS - 1:-1]
        losses.append(target_ce(predicted, target))
        if not with_prefix:
            kept.append(predicted)
    return sum(losses) / len(losses), kept


@torch.no_grad()
def seq2seq_ce(model, pairs, bos, mask_encoder=False, compare_to=None):
    """Mean target CE; with `compare_to` (per-passage logits) also the max abs logit difference."""
    losses, max_diff = [], 0.0
    for i, (prefix, target) in enumerate(pairs):
        encoder_ids = torch.cat([torch.tensor([bos]), prefix])[None]
        decoder_ids = torch.cat([torch.tensor([bos]), target[:-1]])[None]
        mask = torch.zeros_like(encoder_ids) if mask_encoder else torch.ones_like(encoder_ids)
        encoded = model.get_encoder()(input_ids=encoder_ids)  # the encoder itself always sees the prefix
        logits = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=decoder_ids).logits[0]
        losses.append(target_ce(logits, target))
        if compare_to is not None:
            max_diff = max(max_diff, (logits - compare_to[i]).abs().max().item())
    return sum(losses) / len(losses), max_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=48)
    parser.add_argument("--scales", default="1.0,0.01,0.0", help="adapt.encoder_scale values to compare")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.core import builtin
    from jobs.adapt.stage import build_in_memory
    from orchestrator.config import load_config

    torch.set_grad_enabled(False)
    started = time.perf_counter()
    gguf = builtin.materialise("builtin:gemma3-270m")
    folder, name = os.path.split(gguf)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    bos = tokenizer.bos_token_id
    pairs = passages(tokenizer, args.passages)
    rows = []
    ce_a, _ = decoder_only_ce(source, pairs, bos, with_prefix=True)
    rows.append(("(a)", "source Gemma 3 270M, prefix + target in context", ce_a))
    ce_ref, reference_logits = decoder_only_ce(source, pairs, bos, with_prefix=False)
    del source

    quickstart = os.path.join(REPO, "configs", "quickstart.yaml")
    fidelity = None
    for scale in [float(s) for s in args.scales.split(",")]:
        model, design, _ = build_in_memory(load_config(quickstart, [f"adapt.encoder_scale={scale}"]).adapt)
        label = "paper init" if scale == 1.0 else f"step-0 option, encoder_scale={scale:g}"
        rows.append(("(b)", f"adapted 270M-270M, encoder = prefix, {label}", seq2seq_ce(model, pairs, bos)[0]))
        if scale == 1.0:
            ce_d, fidelity = seq2seq_ce(model, pairs, bos, mask_encoder=True, compare_to=reference_logits)
            rows.append(("(d)", "(b) paper init with the encoder masked out", ce_d))
        del model
    torch.manual_seed(0)
    random = design.model_class(design.config).eval()  # encoder_scale does not change the architecture
    rows.append(("(c)", "same architecture, random init", seq2seq_ce(random, pairs, bos)[0]))
    rows.append(("ref", "source given only the target (what (d) must equal)", ce_ref))

    print(f"\n{len(pairs)} passages of {PREFIX_TOKENS} + {TARGET_TOKENS} tokens; mean target cross-entropy, nats/token")
    print("| | model | target CE |\n|---|---|---|")
    for key, label, ce in rows:
        print(f"| {key} | {label} | {ce:.3f} |")
    print(f"\nmapping fidelity on the real 270M: max |logits(d) - logits(ref)| = {fidelity:.2e} "
          f"over {len(pairs) * TARGET_TOKENS} positions x 262144 logits")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
