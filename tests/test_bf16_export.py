"""Under bf16 the module holds bf16 copies and the optimizer the fp32 master weights; an export must
be the masters, at every ZeRO stage and rank count (jobs/train/export.consolidated_state).

Real DeepSpeed engines on real gloo ranks (tests/dist_harness.py) train the tiny T5Gemma 2 for two
steps and save; the masters, read from each engine's optimizer, are the reference.
"""

import os

import pytest
import torch

from jobs.adapt.stage import run_adapt
from jobs.train import checkpoints
from jobs.train.export import consolidated_state
from orchestrator.config import load_config

from .conftest import REPO
from .dist_harness import run_ranks

TINY = os.path.join(REPO, "configs", "tiny.yaml")
# name -> (train.zero_stage, train.deepspeed, the optimizer DeepSpeed 0.19 wraps our AdamW in). Each
# saves its masters its own way (see consolidated_state); the optimizer is checked so that a
# DeepSpeed upgrade that picks another one is noticed rather than left untested.
CASES = {"zero0": (0, {}, "FP16_UnfusedOptimizer"), "zero1": (1, {}, "DeepSpeedZeroOptimizer"),
         "zero2": (2, {}, "DeepSpeedZeroOptimizer"),
         "zero1-fp32-grad-accum": (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
         "zero3": (3, {}, "DeepSpeedZeroOptimizer_Stage3")}


def train_and_save(rank: int, world_size: int, adapted: str, out_root: str, cases: dict):
    """Every case on this rank: 2 bf16 optimizer steps, a save to out_root/<case>. Rank 0 writes
    {case: (DeepSpeed's optimizer class name, {name: fp32 master}, {name: bf16 module weight as fp32},
    {tied alias: parameter name})} to out_root/reference.pt and returns that path."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from jobs.train.config import TrainConfig
    from jobs.train.loop import build_engine, load_model
    from jobs.train.schedule import param_groups

    results = {}
    for case, (stage, extra, _) in cases.items():
        # lr 1e-3: after two Adam steps most masters are off the bf16 grid, so the test can tell them apart.
        cfg = TrainConfig(precision="bf16", zero_stage=stage, num_workers=world_size, micro_batch_size=1,
                          lr=1e-3, deepspeed=extra)
        model = load_model(adapted, cfg)
        engine, _ = build_engine(model, param_groups(model, [], 0.01), cfg, world_size)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(2):
            inputs = torch.randint(0, 500, (1, 8), generator=generator)
            targets = torch.randint(0, 500, (1, 6), generator=generator)
            loss = engine(input_ids=inputs, attention_mask=torch.ones_like(inputs), decoder_input_ids=targets,
                          decoder_attention_mask=torch.ones_like(targets), labels=targets).loss
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(os.path.join(out_root, case), tag=checkpoints.DS_TAG, save_latest=False)

        named = list(engine.module.named_parameters())
        name_of = {id(p): n for n, p in named}
        if stage == 0:
            # ZeRO-0 under bf16 is FP16_UnfusedOptimizer, which safe_get_full_fp32_param does not
            # know (it returns None): its fp32 copies sit beside the parameters they update.
            optimizer = engine.optimizer
            masters = {name_of[id(p)]: master.detach().clone() for low, high in
                       zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, master in zip(low, high)}
        else:
            masters = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in named}  # collective at ZeRO-3
        with deepspeed.zero.GatheredParameters([p for _, p in named]):  # a no-op below ZeRO-3
            module = {n: p.detach().float().clone() for n, p in named}
        aliases = {k: name_of[id(v)] for k, v in engine.module.state_dict(keep_vars=True).items()
                   if id(v) in name_of and name_of[id(v)] != k}
        results[case] = (type(engine.optimizer).__name__, masters, module, aliases)
        engine.destroy()
    if rank != 0:
        return None
    # Through a file: tensors sent through the harness's queue are shared memory that dies with
    # this process, before the test process reads it.
    path = os.path.join(out_root, "reference.pt")
    torch.save(results, path)
    return path


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    return run_adapt(load_config(TINY).adapt, str(tmp_path_factory.mktemp("bf16") / "adapted"), key="bf16-export")


@pytest.fixture(scope="module")
def two_ranks(adapted, tmp_path_factory):
    """All cases in one pair of rank processes: starting them (imports) costs more than a case."""
    out_root = str(tmp_path_factory.mktemp("bf16-2ranks"))
    return out_root, torch.load(run_ranks(train_and_save, 2, adapted, out_root, CASES)[0])


@pytest.fixture(scope="module")
def one_rank(adapted, tmp_path_factory):
    out_root = str(tmp_path_factory.mktemp("bf16-1rank"))
    return out_root, torch.load(run_ranks(train_and_save, 1, adapted, out_root, {"zero0": CASES["zero0"]})[0])


def check_export_is_the_masters(checkpoint_dir: str, case: str, result: tuple):
    optimizer, masters, module, aliases = result
    assert optimizer == CASES[case][2]
    state = consolidated_state(checkpoint_dir)
    assert masters and all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for name, master in masters.items():
        # The module is the bf16 rounding of the masters; else the reference itself is wrong.
        assert torch.equal(master.bfloat16().float(), module[name]), name
        assert torch.equal(state[name], master), name
    for alias, name in aliases.items():
        assert torch.equal(state[alias], masters[name]), alias
    # What the old ZeRO-0 export gave (the bf16 module cast up) must be told apart from the masters.
    assert aliases and any(not torch.equal(state[n], module[n]) for n in masters)


@pytest.mark.parametrize("case", CASES)
def test_export_is_the_fp32_masters_on_two_ranks(two_ranks, case):
    out_root, results = two_ranks
    check_export_is_the_masters(os.path.join(out_root, case), case, results[case])


def test_export_is_the_fp32_masters_at_zero0_on_one_rank(one_rank):
    out_root, results = one_rank
    check_export_is_the_masters(os.path.join(out_root, "zero0"), "zero0", results["zero0"])
