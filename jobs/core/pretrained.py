"""Loading a saved encoder-decoder with transformers, the same way in every stage.

transformers 5 requires the `kernels` package, and with it installed `from_pretrained` turns on
layer kernels fetched from the Hugging Face Hub unless told otherwise; each later train()/eval()
swaps them again for the device the model is on. Nothing here may download at run time, and on a
GPU worker without internet the lookup fails ("not available in the local cache and Hugging Face
Hub is in offline mode"), so every load turns them off: the model runs torch's own kernels (SDPA
for attention where the model has it).
"""

import torch


def load_seq2seq(path: str, **kwargs) -> torch.nn.Module:
    """The checkpoint in local directory `path` as an AutoModelForSeq2SeqLM in float32, without Hub
    kernels; kwargs go to from_pretrained (e.g. attn_implementation)."""
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32, use_kernels=False, **kwargs)
