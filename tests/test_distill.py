"""Distillation from the decoder-only source (jobs/train/distill.py, jobs/core/teacher_io.py): the
teacher's positions line up with the student's targets, the loss is the KL divergence (zero when the
student is the teacher), stored top-k round-trips exactly, and the loop's gradient is the one plain
PyTorch gets from (1 - w) * CE + w * KD. Tiny random Gemma models, real transformers classes, no Ray."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.core.errors import UserError
from jobs.core.examples_io import make_collate, seq2seq_logits
from jobs.core.teacher_io import TeacherLayout, collate_online, collate_stored, teacher_topk
from jobs.train.config import DistillConfig
from jobs.train.distill import kd_token_losses, with_teacher

BOS, EOS, PAD, MODE = 2, 1, 0, 7
ENCODER, DECODER = 12, 8
# R, S: one R/X denoiser (no teacher) and the PrefixLM one.
METADATA = {"denoisers": [{"name": "R", "mode_token": "[NLU]"}, {"name": "S", "mode_token": "[S2S]"}],
            "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "encoder_length": ENCODER, "decoder_length": DECODER}


def _rows(examples):
    """Prepared columns (jobs/data/examples.py's layout) of (denoiser, prefix, target) triples."""
    columns = {"example_index": [], "input_ids": [], "decoder_input_ids": [], "labels": [], "denoiser": []}
    for index, (denoiser, prefix, target) in enumerate(examples):
        labels = np.array(list(target) + [EOS], dtype=np.int32)
        columns["example_index"].append(index)
        columns["input_ids"].append(np.array([MODE] + list(prefix) + [EOS], dtype=np.int32))
        columns["labels"].append(labels)
        columns["decoder_input_ids"].append(np.concatenate([[BOS], labels[:-1]]).astype(np.int32))
        columns["denoiser"].append(denoiser)
    out = {}
    for name, values in columns.items():
        array = np.empty(len(values), dtype=object)
        array[:] = values
        out[name] = array
    return out


def _random_examples(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(1 if i != 1 else 0, rng.integers(10, 500, int(rng.integers(1, ENCODER - 2))),
             rng.integers(10, 500, int(rng.integers(2, DECODER))))
            for i in range(count)]


@pytest.fixture(scope="module")
def tiny():
    """(adapted T5Gemma 2 student at paper init, its Gemma 3 source as teacher)."""
    from jobs.adapt.config import AdaptConfig
    from jobs.adapt.stage import build_in_memory
    from jobs.core.sources import load_causal_lm

    student, _, _ = build_in_memory(AdaptConfig(source="builtin:tiny-gemma3"))
    return student.float().eval(), load_causal_lm("builtin:tiny-gemma3")


def _batch(rows, top_k=0):
    cfg = DistillConfig(enabled=True, top_k=top_k)
    return with_teacher(make_collate(ENCODER, DECODER, PAD), cfg, METADATA, DECODER)(rows)


def test_teacher_positions_predict_the_targets():
    """Teacher position positions[t] holds the token just before target t: BOS + prefix + target[:-1]."""
    examples = _random_examples()
    rows = _rows(examples)
    online = collate_online(rows, TeacherLayout.of(METADATA), DECODER)
    s_rows = [i for i, (d, _, _) in enumerate(examples) if d == 1]
    assert online["teacher_rows"].tolist() == s_rows  # R rows get no teacher
    for k, i in enumerate(s_rows):
        _, prefix, target = examples[i]
        ids = online["teacher_input_ids"][k]
        assert ids[0] == BOS and ids[1:1 + len(prefix)].tolist() == list(prefix)
        assert online["teacher_mask"][k].sum() == len(target)  # every target but the closing EOS
        for t in range(len(target)):
            position = online["teacher_positions"][k, t]
            before = prefix[-1] if t == 0 and len(prefix) else (BOS if t == 0 else target[t - 1])
            assert ids[position] == before, (i, t)


@pytest.mark.parametrize("source", ["builtin:tiny-gemma3", "builtin:tiny-gemma2"])
def test_teacher_logits_equal_its_own_forward(source):
    """causal_logits (hidden states gathered, then the head and Gemma 2's soft-capping) equals the
    model's own forward at those positions, with right padding across rows."""
    from jobs.core.sources import load_causal_lm
    from jobs.core.teacher_io import causal_logits

    teacher = load_causal_lm(source)
    examples = [(1, p, t) for _, p, t in _random_examples(5, seed=1)]
    online = collate_online(_rows(examples), TeacherLayout.of(METADATA), DECODER)
    with torch.no_grad():
        picked = causal_logits(teacher, online["teacher_input_ids"], online["teacher_attention_mask"],
                               online["teacher_positions"])
        for row in range(len(examples)):
            length = int(online["teacher_attention_mask"][row].sum())
            full = teacher(input_ids=online["teacher_input_ids"][row:row + 1, :length]).logits[0]
            mask = online["teacher_mask"][row]
            torch.testing.assert_close(picked[row][mask], full[online["teacher_positions"][row][mask]],
                                       rtol=1e-5, atol=1e-5)
    if source.endswith("gemma2"):
        assert teacher.config.final_logit_softcapping  # the soft-capping branch ran


def test_kd_is_zero_when_the_student_is_the_teacher(tiny):
    """An S example with an empty prefix and the encoder masked: the adapted decoder is the source on
    BOS + target, exactly what the teacher reads, so the KL divergence is 0 (temperature 1, full
    vocabulary, and top-k = the whole vocabulary). With a prefix the student differs: KD > 0."""
    student, teacher = tiny
    vocab = teacher.config.vocab_size
    targets = [np.arange(20, 20 + n) * 7 % 500 for n in (3, 7, 5)]
    empty = _rows([(1, [], t) for t in targets])
    for top_k in (0, vocab):
        batch = _batch(empty, top_k)
        batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])  # the encoder masked
        with torch.no_grad():
            kd = kd_token_losses(seq2seq_logits(student, batch), teacher_topk(teacher, batch, top_k), 1.0)
        assert batch["teacher_mask"].sum() == sum(len(t) for t in targets)
        assert kd.abs().max() < 1e-5, (top_k, kd.abs().max())
    with_prefix = _batch(_rows([(1, np.arange(30, 38), t) for t in targets]))
    with torch.no_grad():
        kd = kd_token_losses(seq2seq_logits(student, with_prefix), teacher_topk(teacher, with_prefix, 0), 1.0)
    assert kd[with_prefix["teacher_mask"]].mean() > 1e-3


def test_kd_over_top_k_is_the_kl_of_the_renormalised_teacher():
    """Against torch's kl_div on hand-made distributions, at temperature 2 (T^2-scaled)."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, 3, 50, generator=generator)
    teacher_logits = torch.randn(1, 3, 50, generator=generator) * 3
    logprobs, ids = torch.log_softmax(teacher_logits, -1).topk(10, dim=-1)
    soft = {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_rows": torch.tensor([0]),
            "teacher_mask": torch.tensor([[True, True, False]])}
    kd = kd_token_losses(student, soft, 2.0)
    q = torch.softmax(torch.gather(teacher_logits, -1, ids) / 2.0, -1)
    p = torch.gather(torch.log_softmax(student / 2.0, -1), -1, ids)
    expected = torch.nn.functional.kl_div(p, q, reduction="none").sum(-1) * 4.0
    torch.testing.assert_close(kd[0, :2], expected[0, :2])
    assert kd[0, 2] == 0  # no teacher there


def _prepared_part(root, rows):
    from jobs.data.examples import examples_table

    table = examples_table({c: list(v) for c, v in rows.items()})
    pq.write_table(table, os.path.join(root, "part-000000.parquet"))
    metadata = dict(METADATA, files=[{"name": "part-000000.parquet", "examples": len(rows["input_ids"]),
                                      "first_example": 0}], num_examples=len(rows["input_ids"]))
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump(metadata, f)
    return metadata


def test_stored_top_k_round_trips_exactly(tiny, tmp_path):
    """teach_part -> Parquet -> RankReader beside the prepared part -> collate_stored gives bitwise
    what the online teacher computes; R rows store nothing; a teacher file of other rows is refused."""
    from jobs.core.examples_io import COLUMNS, read_table, write_parquet
    from jobs.teacher.stage import teach_part
    from jobs.train.batches import RankReader

    _, teacher = tiny
    data, stored = tmp_path / "data", tmp_path / "teacher"
    data.mkdir()
    rows = _rows(_random_examples(7, seed=2))
    metadata = _prepared_part(str(data), rows)
    layout = TeacherLayout.of(METADATA)
    table = teach_part(teacher, read_table(str(data), "part-000000.parquet", COLUMNS),
                       layout, top_k=5, batch_size=3, decoder_length=DECODER)
    write_parquet(table, str(stored), "part-000000.parquet")
    lengths = [len(x) for x in table.column("teacher_ids").to_pylist()]
    assert [n > 0 for n in lengths] == [d == 1 for d in rows["denoiser"]]

    reader = RankReader(str(data), metadata, 0, 7, str(stored))
    read = reader.rows(np.arange(7))
    got = collate_stored(read, 5, DECODER)
    with torch.no_grad():
        want = teacher_topk(teacher, collate_online(rows, layout, DECODER), 5)
    for key in ("teacher_ids", "teacher_logprobs", "teacher_rows", "teacher_mask"):
        assert torch.equal(got[key][got["teacher_mask"]] if got[key].dim() > 2 else got[key],
                           want[key][want["teacher_mask"]] if want[key].dim() > 2 else want[key]), key

    shuffled = table.take([1, 0, 2, 3, 4, 5, 6])
    write_parquet(shuffled, str(stored), "part-000000.parquet")
    with pytest.raises(UserError, match="row for row"):
        RankReader(str(data), metadata, 0, 7, str(stored)).rows(np.arange(7))


def test_distillation_on_r_x_only_data_is_refused_naming_the_keys():
    from orchestrator.config import load_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    with pytest.raises(UserError, match=r"train\.distill\.enabled.*data\.denoisers.*data\.objective=prefix_lm"):
        load_config(tiny, ["train.distill.enabled=true", "data.denoisers=[{name: R}, {name: X, rate: 0.5}]"])
    load_config(tiny, ["train.distill.enabled=true"])  # the UL2 mixture has S
    load_config(tiny, ["train.distill.enabled=true", "data.objective=prefix_lm"])
    with pytest.raises(UserError, match="only R/X"):  # data prepared without S, caught when training reads it
        TeacherLayout.of({"denoisers": [{"name": "R"}], "bos_id": 2, "pad_id": 0})
    with pytest.raises(UserError, match="top_k"):
        load_config(tiny, ["train.distill.enabled=true", "train.distill.teacher=precomputed", "train.distill.top_k=0"])
    with pytest.raises(UserError, match="loss_chunk_tokens"):
        load_config(tiny, ["train.distill.enabled=true", "train.loss_chunk_tokens=64"])


def test_stage_keys_of_the_teacher_and_train():
    """No teacher stage unless precomputed; the train key without distillation is what it was before
    the feature (distill left out); top_k changes the teacher and train keys, the teacher's worker
    count neither, the temperature only the train key."""
    from orchestrator.config import load_config
    from orchestrator.keys import plan_stages

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")

    def stages(*overrides):
        return plan_stages(load_config(tiny, list(overrides)), "/tmp/unused-root", denoising={})

    plain = stages()
    assert "teacher" not in plain and set(plain["train"].inputs) == {"prepare", "adapt"}
    assert stages("train.distill.weight=0.7")["train"].key == plain["train"].key  # off: not keyed
    online = stages("train.distill.enabled=true")
    assert "teacher" not in online and online["train"].key != plain["train"].key
    base = ["train.distill.enabled=true", "train.distill.teacher=precomputed"]
    pre = stages(*base)
    assert set(pre["train"].inputs) == {"prepare", "adapt", "teacher"}
    assert pre["teacher"].inputs == {"prepare": pre["prepare"].key}
    more_k = stages(*base, "train.distill.top_k=32")
    assert more_k["teacher"].key != pre["teacher"].key and more_k["train"].key != pre["train"].key
    workers = stages(*base, "train.distill.teacher_workers=2")
    assert (workers["teacher"].key, workers["train"].key) == (pre["teacher"].key, pre["train"].key)
    hotter = stages(*base, "train.distill.temperature=2.0")
    assert hotter["teacher"].key == pre["teacher"].key and hotter["train"].key != pre["train"].key
    assert stages("train.encoder_warmup_steps=3")["train"].key != plain["train"].key
    assert stages("train.encoder_warmup_steps=0")["train"].key == plain["train"].key


def test_fields_added_while_off_leave_train_keys_as_they_were():
    """With distillation and the encoder warm-up off, train's key hashes exactly the fields it hashed
    before they existed (commit 3be7def's rule), so a user's finished training is still reused."""
    from dataclasses import asdict

    from jobs.core.commits import stage_key
    from jobs.train.batches import DATA_ORDER
    from orchestrator import keys
    from orchestrator.config import load_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    job = load_config(tiny)
    stages = keys.plan_stages(job, "/tmp/unused-root", denoising={})
    before = {k: v for k, v in asdict(job.train).items()
              if k not in keys._TRAIN_NOT_KEYED and k not in ("distill", "encoder_warmup_steps")}
    before["data_order"] = DATA_ORDER
    assert stages["train"].key == stage_key("train", before, {"prepare": stages["prepare"].key,
                                                              "adapt": stages["adapt"].key})


LR = EPS = 1e6  # AdamW's first step is then -g (to ~1e-5): the weight change reads out the gradient
WEIGHT = 0.5


def _one_distilled_step(rank, world, init_dir, storage_root):
    """One optimizer step of loop.train with online distillation (full vocabulary), ZeRO-2; rank r
    takes examples 2r, 2r + 1."""
    from jobs.train.config import TrainConfig
    from jobs.train.loop import RunSpec, WorkerContext, train

    cfg = TrainConfig(max_steps=1, num_workers=world, micro_batch_size=2, zero_stage=2, lr=LR, adam_eps=EPS,
                      weight_decay=0.0, grad_clip=0.0, warmup_steps=0, schedule="constant", checkpoint_every_steps=1,
                      distill=DistillConfig(enabled=True, weight=WEIGHT, temperature=1.0, top_k=0))
    rows = _rows(_random_examples(4, seed=3))
    mine = {c: v[rank * 2:rank * 2 + 2] for c, v in rows.items()}

    def micro_batches(start):
        while True:
            yield _batch(mine)

    spec = RunSpec(train=cfg, init_dir=init_dir, storage=storage_root, config_hash="h", encoder_length=ENCODER,
                   decoder_length=DECODER, pad_id=PAD, num_examples=4, denoiser_names=["R", "S"],
                   cross_attn_warmup_steps=0, cross_attn_patterns=[], teacher_source="builtin:tiny-gemma3")
    context = WorkerContext(rank=rank, world_size=world, device=torch.device("cpu"), micro_batches=micro_batches,
                            report=lambda metrics: None)
    return train(context, spec)["step"]


def _reference_gradient(init_dir):
    """d/dw of [sum over targets of CE, with (1 - w) CE + w KL(teacher || student) where the source
    reads BOS + prefix + target before it] / all targets, by plain PyTorch: the teacher's own full
    forward on each example alone, positions counted by hand, torch's kl_div."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.core.sources import load_causal_lm

    examples = _random_examples(4, seed=3)
    student = AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32).train()
    teacher = load_causal_lm("builtin:tiny-gemma3")
    batch = make_collate(ENCODER, DECODER, PAD)(_rows(examples))
    logits = seq2seq_logits(student, batch)
    total, targets = 0.0, 0
    for i, (denoiser, prefix, target) in enumerate(examples):
        labels = list(target) + [EOS]
        log_p = torch.log_softmax(logits[i, :len(labels)], -1)
        ce = -log_p[torch.arange(len(labels)), torch.tensor(labels)]
        targets += len(labels)
        if denoiser != 1:
            total = total + ce.sum()
            continue
        sequence = torch.tensor([[BOS] + list(prefix) + list(target)])
        with torch.no_grad():
            log_q = torch.log_softmax(teacher(input_ids=sequence).logits[0], -1)
        # Position len(prefix) + t (0 = BOS) has read the prefix and target[:t]: it predicts target[t].
        log_q = log_q[len(prefix):len(prefix) + len(target)]
        kl = torch.nn.functional.kl_div(log_p[:len(target)], log_q, log_target=True, reduction="none").sum(-1)
        total = total + (1 - WEIGHT) * ce[:len(target)].sum() + WEIGHT * kl.sum() + ce[len(target):].sum()
    (total / targets).backward()
    return {k: p.grad for k, p in student.named_parameters() if p.grad is not None}


def test_the_loop_trains_on_the_distillation_loss(tmp_path):
    """Two gloo ranks (DeepSpeed ZeRO-2), online teacher: the step's gradient equals the reference's."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.adapt.stage import run_adapt
    from jobs.train import checkpoints
    from jobs.train.export import consolidated_state
    from orchestrator.config import load_config
    from tests.dist_harness import run_ranks

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    init_dir = run_adapt(load_config(tiny).adapt, str(tmp_path / "adapted"), key="k")
    storage_root = str(tmp_path / "train")
    assert run_ranks(_one_distilled_step, 2, init_dir, storage_root) == [1, 1]
    initial = AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32).state_dict()
    trained = consolidated_state(checkpoints.step_dir(storage_root, 1))
    reference = _reference_gradient(init_dir)
    checked = 0
    for key, grad in reference.items():
        if key in trained:
            update = trained[key] - initial[key]
            torch.testing.assert_close(-update, grad / (1 + grad.abs() / EPS), rtol=2e-4, atol=5e-7,
                                       msg=lambda m, k=key: f"{k}: {m}")
            checked += 1
    assert checked >= len(reference) // 2, checked


def _warmup_step(rank, world, init_dir, storage_root, patterns):
    """One plain optimizer step of loop.train in the warm-up phase of `patterns`."""
    from jobs.train.config import TrainConfig
    from jobs.train.loop import RunSpec, WorkerContext, train

    cfg = TrainConfig(max_steps=1, num_workers=1, micro_batch_size=2, zero_stage=0, lr=1e-2, warmup_steps=0,
                      schedule="constant", checkpoint_every_steps=1, encoder_warmup_steps=5)
    rows = _rows(_random_examples(2, seed=4))

    def micro_batches(start):
        while True:
            yield make_collate(ENCODER, DECODER, PAD)(rows)

    spec = RunSpec(train=cfg, init_dir=init_dir, storage=storage_root, config_hash="h", encoder_length=ENCODER,
                   decoder_length=DECODER, pad_id=PAD, num_examples=2, denoiser_names=["R", "S"],
                   cross_attn_warmup_steps=5, cross_attn_patterns=patterns)
    context = WorkerContext(rank=rank, world_size=world, device=torch.device("cpu"), micro_batches=micro_batches,
                            report=lambda metrics: None)
    return train(context, spec)["step"]


def test_encoder_warmup_trains_the_encoder_alone(tmp_path):
    """train.encoder_warmup_steps: the train stage widens the warm-up to the encoder's own weights;
    in it every decoder weight and the shared embedding stay bit for bit the source's."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.adapt.stage import run_adapt
    from jobs.train import checkpoints
    from jobs.train.config import TrainConfig
    from jobs.train.export import consolidated_state
    from jobs.train.schedule import ENCODER_PATTERNS
    from jobs.train.stage import _spec
    from orchestrator.config import load_config
    from tests.dist_harness import run_ranks

    adapt_info = {"cross_attn_warmup": {"required": False, "steps": 0, "trainable_patterns": ["cross_attn."]}}
    metadata = dict(METADATA, num_examples=2, files=[])
    spec = _spec(TrainConfig(max_steps=10, encoder_warmup_steps=4), "data", "init", "store", metadata, adapt_info,
                 "k", None, None)
    assert spec.cross_attn_warmup_steps == 4 and set(ENCODER_PATTERNS) <= set(spec.cross_attn_patterns)

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    init_dir = run_adapt(load_config(tiny).adapt, str(tmp_path / "adapted"), key="k")
    storage_root = str(tmp_path / "train")
    assert run_ranks(_warmup_step, 1, init_dir, storage_root, spec.cross_attn_patterns) == [1]
    initial = AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32).state_dict()
    trained = consolidated_state(checkpoints.step_dir(storage_root, 1))
    moved = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert moved and all(any(p in k for p in ENCODER_PATTERNS) for k in moved), sorted(moved)[:5]
    assert any("encoder.text_model.layers." in k for k in moved)
    assert not any("embed" in k or k.startswith("model.decoder.") for k in moved)
