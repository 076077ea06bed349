"""evaluation.json -> words: the summary table (evaluation.md, model card, CLI) and the full report."""

from typing import Optional


def evaluation_table(evaluation: dict) -> str:
    """A short markdown table `metric | model | source` of an evaluation dict (run_evaluate's)."""
    probe, cost, loss = evaluation.get("probe") or {}, evaluation["cost"], evaluation["heldout"]
    model, source = cost["model"], cost["source"]
    workload = f"{cost['input_tokens']} in, {cost['output_tokens']} out"
    rows = [("held-out loss, training objective (nats/token)", _f(loss["loss"]), "-")]
    if probe.get("passages"):
        rows += [
            ("probe target CE with the prefix (nats/token)", _f(probe["encoder"]), _f(probe["source_with_context"])),
            ("probe target CE without it (encoder masked / target alone)", _f(probe["encoder_masked"]),
             _f(probe["source_target_only"])),
            ("what the prefix is worth (encoder_gain / source)", _f(probe["encoder_gain"]),
             _f(probe["source_context_gain"])),
        ]
    rows += [
        ("parameters (shared embedding once)", f"{model['parameters']['total'] / 1e6:.2f}M",
         f"{source['parameters']['total'] / 1e6:.2f}M"),
        ("input tokens/s (encoder / prefill)", f"{model['encoder_tokens_per_s']:.0f}", f"{source['prefill_tokens_per_s']:.0f}"),
        ("ms per output token (cached decoding)", f"{model['decoder_ms_per_token']:.1f}", f"{source['decoder_ms_per_token']:.1f}"),
        (f"generate s ({workload})", f"{model['generate_s']:.3f}", f"{source['generate_s']:.3f}"),
    ]
    lines = ["| metric | model | source |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def evaluation_markdown(evaluation: dict) -> str:
    """evaluation.md: the table, then the details behind it."""
    loss, probe, cost = evaluation["heldout"], evaluation["probe"], evaluation["cost"]
    lines = [f"# Evaluation of `{evaluation['model']}`", "",
             f"Source (decoder-only) model: `{evaluation['source']}`; held-out data: `{evaluation['data']}`.", "",
             evaluation_table(evaluation), "",
             f"## Held-out loss ({loss['examples']} examples, {loss['tokens']} target tokens)", "",
             "| denoiser | loss (nats/token) | examples | tokens |", "|---|---|---|---|"]
    lines += [f"| {name} | {_f(d['loss'])} | {d['examples']} | {d['tokens']} |" for name, d in loss["by_denoiser"].items()]
    lines += ["", f"## Adaptation probe ({probe['passages']} passages of {probe['prefix_tokens']} + "
                  f"{probe['target_tokens']} tokens)", "", f"Passages: {probe['how']}. Inputs: {probe['layout']}.", ""]
    if probe["passages"]:
        lines += ["Target cross-entropy, nats/token: encoder-decoder with the prefix in its encoder "
                  f"{_f(probe['encoder'])}, with the encoder masked out {_f(probe['encoder_masked'])} (encoder_gain "
                  f"{_f(probe['encoder_gain'])}); source with prefix + target {_f(probe['source_with_context'])}, "
                  f"given the target alone {_f(probe['source_target_only'])}.", ""]
    lines += ["## Inference cost", "",
              f"Batch 1, {cost['input_tokens']} tokens in ({cost['input']}), exactly {cost['output_tokens']} out (greedy), "
              f"median of {cost['repeats']} after a warm-up, {cost['torch_threads']} torch threads. "
              "Encoder and decoder parameter counts each include the embedding they use "
              f"(model: encoder {cost['model']['parameters']['encoder']:,}, decoder "
              f"{cost['model']['parameters']['decoder']:,}, shared {cost['model']['parameters']['shared']:,}); "
              "totals count a shared or tied embedding once.", ""]
    if evaluation["samples"]:
        lines += ["## Samples (greedy)", ""]
        for i, sample in enumerate(evaluation["samples"], 1):
            lines += [f"**{i}. prompt**: {_quote(sample['prompt'])}", "",
                      f"- reference: {_quote(sample['reference'])}", f"- model: {_quote(sample['model'])}",
                      f"- source: {_quote(sample['source'])}", ""]
    return "\n".join(lines)


def _f(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _quote(text: str) -> str:
    return "`" + " ".join(text.split()).replace("`", "'") + "`"
