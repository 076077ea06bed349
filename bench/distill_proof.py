"""Which adaptation recipe teaches the encoder? Initialisation x objective, on the real model.

Real Gemma 3 270M (Q4_K_M GGUF dequantised to fp32) -> T5Gemma 2 270M-270M. Arms:
  inits:      random (the architecture, transformers' init), paper (adapt.encoder_scale=1.0),
              step-0 (adapt.encoder_scale=--step0-scale: the untrained model starts near the source)
  objectives: UL2 (the 7-denoiser mixture), PrefixLM, PrefixLM + distillation from the source
              (train.distill: online teacher, --kd-weight, temperature 1, --top-k)
  and one more: step-0, PrefixLM + KD with an encoder warm-up (train.encoder_warmup_steps) over the
              first half of its steps: only the encoder trains, the decoder stays the source's
Every arm trains on the same number of real (unpadded) training tokens, in the same example order
(a permutation drawn from --seed), with the same AdamW and schedule (jobs/train/schedule.py) and the
shipped loss (jobs/train/loop.forward_loss, with jobs/train/distill.py for KD). At fixed token
counts the evaluate stage's adaptation probe (jobs/evaluate/probe.py) scores held-out passages of
the prepared data's held-out documents (64-token prefix -> 32-token target): target cross-entropy
with the encoder and with the encoder masked (the decoder alone); the source's two references
(target alone; prefix + target) are computed once. The winner (lowest final CE with the encoder)
is repeated with --seed + 1 (another example order; another random init).

One process, no Ray/DeepSpeed: this compares recipes, not orchestration.
Run: .venv/bin/python bench/distill_proof.py [--tokens 8000] [--evals 4]   (about 70 minutes on 2 cores)
Writes bench/out/distill_proof.json and bench/results/distill_proof.png; prints the table.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = os.path.join(REPO, "bench", "out")
SOURCE = "builtin:gemma3-270m"
OBJECTIVES = ("UL2", "PrefixLM", "PrefixLM+KD")
# An extra recipe: PrefixLM + KD whose first half trains the encoder alone (train.encoder_warmup_steps).
WARMUP_ARM = ("step-0", "PrefixLM+KD+EW")


def prepared(objective: str, args):
    """(metadata, rows) of examples prepared with the shipped prepare stage."""
    from jobs.core.examples_io import read_examples
    from jobs.data.stage import run_prepare
    from orchestrator.config import load_config
    from orchestrator.keys import prepare_key

    overrides = [f"data.encoder_length={args.encoder_length}", f"data.decoder_length={args.decoder_length}",
                 "data.documents_per_piece=200", "data.heldout_fraction=0.08"]
    if objective == "prefix_lm":
        overrides += ["data.objective=prefix_lm", f"data.prefix_lm_split={args.prefix_split}"]
    job = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), overrides)
    out = os.path.join(OUT, f"distill-proof-{objective}")
    run_prepare(job.data, job.adapt.source, out, prepare_key(job.data, job.adapt.source))
    return out, job, read_examples(out)


def initial_state(init: str, args, adapt_cfg, seed: int):
    """(config, path of its state on disk) of one initialisation; each arm loads a fresh copy, so no
    second 3 GB copy (the 270M-270M with T5Gemma 2's vision tower, fp32) stays in memory."""
    from dataclasses import replace

    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM

    from jobs.adapt.stage import build_in_memory

    scale = {"paper": 1.0, "step-0": args.step0_scale, "random": 1.0}[init]
    model, _, _ = build_in_memory(replace(adapt_cfg, encoder_scale=scale))
    if init == "random":
        config = model.config
        del model
        torch.manual_seed(seed)
        model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    path = os.path.join(OUT, f"distill-proof-init-{init}-{seed}.safetensors")
    state = {k: v.contiguous() for k, v in model.float().state_dict().items()}
    save_file({k: v for k, v in state.items() if not _is_alias(k, state)}, path)
    config = model.config
    del model, state
    release_memory()
    return config, path


def _is_alias(name: str, state: dict) -> bool:
    """A tied weight's second name (the decoder embedding, the LM head): saved once."""
    first = next(k for k, v in state.items() if v.data_ptr() == state[name].data_ptr())
    return first != name


def release_memory():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed arenas back to the OS
    except OSError:
        pass


def fresh_model(initial):
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    config, path = initial
    with no_init_weights():
        model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tensors = dict(model.state_dict(keep_vars=True))
    loaded = {tensors[k].data_ptr() for k in state}
    untied = [k for k in missing if tensors[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(f"state does not fit: not loaded {untied[:5]}, unexpected {unexpected[:5]}")
    return model


def train_arm(init, objective, initial, data, teacher, probe_set, args, seed):
    from dataclasses import replace

    from jobs.core.examples_io import make_collate
    from jobs.evaluate.probe import model_probe
    from jobs.train.distill import with_teacher
    from jobs.train.loop import Distillation, forward_loss
    from jobs.train.schedule import param_groups, set_learning_rate

    from jobs.train.schedule import ENCODER_PATTERNS

    data_dir, job, (metadata, rows) = data
    distill_on = "+KD" in objective
    distill_cfg = replace(job.train.distill, enabled=distill_on, weight=args.kd_weight, temperature=1.0,
                          top_k=args.top_k, teacher="online")
    collate = make_collate(metadata["encoder_length"], metadata["decoder_length"], metadata["pad_id"])
    if distill_on:
        collate = with_teacher(collate, distill_cfg, metadata, metadata["decoder_length"])
    prefixes, targets = probe_set
    count = len(rows["input_ids"])
    order = np.random.default_rng(seed).permutation(count)
    real = np.array([len(rows["input_ids"][i]) + len(rows["labels"][i]) for i in range(count)])
    steps_needed = int(np.searchsorted(np.cumsum(real[order]), args.tokens) // args.batch + 1)
    if steps_needed * args.batch > count:
        sys.exit(f"{objective}: {count} examples hold fewer than {args.tokens} tokens; lower --tokens")
    cfg = replace(job.train, lr=args.lr, warmup_steps=args.warmup, max_steps=steps_needed, schedule="cosine")
    warmup = steps_needed // 2 if objective.endswith("+EW") else 0
    model = fresh_model(initial).train()
    optimizer = torch.optim.AdamW(param_groups(model, ENCODER_PATTERNS if warmup else [], cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    distill = Distillation(distill_cfg, teacher, torch.zeros(2, dtype=torch.float64)) if distill_on else None
    marks = [args.tokens * (i + 1) // args.evals for i in range(args.evals)]

    def evaluate(tokens, step):
        model.eval()
        scores = model_probe(model, prefixes, targets, metadata, args.eval_batch, progress=False)
        model.train()
        point = {"tokens": int(tokens), "step": step, **scores}
        print(f"  {init:>7} {objective:<12} seed {seed} step {step:>4} tokens {tokens:>6}: "
              f"encoder {scores['encoder']:.3f}  masked {scores['encoder_masked']:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return point

    started = time.perf_counter()
    curve = [evaluate(0, 0)]
    tokens, step = 0, 0
    while marks:
        chosen = order[step * args.batch:(step + 1) * args.batch]
        batch = collate({c: v[chosen] for c, v in rows.items()})
        set_learning_rate(optimizer, step, cfg, warmup)
        loss, _ = forward_loss(model, batch, len(metadata["denoisers"]), None, 0, distill)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int(real[chosen].sum())
        while marks and tokens >= marks[0]:
            marks.pop(0)
            curve.append(evaluate(tokens, step))
    return {"init": init, "objective": objective, "seed": seed, "curve": curve,
            "train_s": round(time.perf_counter() - started, 1), "steps": step,
            "distill_loss": float(distill.sums[0] / distill.sums[1]) if distill and distill.sums[1] else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000, help="real training tokens per arm")
    parser.add_argument("--evals", type=int, default=4, help="evaluations after step 0, evenly spaced in tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--kd-weight", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--step0-scale", type=float, default=0.25,
                        help="adapt.encoder_scale of the step-0 init (0 cannot open under Adam in a short run)")
    parser.add_argument("--encoder-length", type=int, default=72)
    parser.add_argument("--decoder-length", type=int, default=40)
    parser.add_argument("--prefix-split", type=float, default=0.64)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inits", default="random,paper,step-0")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--no-repeat", action="store_true", help="skip the winner's second seed")
    parser.add_argument("--no-warmup-arm", action="store_true", help="skip the encoder warm-up arm")
    parser.add_argument("--report", action="store_true", help="only print the table and redraw the plot from the "
                        "last run's bench/out/distill_proof.json")
    args = parser.parse_args()
    if args.report:
        with open(os.path.join(OUT, "distill_proof.json")) as f:
            saved = json.load(f)
        print_table(argparse.Namespace(**saved["args"]), saved["source"], saved["arms"])
        plot(argparse.Namespace(**saved["args"]), saved["source"], saved["arms"])
        return
    torch.set_num_threads(os.cpu_count() or 1)

    from jobs.core.examples_io import read_heldout_documents
    from jobs.core.sources import load_causal_lm
    from jobs.evaluate.probe import cut_passages, source_probe

    datasets = {"UL2": prepared("ul2", args), "PrefixLM": prepared("prefix_lm", args)}
    datasets["PrefixLM+KD"] = datasets["PrefixLM+KD+EW"] = datasets["PrefixLM"]
    data_dir, job, (metadata, _) = datasets["PrefixLM"]
    documents = read_heldout_documents(data_dir)
    probe_set = cut_passages(documents, 64, 32, args.passages)
    print(f"held-out: {len(documents)} documents, {len(probe_set[0])} passages of 64 + 32 tokens", flush=True)
    teacher = load_causal_lm(SOURCE, torch.float32)
    teacher.requires_grad_(False)
    references = source_probe(teacher, *probe_set, metadata, args.eval_batch)
    print(f"source: target alone {references['source_target_only']:.3f}, with prefix "
          f"{references['source_with_context']:.3f}", flush=True)
    plan = {init: list(args.objectives.split(",")) for init in args.inits.split(",")}
    if not args.no_warmup_arm:
        plan.setdefault(WARMUP_ARM[0], []).append(WARMUP_ARM[1])
    arms = []
    for init, objectives in plan.items():
        initial = initial_state(init, args, job.adapt, args.seed)
        for objective in objectives:
            arms.append(train_arm(init, objective, initial, datasets[objective], teacher, probe_set, args, args.seed))
            save(args, references, arms)
            release_memory()
        os.remove(initial[1])  # 3 GB
    winner = min(arms, key=lambda a: a["curve"][-1]["encoder"])
    if not args.no_repeat:
        initial = initial_state(winner["init"], args, job.adapt, args.seed + 1)
        arms.append(train_arm(winner["init"], winner["objective"], initial, datasets[winner["objective"]], teacher,
                              probe_set, args, args.seed + 1))
        save(args, references, arms)
        os.remove(initial[1])
    print_table(args, references, arms)
    plot(args, references, arms)


def save(args, references, arms):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "distill_proof.json"), "w") as f:
        json.dump({"args": vars(args), "source": references, "arms": arms}, f, indent=1)


def print_table(args, references, arms):
    """Each column: the first evaluation at or past that many real training tokens."""
    print(f"\nsource (Gemma 3 270M, Q4_K_M dequantised to fp32): target alone {references['source_target_only']:.3f}, "
          f"prefix + target {references['source_with_context']:.3f} nats/token")
    marks = [0] + [args.tokens * (i + 1) // args.evals for i in range(args.evals)]
    print("| init | objective | seed | " + " | ".join(f"{t} tokens: enc / masked" for t in marks) + " |")
    print("|---|---|---|" + "---|" * len(marks))
    for arm in arms:
        cells = [f"{p['encoder']:.3f} / {p['encoder_masked']:.3f}" for p in arm["curve"]]
        print(f"| {arm['init']} | {arm['objective']} | {arm['seed']} | " + " | ".join(cells) + " |")


def plot(args, references, arms):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    colours = {"random": "tab:gray", "paper": "tab:blue", "step-0": "tab:green"}
    colours_ew = "tab:red"
    styles = {"UL2": ":", "PrefixLM": "--", "PrefixLM+KD": "-", "PrefixLM+KD+EW": "-."}
    for arm in arms:
        if arm["seed"] != args.seed:
            continue
        xs = [p["tokens"] for p in arm["curve"]]
        for panel, field in zip(axes, ("encoder", "encoder_masked")):
            if arm["init"] == "random" and panel is axes[1]:
                continue
            panel.plot(xs, [p[field] for p in arm["curve"]], linestyle=styles[arm["objective"]],
                       color=colours_ew if arm["objective"].endswith("+EW") else colours[arm["init"]], marker="o", markersize=3, label=f"{arm['init']}, {arm['objective']}")
    for panel, title in zip(axes, ("with the encoder", "encoder masked (the decoder alone)")):
        panel.axhline(references["source_target_only"], color="black", linewidth=1, label="source, target alone")
        panel.axhline(references["source_with_context"], color="black", linewidth=1, linestyle="-.",
                      label="source, prefix + target")
        panel.set_xlabel(f"real training tokens (batch {args.batch}, {args.encoder_length} + {args.decoder_length})")
        panel.set_ylabel("held-out target CE (nats / token)")
        panel.set_title(title)
        panel.grid(alpha=0.3)
    # The step-0 evaluation of the adapted arms (6.7-12.7) and every random-init point (above 10.5)
    # are off the chart; the table has them.
    for panel in axes:
        panel.set_ylim(references["source_with_context"] - 0.2, references["source_target_only"] + 1.2)
    axes[0].legend(fontsize=7, loc="lower left", ncol=2)
    figure.suptitle("Gemma 3 270M (Q4_K_M GGUF -> fp32) -> T5Gemma 2 270M-270M: held-out 64 -> 32 token passages")
    path = os.path.join(REPO, "bench", "results", "distill_proof.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
