"""Orchestration overhead of the train stage, and CPU throughput on the real 270M-270M.

Same model (real Gemma 3 270M -> T5Gemma 2 270M-270M), same prepared batches (128 + 64 tokens,
micro-batch 2), same AdamW, same loss function, same threads (2):
  bare PyTorch:   one process, a plain loop (forward, backward, clip, AdamW step)
  bare DeepSpeed: one process, no Ray: the engine t5adapt builds (jobs/train/loop.build_engine) and
                  its forward / backward / step, nothing else
  t5adapt train:  Ray Train TorchTrainer, 1 worker, the same engine, its rows read from the
                  prepared Parquet parts (jobs/train/batches.py), per-step finite-loss check,
                  MLflow logging; s/step = wall-clock between the steps' MLflow records (so
                  logging counts); tokens/s and MFU as the run logged them
Steady state = median step time after the first --skip steps. "vs bare" = t / bare PyTorch - 1;
"vs DS" = t / bare DeepSpeed of the same stage - 1 (what Ray and the loop add). Each bare loop runs
in its own process. The run's final checkpoint and export are outside the timed steps.

Run: .venv/bin/python bench/train_overhead.py [--steps 12] [--stages 0,2]
"""

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = os.path.join(REPO, "bench", "out")
# The same data as bench/adaptation_claim.py, so either bench reuses the other's prepared examples.
DATA = ["data.encoder_length=128", "data.decoder_length=64", "data.documents_per_piece=200"]


def bare_loop(init_dir, data_dir, steps, threads, train_cfg=None):
    """Seconds per step of a single-process loop over the first `steps` micro-batches: plain PyTorch,
    or (train_cfg given) the DeepSpeed engine that t5adapt builds from that TrainConfig."""
    from jobs.core.examples_io import batch_of, make_collate, read_examples
    from jobs.core.pretrained import load_seq2seq
    from jobs.train.loop import forward_loss
    from jobs.train.schedule import param_groups

    torch.set_num_threads(threads)
    metadata, rows = read_examples(data_dir)
    collate = make_collate(metadata["encoder_length"], metadata["decoder_length"], metadata["pad_id"])
    model = load_seq2seq(init_dir).train()
    model.config.use_cache = False
    groups = param_groups(model, [], 0.01)
    if train_cfg is None:
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    else:
        engine = _one_rank_engine(model, groups, train_cfg)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        batch = batch_of(rows, step * 2, 2, collate)
        if train_cfg is None:
            loss, _ = forward_loss(model, batch, len(metadata["denoisers"]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            loss, _ = forward_loss(engine, batch, len(metadata["denoisers"]))
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - started)
    return times


def _one_rank_engine(model, groups, train_cfg):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import socket

    import torch.distributed as dist

    from jobs.train.loop import build_engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    return build_engine(model, groups, train_cfg, world_size=1)[0]


def in_own_process(*args):
    """bare_loop(*args) in a fresh process, so its memory is gone before the next run starts."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(bare_loop, args)


DATA_DIR = []  # [prepared data, adapted model], set by main()


def ours(job, root):
    """(wall-clock seconds per step, tokens/s, MFU) of a fresh `t5adapt train` run, from its MLflow records."""
    from mlflow.tracking import MlflowClient

    from jobs.train.stage import run_train

    # A finished run of the same config would be reused (resume), not timed: start from nothing.
    storage_root = os.path.join(OUT, f"overhead-zero{job.train.zero_stage}")
    shutil.rmtree(storage_root, ignore_errors=True)
    uri = f"sqlite:///{os.path.abspath(root)}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("overhead") or client.get_experiment(client.create_experiment("overhead"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    run_train(job.train, DATA_DIR[0], DATA_DIR[1], storage_root, key=f"bench-zero{job.train.zero_stage}",
              tracking_uri=uri, mlflow_run_id=run_id)
    history = lambda key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    # Wall-clock between consecutive logged steps: everything the worker does per step (the finite
    # check, logging, the data iterator), not only what the loop's own step timer covers.
    stamps = [m.timestamp / 1000 for m in history("loss")]
    walls = [float("nan")] + [b - a for a, b in zip(stamps, stamps[1:])]
    return walls, [m.value for m in history("tokens_per_s")], [m.value for m in history("mfu")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="start-up steps left out of the steady state")
    parser.add_argument("--stages", default="0,2", help="ZeRO stages to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from jobs.adapt.stage import run_adapt
    from jobs.data.stage import run_prepare
    from orchestrator import keys
    from orchestrator.config import load_config

    root = os.path.join(OUT, "overhead-root")
    init_dir, data_dir = os.path.join(OUT, "quickstart-adapted"), os.path.join(OUT, "claim-data")
    DATA_DIR[:] = [data_dir, init_dir]
    base = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), DATA)
    run_prepare(base.data, base.adapt.source, data_dir, keys.prepare_key(base.data, base.adapt.source))
    denoising = keys.denoising_plan(base)
    run_adapt(base.adapt, init_dir, keys.adapt_key(base.adapt, denoising), denoising)

    bare = in_own_process(init_dir, data_dir, args.steps, args.threads)
    rows = [("bare PyTorch loop", bare, None, None, None)]
    for stage in (int(s) for s in args.stages.split(",")):
        job = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), DATA + [
            "train.num_workers=1", f"train.cpus_per_worker={args.threads}", f"train.zero_stage={stage}",
            f"train.max_steps={args.steps}", f"train.checkpoint_every_steps={args.steps}", "train.lr=1e-4",
            "train.warmup_steps=0", "train.schedule=constant"])
        engine_only = in_own_process(init_dir, data_dir, args.steps, args.threads, job.train)
        rows.append((f"bare DeepSpeed, ZeRO-{stage}", engine_only, None, None, None))
        steps, tokens, mfu = ours(job, root)
        rows.append((f"t5adapt train, ZeRO-{stage}", steps, tokens, mfu, engine_only))

    steady = lambda times: statistics.median(times[args.skip:])
    reference = steady(bare)
    print(f"\nreal T5Gemma 2 270M-270M on CPU ({args.threads} threads), micro-batch 2, 128 + 64 tokens, "
          f"median of steps {args.skip + 1}-{args.steps}:")
    print(f"{'':<26} {'s/step':>8} {'vs bare':>8} {'vs DS':>7} {'tokens/s':>9} {'MFU':>6}")
    for name, times, tokens, mfu, engine_only in rows:
        versus_ds = f"{steady(times) / steady(engine_only) - 1:>+7.1%}" if engine_only else f"{'':>7}"
        extra = (f"{statistics.median(tokens[args.skip:]):>9.0f} {statistics.median(mfu[args.skip:]):>6.1%}"
                 if tokens else f"{'':>9} {'':>6}")
        print(f"{name:<26} {steady(times):>8.2f} {steady(times) / reference - 1:>+8.1%} {versus_ds} {extra}")


if __name__ == "__main__":
    main()
