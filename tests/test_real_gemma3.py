"""The real Gemma 3 270M (shipped on PyPI as GGUF) -> T5Gemma 2 270M-270M, end to end.

About 3-4 minutes on 2 cores: GGUF metadata parse (once), conversion, and transformers' own GGUF
loader as the independent reference for the source model.
"""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from jobs.core import builtin
from jobs.core.shipped_text import prose_documents
from orchestrator.cli import main

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("real") / "t5gemma2-270m-270m")
    assert main(["adapt", os.path.join(REPO, "configs", "quickstart.yaml"), "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def source_model():
    gguf = builtin.materialise("builtin:gemma3-270m")
    folder, name = os.path.split(gguf)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_real_270m_adapts_reloads_and_matches_source(exported, source_model):
    model = AutoModelForSeq2SeqLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert type(model).__name__ == "T5Gemma2ForConditionalGeneration"
    assert model.config.encoder.text_config.num_hidden_layers == 18 and model.config.decoder.num_hidden_layers == 18
    assert len(tokenizer) == 262144

    # Every copied tensor equals what transformers' own GGUF loader produces for the source.
    reference = source_model.state_dict()
    params = dict(model.named_parameters())
    entries = json.load(open(os.path.join(exported, "adapt_manifest.json")))["tensors"]
    copies = [e for e in entries if e["rule"] == "copy"]
    assert len(copies) == 471
    for entry in copies:
        assert torch.equal(params[entry["target"]], reference[entry["source_tensor"]]), entry["target"]

    # Mapping fidelity: with the encoder masked out, the decoder reproduces the source's logits.
    text = prose_documents()[5]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        expected = source_model(input_ids=ids).logits
        encoded = model.get_encoder()(input_ids=ids)
        masked = model(encoder_outputs=encoded, attention_mask=torch.zeros_like(ids), decoder_input_ids=ids).logits
    assert (masked - expected).abs().max().item() < 1e-3  # float32 round-off over 18 layers, logits ~O(30)

    # ...and so does greedy generation: the adapted decoder continues English like the source does.
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        source_tokens = source_model.generate(prompt, max_new_tokens=12, do_sample=False)
        adapted_tokens = model.generate(input_ids=prompt, attention_mask=torch.zeros_like(prompt),
                                        decoder_input_ids=prompt, max_new_tokens=12, do_sample=False)
    assert adapted_tokens.tolist() == source_tokens.tolist()
    assert "France" in tokenizer.decode(adapted_tokens[0])
