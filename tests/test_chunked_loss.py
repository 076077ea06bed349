"""Chunked token cross-entropy (jobs/train/chunked_loss.py) against the reference that takes
transformers' own logits (examples_io.token_losses): losses, gradients, the final logit soft-cap,
that no logits-sized tensor is kept for backward. Through the training loop under ZeRO-3 on 2 ranks
(unequal target counts, so unequal chunk counts): tests/test_loss_normalisation.py."""

import functools

import pytest
import torch

from jobs.adapt.config import AdaptConfig
from jobs.adapt.stage import build_in_memory
from jobs.core.builtin import TINY_VOCAB
from jobs.core.examples_io import IGNORE, token_losses
from jobs.train import chunked_loss
from jobs.train.chunked_loss import chunked_token_losses, decoder_hidden_states


# Gemma 3 -> T5Gemma 2 (no soft-cap by default); Gemma 2 -> T5Gemma (final_logit_softcapping 30).
SOURCES = ["builtin:tiny-gemma3", "builtin:tiny-gemma2"]
CHUNK = 4  # the batch below has 21 targets: the last chunk is a partial one


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation on a busy 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def models():
    """{source: the tiny adapted encoder-decoder, in train mode (its dropout rates are 0)}."""
    return {source: build_in_memory(AdaptConfig(source=source))[0].train() for source in SOURCES}


def make_batch(seed: int = 0) -> dict:
    """3 examples, encoder lengths 12/8/10 and target lengths 9/5/7 of 9 (21 targets), padded as
    examples_io.make_collate pads them."""
    generator = torch.Generator().manual_seed(seed)
    encoder_lengths, decoder_lengths = torch.tensor([12, 8, 10]), torch.tensor([9, 5, 7])
    encoder_mask = (torch.arange(12)[None] < encoder_lengths[:, None]).long()
    decoder_mask = (torch.arange(9)[None] < decoder_lengths[:, None]).long()
    labels = torch.randint(5, TINY_VOCAB, (3, 9), generator=generator)
    return {"input_ids": torch.randint(5, TINY_VOCAB, (3, 12), generator=generator) * encoder_mask,
            "attention_mask": encoder_mask,
            "decoder_input_ids": torch.randint(5, TINY_VOCAB, (3, 9), generator=generator) * decoder_mask,
            "decoder_attention_mask": decoder_mask,
            "labels": labels.masked_fill(decoder_mask == 0, IGNORE)}


def losses_and_grads(loss_fn, model, batch):
    """(token_loss, mask, {parameter name: grad of token_loss.sum() or None})."""
    token_loss, mask = loss_fn(model, batch)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(token_loss.sum(), params, allow_unused=True)
    return token_loss.detach(), mask, dict(zip(names, grads))


def assert_same_grads(expected: dict, actual: dict):
    """Same parameters reached, same gradients (torch tensors or numpy arrays) to float32 tolerance."""
    assert sum(g is not None for g in expected.values()) > 10, "the reference should reach the whole model"
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, name
        else:
            torch.testing.assert_close(torch.as_tensor(actual[name]), torch.as_tensor(grad),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("source", SOURCES)
def test_losses_and_gradients_match_transformers_logits(models, source):
    model, batch = models[source], make_batch()
    assert int((batch["labels"] != IGNORE).sum()) % CHUNK, "the chunk size should not divide the targets"
    expected, expected_mask, expected_grads = losses_and_grads(token_losses, model, batch)
    chunked = functools.partial(chunked_token_losses, chunk_tokens=CHUNK)
    token_loss, mask, grads = losses_and_grads(chunked, model, batch)
    assert token_loss.dtype == torch.float32 and token_loss.shape == batch["labels"].shape
    assert torch.equal(mask, expected_mask)
    assert torch.all(token_loss[~mask] == 0) and torch.all(token_loss[mask] > 0)
    torch.testing.assert_close(token_loss, expected)
    assert_same_grads(expected_grads, grads)
    with torch.no_grad():  # evaluation's path runs the chunks without checkpoints
        torch.testing.assert_close(chunked(model, batch)[0], expected)


@pytest.mark.parametrize("source", SOURCES)
def test_final_logit_softcap_is_applied(models, source, monkeypatch):
    model, batch = models[source], make_batch(seed=1)
    # The tiny random models' logits stay within about +-0.6, where a cap of 30 (Gemma 2's) or even
    # 5 changes nothing measurable; 0.25 makes the tanh bite.
    monkeypatch.setattr(model.config.decoder, "final_logit_softcapping", 0.25)
    expected, _, expected_grads = losses_and_grads(token_losses, model, batch)
    token_loss, _, grads = losses_and_grads(functools.partial(chunked_token_losses, chunk_tokens=CHUNK), model, batch)
    torch.testing.assert_close(token_loss, expected)
    assert_same_grads(expected_grads, grads)
    with torch.no_grad():
        logits = model.lm_head(decoder_hidden_states(model, batch))
        uncapped = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                     ignore_index=IGNORE, reduction="none").view_as(expected)
    assert (uncapped - expected).abs().max() > 0.05, "without the cap the losses should differ"


@pytest.mark.parametrize("source", SOURCES)
def test_no_logits_are_kept_for_backward(models, source):
    """The reference keeps [batch, length, vocab] tensors for backward; the chunked loss keeps none
    (each chunk's checkpoint recomputes its logits in backward)."""
    model, batch = models[source], make_batch()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def kept_logits(loss_fn) -> int:
        """How many non-empty vocabulary-wide tensors autograd keeps, besides views of the head weight."""
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            loss_fn(model, batch)[0].sum()
        return sum(t.dim() > 0 and t.numel() > 0 and t.shape[-1] == TINY_VOCAB
                   and t.untyped_storage().data_ptr() not in weights for t in kept)

    assert kept_logits(token_losses) > 0, "the check should see the reference's logits"
    assert kept_logits(functools.partial(chunked_token_losses, chunk_tokens=CHUNK)) == 0


def test_other_models_and_autocast_engines_fall_back(models, monkeypatch):
    monkeypatch.setattr(chunked_loss, "token_losses", lambda model, batch: "reference")
    assert chunked_token_losses(torch.nn.Linear(2, 2), make_batch()) == "reference"

    class AutocastEngine:
        module = models[SOURCES[0]]

        def torch_autocast_enabled(self):
            return True

    assert chunked_token_losses(AutocastEngine(), make_batch()) == "reference"
    with pytest.raises(ValueError, match="chunk_tokens=0 must be at least 1"):
        chunked_token_losses(models[SOURCES[0]], make_batch(), chunk_tokens=0)
