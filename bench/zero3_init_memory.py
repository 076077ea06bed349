"""Peak host memory per rank when ZeRO-3 training starts: the model built whole then partitioned by
DeepSpeed (before) against built partitioned (after: jobs/train/loop.load_model under ZeRO-3, which
runs transformers' from_pretrained inside deepspeed.zero.Init), at 1, 2 and 4 ranks.

The model is a synthetic T5Gemma 2 of --hidden / --layers with Gemma 3's 262,144-token vocabulary
(random weights, ~3 GB in fp32), written once to bench/out/zero3-synthetic. Each rank is its own
process in a gloo group (DeepSpeed's CPU accelerator); it loads the model, builds t5adapt's ZeRO-3
engine (jobs/train/loop.build_engine) and reports its peak RSS (ru_maxrss) at that point. Every
configuration runs in fresh processes, one after another.

Run: .venv/bin/python bench/zero3_init_memory.py [--ranks 1,2,4]
"""

import argparse
import json
import multiprocessing
import os
import resource
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "bench", "out", "zero3-synthetic")


def write_model(hidden: int, layers: int) -> str:
    """A random T5Gemma 2 with the tiny builtin's structure scaled up; returns its directory."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    marker = os.path.join(OUT, "bench.json")
    wanted = {"hidden": hidden, "layers": layers}
    if os.path.exists(marker) and json.load(open(marker)) == wanted:
        return OUT
    from jobs.adapt.stage import run_adapt
    from orchestrator.config import load_config

    tiny = run_adapt(load_config(os.path.join(REPO, "configs", "tiny.yaml")).adapt, OUT + "-tiny", key="bench")
    config = AutoConfig.from_pretrained(tiny).to_dict()
    for text in (config["encoder"]["text_config"], config["decoder"]):
        text.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, query_pre_attn_scalar=hidden // 8,
                    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6) +
                    ["sliding_attention"] * (layers % 6), vocab_size=262144)
    config = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(OUT, max_shard_size="1GB")
    json.dump(wanted, open(marker, "w"))
    return OUT


def rank_main(rank, world, port, model_dir, partitioned, results):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSeq2SeqLM

    from jobs.train.config import TrainConfig
    from jobs.train.loop import build_engine, load_model
    from jobs.train.schedule import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(zero_stage=3, num_workers=world, micro_batch_size=1)
    if partitioned:
        model = load_model(model_dir, cfg)
    else:  # what loop.load_model did before: the whole fp32 model on every rank, then partitioned
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    build_engine(model, param_groups(model, [], 0.01), cfg, world)
    dist.barrier()
    results.put((rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))  # KiB -> GiB


def measure(world: int, model_dir: str, partitioned: bool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=rank_main, args=(r, world, port, model_dir, partitioned, results))
                 for r in range(world)]
    for p in processes:
        p.start()
    peaks = dict(results.get(timeout=1800) for _ in range(world))
    for p in processes:
        p.join()
    return [peaks[r] for r in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    model_dir = write_model(args.hidden, args.layers)
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    print(f"synthetic T5Gemma 2: hidden {args.hidden}, {args.layers}+{args.layers} layers, vocab 262144, "
          f"{size / 2**30:.2f} GiB of fp32 weights; peak RSS per rank (GiB) after building the ZeRO-3 engine\n")
    print(f"{'ranks':>5}  {'before: max / mean':>20}  {'after: max / mean':>19}  {'after/before (mean)':>19}")
    for world in (int(w) for w in args.ranks.split(",")):
        before = measure(world, model_dir, partitioned=False)
        after = measure(world, model_dir, partitioned=True)
        mean = lambda xs: sum(xs) / len(xs)
        print(f"{world:>5}  {max(before):>10.2f} / {mean(before):<7.2f}  {max(after):>9.2f} / {mean(after):<7.2f}  "
              f"{mean(after) / mean(before):>19.2f}", flush=True)


if __name__ == "__main__":
    main()
