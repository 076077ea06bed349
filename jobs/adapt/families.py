"""Target designs: Gemma 3 -> T5Gemma 2 and Gemma 2 -> T5Gemma.

A design is the target config plus one rule per target parameter. Rules come from walking the
target model's own parameter list (built on the meta device, no memory), so a parameter without a
rule is impossible to miss.
"""

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch

from jobs.adapt.config import AdaptConfig, select_layers
from jobs.adapt.rules import (
    LAYER_RENAMES, Constant, Copy, EmbeddingRow, Normal, Rule, ScaledNorm, TargetTensor, check_plan_covers,
    init_rule_for_unused,
)
from jobs.core.sources import Source
from jobs.core.errors import UserError

_SOURCE_SUFFIX = {target: source for source, target in LAYER_RENAMES.items()}
# Config entries that describe a checkpoint file, not the architecture.
_NOT_ARCHITECTURE = ("model_type", "architectures", "transformers_version", "_name_or_path", "quantization_config",
                     "use_bidirectional_attention", "dtype", "torch_dtype", "output_attentions", "_commit_hash")
# The smallest SigLIP tower T5Gemma2 accepts. It is never used: the exports are text-only.
_UNUSED_VISION = dict(hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                      image_size=1, patch_size=1, num_channels=1)


@dataclass
class Design:
    config: Any  # T5Gemma2Config | T5GemmaConfig
    model_class: Any
    plan: List[TargetTensor]
    cross_attn_warmup: bool  # cross-attention starts random: train it alone first
    notes: List[str]  # lines for the model card


def _source_layer_tensor(layer: int, target_suffix: str) -> str:
    module, _, rest = target_suffix.partition(".")
    return f"layers.{layer}.{_SOURCE_SUFFIX.get(module, module)}.{rest}"


def _stack_fields(source: Source, layers: List[int]) -> Dict[str, Any]:
    fields = {k: v for k, v in source.text_config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    fields["num_hidden_layers"] = len(layers)
    fields["layer_types"] = [source.text_config.layer_types[i] for i in layers]
    return fields


def _meta_parameters(model_class, config) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = model_class(config)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied weights appear once
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    persistent = sorted(k for k in model.state_dict() if k in buffers)
    if persistent:
        raise RuntimeError(f"{model_class.__name__} has persistent buffers t5adapt does not map: {persistent[:5]}")
    return params


def _layers(cfg: AdaptConfig, source: Source, key: str) -> List[int]:
    try:
        return select_layers(getattr(cfg, key), source.text_config.num_hidden_layers, f"adapt.{key}")
    except ValueError as e:
        raise UserError(str(e)) from None


def design_t5gemma2(cfg: AdaptConfig, encoder: Source, decoder: Source) -> Design:
    """Gemma 3 -> T5Gemma 2: one shared embedding, decoder self+cross attention merged (no new weights)."""
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration
    from transformers.models.t5gemma2.configuration_t5gemma2 import T5Gemma2DecoderConfig, T5Gemma2EncoderConfig

    if decoder is not encoder:
        raise UserError(
            "adapt.decoder_source is for Gemma 2 pairs only: T5Gemma 2 shares one embedding between encoder and "
            "decoder, so both come from one Gemma 3 source. Pick the decoder's depth with adapt.decoder_layers instead"
        )
    enc_layers, dec_layers = _layers(cfg, encoder, "encoder_layers"), _layers(cfg, encoder, "decoder_layers")
    text = encoder.text_config
    decoder_config = T5Gemma2DecoderConfig(**_stack_fields(encoder, dec_layers))
    encoder_config = T5Gemma2EncoderConfig(text_config=_stack_fields(encoder, enc_layers),
                                           vision_config=_UNUSED_VISION, mm_tokens_per_image=1)
    config = T5Gemma2Config(encoder=encoder_config, decoder=decoder_config, tie_word_embeddings=True)
    eoi = config.eoi_token_index
    std = config.initializer_range

    def rule(name: str) -> Rule:
        if m := re.fullmatch(r"model\.encoder\.text_model\.layers\.(\d+)\.(.+)", name):
            return Copy("encoder", _source_layer_tensor(enc_layers[int(m[1])], m[2]))
        if m := re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.+)", name):
            return Copy("decoder", _source_layer_tensor(dec_layers[int(m[1])], m[2]))
        if name == "model.encoder.text_model.embed_tokens.weight":
            return Copy("encoder", "embed_tokens.weight")
        if name == "model.encoder.text_model.embed_tokens.eoi_embedding":
            # T5Gemma 2 swaps the end-of-image token's (scaled) embedding for this vector.
            if eoi < text.vocab_size:
                return EmbeddingRow("encoder", "embed_tokens.weight", eoi, math.sqrt(text.hidden_size))
            return Constant(0.0)
        if name == "model.encoder.text_model.norm.weight":
            return _final_norm(cfg.encoder_scale, "encoder")
        if name == "model.decoder.norm.weight":
            return Copy("decoder", "norm.weight")
        if name.startswith(("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")):
            return init_rule_for_unused(name, std)
        raise RuntimeError(f"no adaptation rule for T5Gemma 2 parameter {name}")

    plan = _plan(T5Gemma2ForConditionalGeneration, config, rule)
    notes = [
        f"Encoder: source layers {enc_layers}; decoder: source layers {dec_layers} (bidirectional encoder, "
        "decoder self- and cross-attention merged into one attention with the source's projections).",
        "Text-only: the vision tower exists because the transformers class always builds one; it is the smallest "
        "the class allows (hidden size 4, one layer), randomly initialised and never used.",
    ]
    if cfg.encoder_scale != 1.0:
        notes.append(f"Encoder final norm scaled by {cfg.encoder_scale:g} so the untrained model starts close to "
                     "the source decoder-only model (the encoder's states start near zero and grow in training).")
    return Design(config, T5Gemma2ForConditionalGeneration, plan, cross_attn_warmup=False, notes=notes)


def design_t5gemma(cfg: AdaptConfig, encoder: Source, decoder: Source) -> Design:
    """Gemma 2 -> T5Gemma: separate encoder/decoder stacks, decoder layers gain cross-attention."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

    if encoder.text_config.vocab_size != decoder.text_config.vocab_size:
        raise UserError(f"adapt.source ({encoder.spec}, vocab {encoder.text_config.vocab_size}) and adapt.decoder_source "
                        f"({decoder.spec}, vocab {decoder.text_config.vocab_size}) must share one tokenizer and vocabulary")
    enc_layers, dec_layers = _layers(cfg, encoder, "encoder_layers"), _layers(cfg, decoder, "decoder_layers")
    config = T5GemmaConfig(encoder=T5GemmaModuleConfig(**_stack_fields(encoder, enc_layers)),
                           decoder=T5GemmaModuleConfig(**_stack_fields(decoder, dec_layers)),
                           vocab_size=encoder.text_config.vocab_size, tie_word_embeddings=True)
    # Same widths: cross-attention can start as a copy of self-attention (the paper's balanced init).
    # Different widths: its key/value projections have no source, so it starts random and is warmed up.
    balanced = encoder.text_config.hidden_size == decoder.text_config.hidden_size
    std = config.decoder.initializer_range

    def rule(name: str) -> Rule:
        if m := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.(.+)", name):
            return Copy("encoder", _source_layer_tensor(enc_layers[int(m[1])], m[2]))
        if m := re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(cross_attn\.\w+\.weight|\w+_cross_attn_layernorm\.weight)", name):
            return _cross_attention_rule(dec_layers[int(m[1])], m[2], balanced, cfg.encoder_scale, std)
        if m := re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.+)", name):
            return Copy("decoder", _source_layer_tensor(dec_layers[int(m[1])], m[2]))
        if m := re.fullmatch(r"model\.(encoder|decoder)\.(embed_tokens\.weight|norm\.weight)", name):
            return Copy(m[1], m[2])
        raise RuntimeError(f"no adaptation rule for T5Gemma parameter {name}")

    plan = _plan(T5GemmaForConditionalGeneration, config, rule)
    notes = [f"Encoder: {encoder.spec} layers {enc_layers}; decoder: {decoder.spec} layers {dec_layers}."]
    if balanced:
        notes.append("Cross-attention initialised from each decoder layer's self-attention (balanced pair).")
    else:
        notes.append(f"Unbalanced pair: cross_attention_hidden_size = {encoder.text_config.hidden_size} (encoder width); "
                     f"cross-attention initialised randomly (normal(0, {std:g})) and must be warmed up alone for "
                     f"{cfg.cross_attn_warmup_steps} steps before full training.")
    if cfg.encoder_scale != 1.0:
        notes.append(f"Cross-attention output norm scaled by {cfg.encoder_scale:g} so the untrained model starts close "
                     "to the source decoder-only model.")
    return Design(config, T5GemmaForConditionalGeneration, plan, cross_attn_warmup=not balanced, notes=notes)


def _final_norm(scale: float, role: str) -> Rule:
    return Copy(role, "norm.weight") if scale == 1.0 else ScaledNorm(role, "norm.weight", scale)


def _cross_attention_rule(layer: int, suffix: str, balanced: bool, scale: float, std: float) -> Rule:
    if suffix.startswith("cross_attn."):
        return Copy("decoder", f"layers.{layer}.self_attn.{suffix[len('cross_attn.'):]}") if balanced else Normal(std)
    norm = {"pre_cross_attn_layernorm.weight": "input_layernorm.weight",
            "post_cross_attn_layernorm.weight": "post_attention_layernorm.weight"}[suffix]
    post = suffix.startswith("post_")
    if not balanced:
        # A fresh Gemma norm is w = 0 (scale 1); the post norm also carries the step-0 scale.
        return Constant(scale - 1.0 if post else 0.0)
    if post and scale != 1.0:
        return ScaledNorm("decoder", f"layers.{layer}.{norm}", scale)
    return Copy("decoder", f"layers.{layer}.{norm}")


def _plan(model_class, config, rule) -> List[TargetTensor]:
    expected = _meta_parameters(model_class, config)
    plan = [TargetTensor(name, shape, rule(name)) for name, shape in expected.items()]
    check_plan_covers(plan, expected)
    return plan


# family -> design: a small explicit registry, never an import string from a config.
DESIGNS = {"gemma3": design_t5gemma2, "gemma2": design_t5gemma}
