"""A few greedy generations from held-out prefixes, by the encoder-decoder and by its source."""

from typing import List

import torch

from jobs.evaluate.probe import encoder_inputs


@torch.no_grad()
def sample_generations(model, source, tokenizer, prefixes: torch.Tensor, references: torch.Tensor, metadata: dict,
                       new_tokens: int) -> List[dict]:
    """One record per prefix: {"prompt", "reference" (the held-out continuation), "model", "source"},
    decoded text (special tokens dropped). The model reads the prefix in its encoder, laid out as in
    the probe; the source continues [BOS] + prefix. Greedy, up to `new_tokens` tokens (EOS ends one)."""
    records = []
    for prefix, reference in zip(prefixes, references):
        encoder_ids = encoder_inputs(prefix[None], metadata)
        made = model.generate(input_ids=encoder_ids, attention_mask=torch.ones_like(encoder_ids),
                              max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=metadata["pad_id"])[0]
        prompt = torch.cat([torch.tensor([metadata["bos_id"]]), prefix])[None]
        continued = source.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                    do_sample=False, num_beams=1, pad_token_id=metadata["pad_id"])[0, prompt.shape[1]:]
        text = lambda ids: tokenizer.decode(ids.tolist(), skip_special_tokens=True)  # noqa: E731
        records.append({"prompt": text(prefix), "reference": text(reference), "model": text(made),
                        "source": text(continued)})
    return records
