"""Adaptation on tiny random Gemma 2 / Gemma 3 sources: mapping, identities, export, reuse."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from jobs.adapt.stage import STAGE_INFO, build_in_memory, run_adapt
from orchestrator.cli import main
from orchestrator.config import load_config
from jobs.core.errors import UserError

from .conftest import REPO, builtin_path

TINY = os.path.join(REPO, "configs", "tiny.yaml")
GEMMA2 = ["adapt.source=builtin:tiny-gemma2"]
UNBALANCED = GEMMA2 + ["adapt.decoder_source=builtin:tiny-gemma2-narrow", "adapt.cross_attn_warmup_steps=5"]


def adapted(cfg, out, force=False):
    """run_adapt under the stage key the controller would give it (no data plan recorded)."""
    from orchestrator.keys import adapt_key

    return run_adapt(cfg, out, adapt_key(cfg, None), force=force)


def adapt_cfg(*overrides):
    return load_config(TINY, list(overrides)).adapt


def source_tensors(name):
    """The source checkpoint read independently of t5adapt's reader (safetensors' own API)."""
    path = builtin_path(name)
    tensors = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), "pt") as f:
                tensors.update({k.removeprefix("model."): f.get_tensor(k) for k in f.keys()})
    return tensors


def source_model(name):
    return AutoModelForCausalLM.from_pretrained(builtin_path(name)).eval()


def token_ids(batch=2, length=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(40, 512, (batch, length), generator=generator)
    ids[:, 0] = 2  # <bos>, as the source model saw in pre-training
    return ids


@pytest.fixture(scope="module")
def t5gemma2():
    return build_in_memory(adapt_cfg())


def test_t5gemma2_every_tensor_equals_its_source(t5gemma2):
    model, design, _ = t5gemma2
    source = source_tensors("builtin:tiny-gemma3")
    params = dict(model.named_parameters())
    copied = 0
    for target in design.plan:
        if type(target.rule).__name__ == "Copy":
            assert torch.equal(params[target.name], source[target.rule.source_name]), target.name
            copied += 1
    # 6 layers x 13 tensors per stack, twice, plus the embedding and 2 final norms
    assert copied == 2 * 6 * 13 + 3
    layer = model.model.encoder.text_model.layers[2]
    assert torch.equal(layer.pre_self_attn_layernorm.weight, source["layers.2.input_layernorm.weight"])
    assert torch.equal(layer.post_self_attn_layernorm.weight, source["layers.2.post_attention_layernorm.weight"])
    assert model.lm_head.out_proj.weight.data_ptr() == model.model.encoder.text_model.embed_tokens.weight.data_ptr()
    assert model.model.decoder.embed_tokens.weight.data_ptr() == model.model.encoder.text_model.embed_tokens.weight.data_ptr()
    assert model.config.decoder.layer_types == source_model("builtin:tiny-gemma3").config.layer_types


def test_t5gemma2_masked_encoder_reproduces_source_logits(t5gemma2):
    model, _, _ = t5gemma2
    ids = token_ids()
    with torch.no_grad():
        reference = source_model("builtin:tiny-gemma3")(input_ids=ids).logits
        encoded = model.get_encoder()(input_ids=token_ids(seed=1))
        masked = model(encoder_outputs=encoded, attention_mask=torch.zeros(2, 40, dtype=torch.long),
                       decoder_input_ids=ids).logits
        unmasked = model(encoder_outputs=encoded, decoder_input_ids=ids).logits
    assert (masked - reference).abs().max().item() < 1e-5
    # The check has teeth: with the encoder visible, the logits move.
    assert (unmasked - reference).abs().max().item() > 1e-2


def test_t5gemma2_layer_selection_and_depths():
    model, design, _ = build_in_memory(adapt_cfg("adapt.encoder_layers=every:2", "adapt.decoder_layers=last:3"))
    source = source_tensors("builtin:tiny-gemma3")
    assert len(model.model.encoder.text_model.layers) == 3 and len(model.model.decoder.layers) == 3
    for target_index, source_index in enumerate([0, 2, 4]):
        layer = model.model.encoder.text_model.layers[target_index]
        assert torch.equal(layer.mlp.up_proj.weight, source[f"layers.{source_index}.mlp.up_proj.weight"])
    for target_index, source_index in enumerate([3, 4, 5]):
        layer = model.model.decoder.layers[target_index]
        assert torch.equal(layer.self_attn.k_norm.weight, source[f"layers.{source_index}.self_attn.k_norm.weight"])
    source_types = source_model("builtin:tiny-gemma3").config.layer_types
    assert model.config.decoder.layer_types == source_types[3:]
    assert model.config.encoder.text_config.layer_types == source_types[0:6:2]


def test_t5gemma2_encoder_scale_zero_silences_encoder():
    model, _, _ = build_in_memory(adapt_cfg("adapt.encoder_scale=0.0"))
    ids = token_ids()
    with torch.no_grad():
        states = model.get_encoder()(input_ids=ids).last_hidden_state
    assert states.abs().max().item() == 0.0


def test_t5gemma_balanced_cross_attention_starts_as_self_attention():
    model, design, _ = build_in_memory(adapt_cfg(*GEMMA2))
    assert type(model).__name__ == "T5GemmaForConditionalGeneration" and not design.cross_attn_warmup
    source = source_tensors("builtin:tiny-gemma2")
    for i, layer in enumerate(model.model.decoder.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(layer.cross_attn, proj).weight, source[f"layers.{i}.self_attn.{proj}.weight"])
        assert torch.equal(layer.pre_cross_attn_layernorm.weight, source[f"layers.{i}.input_layernorm.weight"])
    assert torch.equal(model.model.encoder.embed_tokens.weight, source["embed_tokens.weight"])
    assert torch.equal(model.model.decoder.embed_tokens.weight, source["embed_tokens.weight"])


@pytest.mark.parametrize("overrides", [GEMMA2, UNBALANCED], ids=["balanced", "unbalanced"])
def test_t5gemma_zeroed_cross_attention_reproduces_source_logits(overrides):
    model, _, sources = build_in_memory(adapt_cfg(*overrides))
    ids = token_ids()
    decoder_source = "builtin:tiny-gemma2-narrow" if len(overrides) > 1 else "builtin:tiny-gemma2"
    with torch.no_grad():
        reference = source_model(decoder_source)(input_ids=ids).logits
        before = model(input_ids=token_ids(seed=1), decoder_input_ids=ids).logits
        for layer in model.model.decoder.layers:
            layer.cross_attn.o_proj.weight.zero_()
        after = model(input_ids=token_ids(seed=1), decoder_input_ids=ids).logits
    assert (after - reference).abs().max().item() < 1e-5
    assert (before - reference).abs().max().item() > 1e-3


def test_t5gemma_encoder_scale_zero_reproduces_source_without_surgery():
    model, _, _ = build_in_memory(adapt_cfg(*GEMMA2, "adapt.encoder_scale=0.0"))
    ids = token_ids()
    with torch.no_grad():
        reference = source_model("builtin:tiny-gemma2")(input_ids=ids).logits
        logits = model(input_ids=token_ids(seed=1), decoder_input_ids=ids).logits
    assert (logits - reference).abs().max().item() < 1e-5


def test_unbalanced_shapes_and_warmup_marker(tmp_path):
    out = adapted(adapt_cfg(*UNBALANCED), str(tmp_path / "out"))
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    config = model.config
    assert (config.encoder.hidden_size, config.decoder.hidden_size) == (64, 48)
    assert config.decoder.cross_attention_hidden_size == 64
    layer = model.model.decoder.layers[0]
    assert tuple(layer.cross_attn.k_proj.weight.shape) == (24, 64)  # kv heads x head_dim, encoder width
    assert tuple(layer.cross_attn.q_proj.weight.shape) == (48, 48)
    assert len(model.model.encoder.layers) == 4 and len(model.model.decoder.layers) == 2
    info = json.load(open(os.path.join(out, STAGE_INFO)))
    assert info["cross_attn_warmup"]["required"] is True and info["cross_attn_warmup"]["steps"] == 5
    manifest = {e["target"]: e for e in json.load(open(os.path.join(out, "adapt_manifest.json")))["tensors"]}
    assert manifest["model.decoder.layers.0.cross_attn.k_proj.weight"]["rule"] == "normal(0, 0.02)"
    assert manifest["model.decoder.layers.1.self_attn.q_proj.weight"]["source"] == "builtin:tiny-gemma2-narrow"
    assert "warmed up alone for 5 steps" in open(os.path.join(out, "README.md")).read()


def test_random_init_is_a_pure_function_of_seed_and_name():
    a = build_in_memory(adapt_cfg(*UNBALANCED))[0].model.decoder.layers[1].cross_attn.v_proj.weight
    b = build_in_memory(adapt_cfg(*UNBALANCED, "adapt.decoder_layers=last:1"))[0].model.decoder.layers[0].cross_attn.v_proj.weight
    c = build_in_memory(adapt_cfg(*UNBALANCED, "adapt.seed=1"))[0].model.decoder.layers[1].cross_attn.v_proj.weight
    assert a.std().item() == pytest.approx(0.02, rel=0.2)
    assert not torch.equal(a, c)
    assert b.shape == a.shape  # same name in another plan draws from another stream
    assert not torch.equal(a, b)


def test_export_reloads_with_identical_logits_and_generates(tmp_path):
    cfg = adapt_cfg()
    out = str(tmp_path / "export")
    assert main(["adapt", TINY, "--out", out]) == 0
    in_memory, _, _ = build_in_memory(cfg)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "T5Gemma2ForConditionalGeneration"
    ids = token_ids()
    with torch.no_grad():
        expected = in_memory(input_ids=ids, decoder_input_ids=ids[:, :12]).logits
        actual = loaded(input_ids=ids, decoder_input_ids=ids[:, :12]).logits
    assert torch.equal(expected, actual)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(["Assignment statements bind names"], return_tensors="pt")
    generated = loaded.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > 1
    # Sharded as configured (max_shard_mb: 1), with an index, a manifest whose checksums match the files.
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    manifest = json.load(open(os.path.join(out, "adapt_manifest.json")))
    assert manifest["files"] == files
    from jobs.core.tensors import tensor_sha256
    stored = {}
    for file in files:
        with safe_open(os.path.join(out, file), "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(stored) == {e["target"] for e in manifest["tensors"]}
    for entry in manifest["tensors"]:
        assert tensor_sha256(stored[entry["target"]]) == entry["sha256"], entry["target"]
    card = open(os.path.join(out, "README.md")).read()
    assert "builtin:tiny-gemma3" in card and "text-only" in card.lower()


def test_bfloat16_export_loads(tmp_path):
    out = adapted(adapt_cfg("adapt.dtype=bfloat16"), str(tmp_path / "bf16"))
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert model.model.decoder.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    reference = source_tensors("builtin:tiny-gemma3")["layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(model.model.decoder.layers[0].mlp.up_proj.weight, reference)


def test_finished_output_is_reused_and_never_overwritten_silently(tmp_path):
    out = str(tmp_path / "out")
    adapted(adapt_cfg(), out)
    stamp = os.path.getmtime(os.path.join(out, "config.json"))
    adapted(adapt_cfg(), out)  # same config: reused
    assert os.path.getmtime(os.path.join(out, "config.json")) == stamp
    with pytest.raises(UserError, match=r"holds finished output made from another config.*--force"):
        adapted(adapt_cfg("adapt.decoder_layers=first:2"), out)
    adapted(adapt_cfg("adapt.decoder_layers=first:2"), out, force=True)
    assert AutoModelForSeq2SeqLM.from_pretrained(out).config.decoder.num_hidden_layers == 2
    assert not os.path.exists(out + ".partial")
    # Without its COMMITTED marker an output is an interrupted attempt: redone, not refused.
    os.remove(os.path.join(out, "COMMITTED"))
    adapted(adapt_cfg(), out)
    assert AutoModelForSeq2SeqLM.from_pretrained(out).config.decoder.num_hidden_layers == 6
    assert os.path.isfile(os.path.join(out, "COMMITTED"))
