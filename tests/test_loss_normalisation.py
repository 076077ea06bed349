"""The training loop's loss is the token mean of the whole optimizer step: however a global batch is
split into ranks and accumulation steps, the gradients are the same, and they are the gradients of
sum(token losses) / (target tokens) computed by plain PyTorch on the whole batch.

The loop itself (jobs/train/loop.train) runs one optimizer step on real gloo ranks with DeepSpeed
(tests/dist_harness.py, no Ray); at ZeRO-3 it builds the model partitioned. AdamW's first step is
-lr * g / (|g| + eps); with lr = eps = 1e6 that is -g to about 1e-5 relative, so the weight change
after one step reads out the gradient."""

import os

import pytest
import torch

from tests.dist_harness import run_ranks

LR = EPS = 1e6
# Four examples whose targets have 3, 10, 1 and 7 tokens: a per-micro-batch mean would weight them
# differently for each split.
TARGET_LENGTHS = (3, 10, 1, 7)


def _examples():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in TARGET_LENGTHS:
        rows.append({"input_ids": torch.randint(10, 500, (12,), generator=generator),
                     "labels": torch.randint(10, 500, (length,), generator=generator)})
    return rows


def _collate(rows):
    from jobs.core.examples_io import make_collate

    columns = {"input_ids": [r["input_ids"].numpy() for r in rows],
               "decoder_input_ids": [torch.cat([torch.tensor([2]), r["labels"][:-1]]).numpy() for r in rows],
               "labels": [r["labels"].numpy() for r in rows], "denoiser": [0] * len(rows),
               "example_index": list(range(len(rows)))}
    return make_collate(12, 10, 0)(columns)


def _one_step_each(rank, world, init_dir, runs):
    """_one_step for each tuple of its arguments after init_dir in `runs`, in one process per rank
    (spawning ranks costs far more than a tiny step); with 2 ranks also what loop.load_model builds
    on this rank under ZeRO-3 (_partitioned_build)."""
    built = _partitioned_build(init_dir, world) if world > 1 else None
    return [_one_step(rank, world, init_dir, *run) for run in runs], built


def _model_facts(model):
    """What the loop reads from a model before deepspeed.initialize: parameter counts, the FLOPs
    model's coefficients, which parameters are decayed."""
    from jobs.train.metrics import FlopsModel
    from jobs.train.schedule import count_parameters, param_groups

    groups = param_groups(model, ["cross_attn"], 0.1)
    flops = FlopsModel(model)
    return {"counts": count_parameters(groups, 0, 1), "flops": (flops.per_encoder_token, flops.per_decoder_token),
            "decayed": sorted(n for g in groups if g["weight_decay"] for n in g["t5adapt_names"])}


def _partitioned_build(init_dir, world):
    """Right after loop.load_model under ZeRO-3 (before deepspeed.initialize): the share of the
    model's elements this rank holds, whether every parameter is a placeholder, whether the head is
    still the input embedding, and _model_facts."""
    from jobs.train.config import TrainConfig
    from jobs.train.loop import load_model

    model = load_model(init_dir, TrainConfig(zero_stage=3, num_workers=world, micro_batch_size=1))
    params = list(model.parameters())
    embedding = model.get_input_embeddings().weight
    return {"share": sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params),
            "placeholders": all(p.numel() == 0 for p in params),
            "tied": model.get_output_embeddings().weight is embedding
            and model.get_decoder().embed_tokens.weight is embedding,
            **_model_facts(model)}


def _one_step(rank, world, init_dir, storage_root, micro_batch_size, grad_accum_steps, zero_stage, chunk=0,
              checkpointing=False):
    """Rank `rank`'s part: examples rank*k .. in order, one optimizer step through loop.train."""
    from jobs.train.config import TrainConfig
    from jobs.train.loop import RunSpec, WorkerContext, train

    cfg = TrainConfig(max_steps=1, num_workers=world, micro_batch_size=micro_batch_size,
                      grad_accum_steps=grad_accum_steps, zero_stage=zero_stage, lr=LR, adam_eps=EPS,
                      weight_decay=0.0, grad_clip=0.0, warmup_steps=0, schedule="constant", checkpoint_every_steps=1,
                      loss_chunk_tokens=chunk, activation_checkpointing=checkpointing)
    rows = _examples()
    per_rank = micro_batch_size * grad_accum_steps
    mine = rows[rank * per_rank:(rank + 1) * per_rank]

    def micro_batches(start):
        for index in range(start, grad_accum_steps):
            yield _collate(mine[index * micro_batch_size:(index + 1) * micro_batch_size])

    spec = RunSpec(train=cfg, init_dir=init_dir, storage=storage_root, config_hash="h", encoder_length=12,
                   decoder_length=10, pad_id=0, num_examples=4, denoiser_names=["S"], cross_attn_warmup_steps=0,
                   cross_attn_patterns=[])
    context = WorkerContext(rank=rank, world_size=world, device=torch.device("cpu"), micro_batches=micro_batches,
                            report=lambda metrics: None)
    return train(context, spec)["step"]


def _update(init_dir, storage_root):
    """Weight change of the one step saved under storage_root (fp32 masters, every parameter)."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.train import checkpoints
    from jobs.train.export import consolidated_state

    initial = AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32).state_dict()
    trained = consolidated_state(checkpoints.step_dir(storage_root, 1))
    return {k: trained[k] - initial[k] for k in trained}


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from jobs.adapt.stage import run_adapt
    from orchestrator.config import load_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    return run_adapt(load_config(tiny).adapt, str(tmp_path_factory.mktemp("norm") / "adapted"), key="k")


def _reference_gradient(init_dir):
    """d/dw of sum(token losses) / target tokens over the four examples, by plain PyTorch."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.core.examples_io import token_losses

    model = AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32).train()
    model.config.use_cache = False
    token_loss, mask = token_losses(model, _collate(_examples()))
    (token_loss.sum() / mask.sum()).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_gradients_do_not_depend_on_how_the_batch_is_split(init_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    splits = {1: {"1 rank, micro-batch 4": (4, 1), "1 rank, 2 accumulation steps of 2": (2, 2)},
              2: {"2 ranks, micro-batch 2": (2, 1), "2 ranks, 2 accumulation steps of 1": (1, 2)}}
    updates = {}
    for world, shapes in splits.items():
        runs, names = [], []
        for name, (micro, accum) in shapes.items():
            # ZeRO-3 builds the model partitioned (loop.load_model); the others load it whole.
            for zero_stage in ((0, 2, 3) if world == 2 else (0,)):
                runs.append((str(tmp_path / f"{world}-{micro}-{accum}-zero{zero_stage}"), micro, accum, zero_stage))
                names.append(f"{name}, ZeRO-{zero_stage}")
        if world == 2:
            # The cross-entropy in chunks of 3 targets (train.loss_chunk_tokens) under ZeRO-3: the
            # ranks' 13 and 8 targets make 5 and 3 chunks, and each chunk's head gathers its weight
            # from both ranks (unequal counts once crashed a rank in gloo).
            runs.append((str(tmp_path / "2-chunked-zero3"), 2, 1, 3, 3))
            names.append("2 ranks, micro-batch 2, ZeRO-3, loss in chunks of 3 targets")
            # The same chunks under ZeRO-2, where the head's weight is whole on each rank and its
            # gradient (summed over chunks) is reduced once with the others.
            runs.append((str(tmp_path / "2-chunked-zero2"), 2, 1, 2, 3))
            names.append("2 ranks, micro-batch 2, ZeRO-2, loss in chunks of 3 targets")
            # Activation checkpointing on the partitioned build: the backward's re-run forward gathers
            # each layer's parameters again.
            runs.append((str(tmp_path / "2-checkpointed-zero3"), 1, 2, 3, 0, True))
            names.append("2 ranks, 2 accumulation steps of 1, ZeRO-3, activation checkpointing")
        results = run_ranks(_one_step_each, world, init_dir, runs)
        assert [steps for steps, _ in results] == [[1] * len(runs)] * world
        if world == 2:
            whole = _model_facts(AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32))
            for _, built in results:
                # Each rank holds half of every parameter (DeepSpeed pads partitions a little).
                assert 0.5 <= built.pop("share") < 0.52 and built.pop("placeholders") and built.pop("tied"), built
                assert built == whole
        for name, run in zip(names, runs):
            updates[name] = _update(init_dir, run[0])
    reference = _reference_gradient(init_dir)
    checked = 0
    for name, update in updates.items():
        for key, grad in reference.items():
            if key in update:
                # Adam's first step: -lr * g / (|g| + eps) = -g / (1 + |g| / 1e6).
                torch.testing.assert_close(-update[key], grad / (1 + grad.abs() / EPS), rtol=2e-4, atol=5e-7,
                                           msg=lambda m, n=name, k=key: f"{n}, {k}: {m}")
                checked += 1
    assert checked >= len(updates) * len(reference) // 2, checked
