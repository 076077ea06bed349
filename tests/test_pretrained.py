"""Every stage loads a saved encoder-decoder without transformers' Hub kernels (jobs/core/pretrained):
with the `kernels` package installed (transformers 5 requires it), from_pretrained turns them on
by default, and on a GPU each train()/eval() would fetch kernels from the Hub, which must not
happen at run time and fails offline."""

import pytest
import torch

from jobs.adapt.config import AdaptConfig
from jobs.adapt.stage import build_in_memory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adapted"))
    build_in_memory(AdaptConfig(source="builtin:tiny-gemma3"))[0].save_pretrained(out)
    return out


def test_the_default_would_turn_hub_kernels_on(saved):
    """What the loaders guard against, so that an upgrade that changes the default is noticed."""
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(saved).use_kernels is True


def test_training_and_evaluation_load_without_hub_kernels(saved):
    from jobs.evaluate.stage import load_model as evaluate_load
    from jobs.train.config import TrainConfig
    from jobs.train.loop import load_model as train_load

    model = train_load(saved, TrainConfig(zero_stage=0, num_workers=1, micro_batch_size=1))
    assert model.use_kernels is False
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    model, _ = evaluate_load(saved, "builtin:tiny-gemma3")
    assert model.use_kernels is False
