"""Train config validation, the generated DeepSpeed config, the lr schedule and batch padding (no Ray)."""

import os

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import load_config
from jobs.core.errors import UserError

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


def test_global_batch_cross_check_names_the_keys():
    with pytest.raises(UserError, match=r"train.micro_batch_size \* train.grad_accum_steps \* train.num_workers must "
                                        r"equal train.global_batch_size \(4\*2\*3 != 32\)"):
        load_config(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.num_workers=3",
                           "train.global_batch_size=32"])
    assert load_config(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.num_workers=4",
                              "train.global_batch_size=32"]).train.global_batch == 32


@pytest.mark.parametrize("override, message", [
    ("train.deepspeed={zero_optimization: {stage: 1}}", r"train.deepspeed.zero_optimization.stage conflicts .* train.zero_stage"),
    ("train.deepspeed={train_micro_batch_size_per_gpu: 8}", r"through train.micro_batch_size"),
    ("train.deepspeed={optimizer: {type: Adam}}", r"train.deepspeed.optimizer.type conflicts"),
    ("train.zero_stage=4", r"train.zero_stage=4 must be 0, 1, 2 or 3"),
    ("train.offload_params=true", r"train.offload_params=true needs train.zero_stage=3"),
    ("train.keep_checkpoints=1", r"train.keep_checkpoints=1 must be at least 2"),
    ("train.schedule=linear", r"train.schedule='linear' must be one of cosine, constant"),
    ("train.zero_stag=3", r"unknown config key train.zero_stag .*did you mean train.zero_stage\?"),
])
def test_bad_train_config_names_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(TINY, [override])


def test_deepspeed_config_is_generated_from_the_typed_fields():
    from jobs.train.deepspeed_config import build_deepspeed_config

    cfg = load_config(TINY, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                             "train.grad_accum_steps=4", "train.grad_clip=0.5",
                             "train.deepspeed={zero_optimization: {overlap_comm: true}, comms_logger: {enabled: false}}"]).train
    ds = build_deepspeed_config(cfg)
    assert ds["train_batch_size"] == 2 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["comms_logger"] == {"enabled": False}
    gpu = load_config(TINY, ["train.use_gpu=true"]).train
    assert build_deepspeed_config(gpu)["bf16"] == {"enabled": True}
    # bf16 on CPU workers only when asked for (slow; for checks such as tests/test_bf16_export.py).
    cpu_bf16 = load_config(TINY, ["train.precision=bf16"]).train
    assert not cpu_bf16.use_gpu and build_deepspeed_config(cpu_bf16)["bf16"] == {"enabled": True}


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    from jobs.train.schedule import learning_rate

    cfg = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=4", "train.max_steps=14", "train.min_lr_ratio=0.1"]).train
    lrs = [learning_rate(s, cfg) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and abs(lrs[9] - 0.55) < 1e-12 and abs(lrs[14] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    constant = load_config(TINY, ["train.schedule=constant", "train.lr=1.0", "train.warmup_steps=2"]).train
    assert [learning_rate(s, constant) for s in (0, 1, 2, 29)] == [0.5, 1.0, 1.0, 1.0]


def test_cross_attention_groups_get_lr_zero_elsewhere_during_warmup():
    from jobs.train.schedule import count_parameters, param_groups, set_learning_rate

    model = torch.nn.ModuleDict({"self_attn": torch.nn.Linear(4, 4), "cross_attn": torch.nn.Linear(4, 4)})
    groups = param_groups(model, ["cross_attn."], weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups)
    cfg = load_config(TINY, ["train.lr=1.0", "train.warmup_steps=0", "train.schedule=constant"]).train
    set_learning_rate(optimizer, 1, cfg, warmup_cross_attn=2)
    lrs = {(g["t5adapt_phase"], g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert lrs == {("cross_attn", 0.0): 1.0, ("cross_attn", 0.1): 1.0, ("rest", 0.0): 0.0, ("rest", 0.1): 0.0}
    assert count_parameters(groups, 1, 2) == {"trainable": 20, "frozen": 20}
    set_learning_rate(optimizer, 2, cfg, warmup_cross_attn=2)
    assert all(g["lr"] == 1.0 for g in optimizer.param_groups)
    assert count_parameters(groups, 2, 2) == {"trainable": 40, "frozen": 0}


def test_collate_pads_to_fixed_shapes_and_masks_label_padding():
    from jobs.core.examples_io import IGNORE, make_collate

    rows = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
            "decoder_input_ids": np.array([np.array([2, 9]), np.array([2])], dtype=object),
            "labels": np.array([np.array([9, 1]), np.array([1])], dtype=object), "denoiser": np.array([3, 0])}
    batch = make_collate(encoder_length=5, decoder_length=3, pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1, IGNORE], [1, IGNORE, IGNORE]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert batch["denoiser"].tolist() == [3, 0]


@pytest.mark.parametrize("overrides", [[], ["adapt.source=builtin:tiny-gemma2",
                                              "adapt.decoder_source=builtin:tiny-gemma2-narrow"]],
                         ids=["t5gemma2-merged-attention", "t5gemma-unbalanced-cross-attention"])
def test_flops_per_example_matches_torch_flop_counter(overrides):
    """The MFU numerator against torch's own count of one forward + backward (eager attention, so
    the score and value products are matmuls it counts), with encoder longer and shorter than decoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from jobs.adapt.stage import build_in_memory
    from jobs.train.metrics import flops_per_example

    model, _, _ = build_in_memory(load_config(TINY, overrides).adapt)
    model.set_attn_implementation("eager")
    model.config.use_cache = False
    for encoder_length, decoder_length in ((16, 8), (8, 16)):
        ids, decoder_ids = torch.randint(5, 100, (1, encoder_length)), torch.randint(5, 100, (1, decoder_length))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, decoder_input_ids=decoder_ids).logits.sum().backward()
        estimate = flops_per_example(model, encoder_length, decoder_length)
        assert estimate == pytest.approx(counter.get_total_flops(), rel=0.015), (encoder_length, decoder_length)


def test_train_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for phrase in ("DeepSpeed ZeRO", "resumes from the newest intact checkpoint", "train.use_gpu=true", "STORE/train-KEY"):
        assert phrase in text


def test_more_workers_than_the_machine_has_is_refused_before_anything_starts(tmp_path, capsys):
    code = main(["train", TINY, "--root", str(tmp_path), "train.num_workers=100"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.num_workers x train.cpus_per_worker = 100 x 1" in err and "this machine has" in err
    assert not os.path.exists(tmp_path / "stages") or not os.listdir(tmp_path / "stages")  # nothing was built


def test_zero_at_one_worker_without_offload_is_advised_against(caplog):
    from jobs.train.stage import advise

    advise(load_config(TINY, ["train.num_workers=1", "train.zero_stage=2"]).train)
    assert "train.zero_stage=2 with one worker partitions nothing" in caplog.text
    caplog.clear()
    for overrides in (["train.num_workers=1", "train.zero_stage=0"], ["train.num_workers=2", "train.zero_stage=2"],
                      ["train.num_workers=1", "train.zero_stage=2", "train.offload_optimizer=true"]):
        advise(load_config(TINY, overrides).train)
    assert "partitions nothing" not in caplog.text
