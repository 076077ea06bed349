"""Orchestration overhead of the train stage, and CPU throughput on the real 270M-270M.

Same model (real Gemma 3 270M -> T5Gemma 2 270M-270M), same prepared batches (128 + 64 tokens,
micro-batch 2), same AdamW, same loss function, same threads (2):
  bare:  one process, a plain PyTorch loop (forward, backward, clip, AdamW step)
  ours:  `t5adapt train` (Ray Train TorchTrainer, 1 worker, DeepSpeed ZeRO-N, Ray Data streaming,
         MLflow logging), step times as the run logged them
Steady state = median step time after the first --skip steps. Overhead = ours / bare - 1.
The run's final checkpoint and export are outside the timed steps.

Run: .venv/bin/python bench/train_overhead.py [--steps 12] [--stages 0,2]
"""

import argparse
import os
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


def bare_loop(init_dir, data_dir, steps, threads):
    """Seconds per step of a plain single-process loop over the first `steps` micro-batches."""
    from transformers import AutoModelForSeq2SeqLM

    from bench.adaptation_claim import batch_of, examples
    from jobs.train.batches import make_collate
    from jobs.train.loop import forward_loss
    from jobs.train.schedule import param_groups

    torch.set_num_threads(threads)
    metadata, rows = examples(data_dir)
    collate = make_collate(metadata["encoder_length"], metadata["decoder_length"], metadata["pad_id"])
    model = AutoModelForSeq2SeqLM.from_pretrained(init_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(param_groups(model, [], 0.01), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        loss, _ = forward_loss(model, batch_of(rows, step * 2, 2, collate), len(metadata["denoisers"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def ours(job, root, stage):
    """(seconds per step, tokens/s, padded tokens/s) as the t5adapt run logged them."""
    from mlflow.tracking import MlflowClient

    from jobs.train.stage import run_train

    summary = run_train(job, root, force=True)
    client = MlflowClient(f"sqlite:///{os.path.abspath(root)}/mlflow.db")
    history = lambda key: [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)]
    return history("step_time_s"), history("tokens_per_s"), history("mfu")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="start-up steps left out of the steady state")
    parser.add_argument("--stages", default="0,2", help="ZeRO stages to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from jobs.adapt.stage import run_adapt
    from jobs.data.stage import run_prepare
    from orchestrator.config import load_config

    root = os.path.join(OUT, "overhead-root")
    init_dir, data_dir = os.path.join(OUT, "quickstart-adapted"), os.path.join(OUT, "claim-data")
    base = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), DATA)
    run_prepare(base.data, base.adapt.source, data_dir)
    run_adapt(base.adapt, init_dir, data_cfg=base.data)

    bare = bare_loop(init_dir, data_dir, args.steps, args.threads)
    rows = [("bare PyTorch loop", bare, None, None)]
    for stage in (int(s) for s in args.stages.split(",")):
        job = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), DATA + [
            "train.num_workers=1", f"train.cpus_per_worker={args.threads}", f"train.zero_stage={stage}",
            f"train.max_steps={args.steps}", f"train.checkpoint_every_steps={args.steps}", "train.lr=1e-4",
            "train.warmup_steps=0", "train.schedule=constant", f"train.data={data_dir}", f"train.init={init_dir}",
            f"train.storage={os.path.join(OUT, f'overhead-zero{stage}')}"])
        steps, tokens, mfu = ours(job, root, stage)
        rows.append((f"t5adapt train, ZeRO-{stage}", steps, tokens, mfu))

    steady = lambda times: statistics.median(times[args.skip:])
    reference = steady(bare)
    print(f"\nreal T5Gemma 2 270M-270M on CPU ({args.threads} threads), micro-batch 2, 128 + 64 tokens, "
          f"median of steps {args.skip + 1}-{args.steps}:")
    print(f"{'':<26} {'s/step':>8} {'vs bare':>8} {'tokens/s':>9} {'MFU':>6}")
    for name, times, tokens, mfu in rows:
        extra = (f"{statistics.median(tokens[args.skip:]):>9.0f} {statistics.median(mfu[args.skip:]):>6.1%}"
                 if tokens else f"{'':>9} {'':>6}")
        print(f"{name:<26} {steady(times):>8.2f} {steady(times) / reference - 1:>+8.1%} {extra}")


if __name__ == "__main__":
    main()
