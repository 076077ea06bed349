"""The T5Gemma claim, measured here: adapting a pretrained decoder-only model beats training the same
encoder-decoder from scratch.

Real Gemma 3 270M -> T5Gemma 2 270M-270M. Three starts, trained the same number of steps on the
same prepared UL2 examples (python-docs prose, 128 encoder + 64 decoder tokens) in the same order,
with the same AdamW and schedule (jobs/train/schedule.py) and the same loss (jobs/train/loop.py):
  (i)   adapted: the paper's initialisation (adapt.encoder_scale=1.0)
  (ii)  step-0-preserving: adapt.encoder_scale=0.0 (the untrained model stays near the source)
  (iii) random: the same architecture, transformers' initialisation, seed 0
Held-out loss (nats per target token) on examples never trained on, at fixed step counts.

One process, no Ray/DeepSpeed: this measures initialisations, not orchestration (bench/train_overhead.py
does that). About 25 minutes on 2 cores with the defaults.

Run: .venv/bin/python bench/adaptation_claim.py [--steps 80] [--eval-every 20] [--heldout 16]
Writes bench/out/adaptation_claim.json and bench/results/adaptation_claim.png.
"""

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = os.path.join(REPO, "bench", "out")


def heldout_loss(model, rows, first, count, collate, num_denoisers, batch_size):
    """Token-weighted mean cross-entropy over examples first .. first + count - 1."""
    from jobs.core.examples_io import batch_of
    from jobs.train.loop import forward_loss

    model.eval()
    total = torch.zeros(num_denoisers, 2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(first, first + count, batch_size):
            _, by_denoiser = forward_loss(model, batch_of(rows, start, batch_size, collate), num_denoisers)
            total += by_denoiser
    model.train()
    return float(total[:, 0].sum() / total[:, 1].sum())


def train_and_evaluate(name, model, rows, args, cfg, collate, num_denoisers, heldout_start):
    from jobs.core.examples_io import batch_of
    from jobs.train.loop import forward_loss
    from jobs.train.schedule import param_groups, set_learning_rate

    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(param_groups(model, [], cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    curve = {0: heldout_loss(model, rows, heldout_start, args.heldout, collate, num_denoisers, args.batch)}
    print(f"{name:>18}: step 0 held-out {curve[0]:.3f}", flush=True)
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        set_learning_rate(optimizer, step, cfg, warmup_cross_attn=0)
        loss, _ = forward_loss(model, batch_of(rows, step * args.batch, args.batch, collate), num_denoisers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0:
            curve[step + 1] = heldout_loss(model, rows, heldout_start, args.heldout, collate, num_denoisers, args.batch)
            print(f"{name:>18}: step {step + 1} train {loss.item():.3f} held-out {curve[step + 1]:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=16, help="held-out examples (the last ones prepared)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from jobs.adapt.stage import build_in_memory
    from jobs.data.stage import run_prepare
    from jobs.core.examples_io import make_collate, read_examples
    from orchestrator.config import load_config
    from orchestrator.keys import prepare_key

    job = load_config(os.path.join(REPO, "configs", "quickstart.yaml"),
                      ["data.encoder_length=128", "data.decoder_length=64", "data.documents_per_piece=200",
                       f"train.lr={args.lr}", "train.warmup_steps=10", f"train.max_steps={args.steps}",
                       "train.schedule=cosine"])
    data_dir = os.path.join(OUT, "claim-data")
    run_prepare(job.data, job.adapt.source, data_dir, prepare_key(job.data, job.adapt.source))
    metadata, rows = read_examples(data_dir)
    heldout_start = len(rows["input_ids"]) - args.heldout
    if args.steps * args.batch > heldout_start:
        sys.exit(f"only {heldout_start} training examples for {args.steps} steps of {args.batch}")
    collate = make_collate(metadata["encoder_length"], metadata["decoder_length"], metadata["pad_id"])
    num_denoisers = len(metadata["denoisers"])
    print(f"{len(rows['input_ids'])} examples; training on the first {args.steps * args.batch}, "
          f"held out: the last {args.heldout}", flush=True)

    curves = {}
    for name, scale in (("adapted", 1.0), ("step-0-preserving", 0.0), ("random", None)):
        from dataclasses import replace

        model, _, _ = build_in_memory(replace(job.adapt, encoder_scale=scale if scale is not None else 1.0))
        if scale is None:
            from transformers import AutoModelForSeq2SeqLM

            torch.manual_seed(args.seed)
            model = AutoModelForSeq2SeqLM.from_config(model.config, dtype=torch.float32)
        curves[name] = train_and_evaluate(name, model.float(), rows, args, job.train, collate, num_denoisers,
                                          heldout_start)
        del model

    steps = sorted(curves["adapted"])
    print("\nheld-out loss (nats/target token) after N steps:")
    print(f"{'step':>6} " + " ".join(f"{n:>18}" for n in curves))
    for s in steps:
        print(f"{s:>6} " + " ".join(f"{curves[n][s]:>18.3f}" for n in curves))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "adaptation_claim.json"), "w") as f:
        json.dump({"args": vars(args), "curves": curves}, f, indent=1)
    plot(curves, args)


def plot(curves, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        steps = sorted(curve)
        axes.plot(steps, [curve[s] for s in steps], marker="o", label=name)
    axes.set_xlabel(f"training steps (batch {args.batch}, 128 + 64 tokens)")
    axes.set_ylabel("held-out loss (nats / target token)")
    axes.set_title("Gemma 3 270M -> T5Gemma 2 270M-270M, UL2")
    axes.legend()
    axes.grid(alpha=0.3)
    path = os.path.join(REPO, "bench", "results", "adaptation_claim.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
