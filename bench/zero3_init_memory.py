"""Peak host memory per rank when ZeRO-3 training starts, at 1, 2 and 4 ranks: the model loaded whole
on every rank and then partitioned by deepspeed.initialize ("before"), against built partitioned by
jobs/train/loop.load_model, which under ZeRO-3 runs from_pretrained inside deepspeed.zero.Init
(jobs/train/partitioned.py, "after").

The model is a synthetic T5Gemma 2: the tiny builtin's structure (configs/tiny.yaml, adapted) with
--hidden and --layers per side, its 512-token vocabulary kept, random weights, ~1.5 GB in fp32,
written once per run to a temporary folder. Each rank is its own process in a gloo group
(DeepSpeed's CPU accelerator); it builds t5adapt's ZeRO-3 engine (loop.build_engine over
schedule.param_groups) and reports its peak RSS right after (VmHWM: ru_maxrss would also count the
parent's peak, which Linux carries across exec). "start" is the peak before the model is touched
(torch, DeepSpeed and the model's code imported, process group up): what every rank pays anyway. Each configuration runs in fresh processes,
one after another; at most 4 ranks at once.

Run: .venv/bin/python bench/zero3_init_memory.py [--ranks 1,2,4] [--hidden 1792] [--layers 4] [--precision fp32]
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_model(out: str, hidden: int, layers: int) -> float:
    """A random T5Gemma 2 of the given size in `out`; returns its fp32 size in GiB."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from jobs.adapt.stage import run_adapt
    from orchestrator.config import load_config

    tiny = run_adapt(load_config(os.path.join(REPO, "configs", "tiny.yaml")).adapt, os.path.join(out, "tiny"), key="bench")
    config = AutoConfig.from_pretrained(tiny).to_dict()
    for text in (config["encoder"]["text_config"], config["decoder"]):
        text.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=hidden // 8, query_pre_attn_scalar=hidden // 8,
                    layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(os.path.join(out, "model"))
    return sum(p.numel() for p in model.parameters()) * 4 / 2**30


def status_gib(field: str) -> float:
    """A memory field of this process's /proc status (VmHWM: peak RSS since exec; RssAnon), in GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20  # kB -> GiB


class AnonPeak(threading.Thread):
    """The largest anonymous RSS seen, sampled every 5 ms: the kernel keeps no peak of it, and
    VmHWM also counts the checkpoint's file pages mapped while loading, which are page cache the
    kernel can drop, not memory the rank allocated."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_gib, self.running = status_gib("RssAnon"), True

    def run(self):
        while self.running:
            self.peak_gib = max(self.peak_gib, status_gib("RssAnon"))
            time.sleep(0.005)


def rank_main(rank: int, world: int, port: int, model_dir: str, partitioned: bool, precision: str, results) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed  # noqa: F401 - imported before "start": every rank pays for it anyway
    import torch
    import torch.distributed as dist
    import transformers.models.t5gemma2.modeling_t5gemma2  # noqa: F401 - likewise
    from jobs.core.pretrained import load_seq2seq
    from jobs.train.config import TrainConfig
    from jobs.train.loop import build_engine, load_model
    from jobs.train.schedule import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    start = status_gib("VmHWM")
    anon = AnonPeak()
    anon.start()
    cfg = TrainConfig(zero_stage=3, num_workers=world, micro_batch_size=1, precision=precision)
    if partitioned:
        model = load_model(model_dir, cfg)
    else:  # what load_model did before: the whole fp32 model on every rank
        model = load_seq2seq(model_dir, attn_implementation="sdpa")
    loaded = anon.peak_gib
    build_engine(model, param_groups(model, [], 0.01), cfg, world)
    anon.running = False
    anon.join()
    dist.barrier()
    results.put((rank, {"start": start, "loaded": loaded, "peak": status_gib("VmHWM"), "anon": anon.peak_gib}))


def measure(world: int, model_dir: str, partitioned: bool, precision: str) -> list:
    """[{"start", "loaded", "peak", "anon"} GiB] per rank of one configuration, in fresh processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=rank_main, args=(r, world, port, model_dir, partitioned, precision, results))
                 for r in range(world)]
    for p in processes:
        p.start()
    try:
        by_rank = dict(results.get(timeout=900) for _ in range(world))
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [by_rank[r] for r in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--hidden", type=int, default=1792)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="train.precision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zero3-init-memory-") as out:
        # In a process of its own, so this one never holds the model.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            size_gib = pool.submit(write_model, out, args.hidden, args.layers).result()
        model_dir = os.path.join(out, "model")
        print(f"synthetic T5Gemma 2: hidden {args.hidden}, {args.layers}+{args.layers} layers, vocab 512, "
              f"{size_gib:.2f} GiB of fp32 weights, train.precision={args.precision}. GiB per rank once the ZeRO-3 engine is built: peak RSS, "
              "and peak anonymous RSS (without the checkpoint's file pages), for rank 0 and the largest of the "
              "other ranks; start: peak RSS before the model is touched; model loaded: peak anonymous RSS up to "
              "the end of the build, before deepspeed.initialize\n")
        print(f"{'ranks':>5}  {'build':<11}  {'start':>5}  {'model loaded: peak anon r0':>26}  {'others':>6}  "
              f"{'engine built: peak RSS r0':>25}  {'others':>6}  {'peak anon r0':>12}  {'others':>6}")
        for world in (int(w) for w in args.ranks.split(",")):
            for build, partitioned in (("whole", False), ("partitioned", True)):
                ranks = measure(world, model_dir, partitioned, args.precision)
                others = ranks[1:] or [dict.fromkeys(ranks[0], float("nan"))]
                print(f"{world:>5}  {build:<11}  {max(r['start'] for r in ranks):>5.2f}  {ranks[0]['loaded']:>26.2f}  "
                      f"{max(r['loaded'] for r in others):>6.2f}  {ranks[0]['peak']:>25.2f}  "
                      f"{max(r['peak'] for r in others):>6.2f}  {ranks[0]['anon']:>12.2f}  "
                      f"{max(r['anon'] for r in others):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
