"""Training speed on one GPU: T5Gemma 2 270M-270M, bf16, ZeRO-0/2/3, 512 + 256 tokens.

What runs is the training loop itself (jobs/train/loop.train, what each Ray Train worker runs) in one
process with one NCCL rank, without Ray and MLflow, on synthetic micro-batches; checkpoints are not
written (they are not a per-step cost). Each try is a fresh process that trains 2 x --steps steps:
the first half warms up (allocator, kernels), the second half is the measured window, as the loop
itself logs it: tokens/s at real lengths, MFU at padded and at real lengths (jobs/train/metrics.py,
bf16 datasheet peak), peak GPU memory (torch.cuda.max_memory_allocated / reserved).

Micro-batch search: at the first stage in --stages, each size in --batches in turn until one does not
fit (CUDA out of memory); the other stages are timed at the largest size that fitted (the next size
down if it does not fit them). With one GPU, ZeRO-2/3 partition over one rank, so they hold about
what ZeRO-0 holds and show what their bookkeeping costs.

Model: the shapes of the real Gemma 3 270M adapted to T5Gemma 2 270M-270M (configs/quickstart.yaml's
adapt section), with random weights. The real weights (a ~245 MB GGUF package) cannot travel to a lent
GPU machine (64 MiB per call), and speed and memory do not depend on the weights' values.
Synthetic examples: random token ids; real lengths drawn uniformly in [0.75, 1] x 512 (encoder) and
[0.25, 1] x 256 (decoder targets), so the two MFUs differ as they do on UL2 data.

Two steps:
  here (needs the real source and pip's registry):  .venv/bin/python bench/gpu_train.py prepare
      writes bench/out/gpu/ (36 MB): model/config.json, and wheels/ for Python 3.12 of DeepSpeed,
      transformers, accelerate and what they require, at the versions installed here, less torch
      and numpy (see REQUIREMENTS)
  on the GPU machine (device `run` with carry ["bench/out/gpu"]), one call (estimated 5-8 minutes, not yet run):
      set -o pipefail
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/out/gpu/wheels/*.whl || exit 1
      export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
      timeout 340 python3 bench/gpu_train.py run --results $OUT/gpu_train.json 2>&1 | tee $OUT/gpu_train.log
      timeout 200 python3 bench/gpu_train.py run --stages 0 --batches 128,256,512 --chunk 4096 \\
          --results $OUT/gpu_chunked.json 2>&1 | tee $OUT/gpu_chunked.log
  (the last line: the largest micro-batch with the cross-entropy in chunks of 4096 targets; only what
  is under $OUT comes back, and the JSON files are rewritten after every try)
On CPU (a check that the bench itself works, not a measurement):
  .venv/bin/python bench/gpu_train.py run --device cpu --model-config DIR --encoder-length 64 \\
      --decoder-length 32 --batches 2,4 --steps 2 --stages 0,3
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PREPARED = os.path.join(REPO, "bench", "out", "gpu")
# What the training loop imports that the GPU machine's image lacks or has at another version (it
# has torch and numpy, older transformers and huggingface-hub, no DeepSpeed): these, accelerate for
# ZeRO-3's partitioned build, and everything they require in turn, at the versions installed here.
REQUIREMENTS = ["transformers", "accelerate", "deepspeed"]
# The image's own: torch must stay its CUDA build (pulling it in would download GBs), numpy is 16 MB.
NOT_CARRIED = {"torch", "numpy"}
TARGET_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}


def requirement_closure(names) -> dict:
    """{name: installed version} of `names` and everything they require (markers evaluated for the
    GPU machine's Python, extras left out), read from this environment's package metadata."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in NOT_CARRIED:
            continue
        dist = distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(TARGET_PYTHON):
                todo.append(requirement.name)
    return found


def prepare(out: str) -> None:
    """model/config.json (the 270M-270M's config, from the adapt stage's own design of the real
    source: no weights) and wheels/ under `out`."""
    from jobs.adapt.stage import design, open_sources
    from orchestrator.config import load_config

    adapt = load_config(os.path.join(REPO, "configs", "quickstart.yaml")).adapt
    config = design(adapt, open_sources(adapt)).config
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    config.save_pretrained(os.path.join(out, "model"))
    wheels = os.path.join(out, "wheels")
    shutil.rmtree(wheels, ignore_errors=True)  # two versions of one package would stop the install there
    os.makedirs(wheels)
    packages = requirement_closure(REQUIREMENTS)
    deepspeed = packages.pop("deepspeed")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                          "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", wheels]
                   + [f"{name}=={version}" for name, version in sorted(packages.items())], check=True)
    # DeepSpeed ships no wheel: build the pure-Python one (its kernels compile on first use, and the
    # loop uses none of them), against the torch installed here.
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, f"deepspeed=={deepspeed}"],
                   check=True)
    print(f"prepared {out}: {len(os.listdir(wheels))} wheels")


def random_model(config_dir: str, out: str) -> str:
    """A model of the config in `config_dir` with random weights, saved to `out` (once). Built on
    the CPU: this process never opens the GPU, so each try has all of its memory."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        config = AutoConfig.from_pretrained(config_dir)
        AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def synthetic_batches(count: int, size: int, encoder_length: int, decoder_length: int, vocab: int, seed: int = 0):
    """`count` collated micro-batches of `size` examples (see the module docstring for the lengths)."""
    import numpy as np

    from jobs.core.examples_io import make_collate

    rng = np.random.default_rng(seed)
    collate = make_collate(encoder_length, decoder_length, 0)
    batches = []
    for _ in range(count):
        encoder = rng.integers(int(0.75 * encoder_length), encoder_length + 1, size)
        decoder = rng.integers(max(2, int(0.25 * decoder_length)), decoder_length + 1, size)
        labels = [rng.integers(10, vocab, n) for n in decoder]
        batches.append(collate({
            "input_ids": [rng.integers(10, vocab, n) for n in encoder], "labels": labels,
            "decoder_input_ids": [np.concatenate([[2], row[:-1]]) for row in labels],
            "denoiser": np.zeros(size, dtype=np.int64), "example_index": np.arange(size)}))
    return batches


def trial(job: dict) -> dict:
    """One try (in its own process): loop.train for 2 x steps steps; the measured window's figures."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cuda = job["device"] == "cuda"
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import itertools

    import torch
    import torch.distributed as dist

    from jobs.train import checkpoints, loop
    from jobs.train.config import TrainConfig

    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    checkpoints.save = lambda *args, **kwargs: "(not written by the bench)"
    seen = {}
    load_model = loop.load_model

    def recording_load(*args, **kwargs):
        model = load_model(*args, **kwargs)
        seen["attention"] = getattr(model.config, "_attn_implementation", "unknown")
        return model

    loop.load_model = recording_load
    steps = job["steps"]
    cfg = TrainConfig(max_steps=2 * steps, num_workers=1, use_gpu=cuda, precision="bf16" if cuda else "fp32",
                      micro_batch_size=job["batch"], zero_stage=job["stage"], lr=1e-5, warmup_steps=0,
                      schedule="constant", log_every_steps=steps, checkpoint_every_steps=2 * steps,
                      loss_chunk_tokens=job["chunk"], activation_checkpointing=job["checkpointing"])
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(job["init_dir"]).decoder.vocab_size
    batches = synthetic_batches(4, job["batch"], job["encoder_length"], job["decoder_length"], vocab)
    if cuda:
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    reported = []
    context = loop.WorkerContext(rank=0, world_size=1, device=device, micro_batches=lambda start: itertools.cycle(batches),
                                 report=reported.append)
    spec = loop.RunSpec(train=cfg, init_dir=job["init_dir"], storage=tempfile.mkdtemp(prefix="t5adapt-gpu-bench-"),
                        config_hash="bench", encoder_length=job["encoder_length"],
                        decoder_length=job["decoder_length"], pad_id=0, num_examples=4 * job["batch"],
                        denoiser_names=["S"], cross_attn_warmup_steps=0, cross_attn_patterns=[])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        loop.train(context, spec)
    except torch.OutOfMemoryError as e:
        return {"fits": False, "out_of_memory": True, "error": str(e).splitlines()[0]}
    finally:
        dist.destroy_process_group()
    metrics = reported[-1]
    result = {"fits": True, "attention": seen.get("attention"),
              **{k: metrics[k] for k in ("tokens_per_s", "examples_per_s", "step_time_s", "mfu", "mfu_real",
                                         "model_tflops_per_s", "model_tflops_per_s_real")}}
    result["padded_tokens_per_s"] = metrics["examples_per_s"] * (job["encoder_length"] + job["decoder_length"])
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["device_name"] = torch.cuda.get_device_name(device)
        result["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return result


def run_trial(job: dict, timeout_s: float) -> dict:
    """trial(job) in a fresh process (a CUDA out-of-memory leaves nothing behind for the next try),
    stopped after timeout_s. "out_of_memory" tells a size that does not fit from a failure that a
    smaller size would not mend."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "trial", json.dumps(job), result.name],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**job, "fits": False, "out_of_memory": False, "error": f"no result after {timeout_s:.0f} s"}
        if done.returncode:
            output = (done.stdout + done.stderr).strip()
            tail = "\n".join(output.splitlines()[-15:])
            print(tail, file=sys.stderr, flush=True)
            return {**job, "fits": False, "out_of_memory": "out of memory" in output.lower(),
                    "error": f"exit {done.returncode}: {tail}"}
        return {**job, **json.load(open(result.name)), "wall_s": round(time.perf_counter() - started, 1)}


def run(args) -> None:
    init_dir = args.init or random_model(args.model_config, os.path.join(tempfile.gettempdir(), "t5adapt-gpu-270m"))
    base = {"device": args.device, "init_dir": init_dir, "steps": args.steps, "chunk": args.chunk,
            "checkpointing": args.checkpointing, "encoder_length": args.encoder_length,
            "decoder_length": args.decoder_length}
    sizes = [int(s) for s in args.batches.split(",")]
    results, fitted = [], None

    def timed(stage: int, size: int) -> dict:
        result = run_trial({**base, "stage": stage, "batch": size}, args.try_timeout)
        results.append(result)
        print(_row(result), flush=True)
        if args.results:  # after every try: a call cut off still returns what it measured
            with open(args.results, "w") as f:
                json.dump(results, f, indent=1)
        return result

    for stage in (int(s) for s in args.stages.split(",")):
        if fitted is None:  # the first stage: upwards until a size does not fit
            for size in sizes:
                if not timed(stage, size)["fits"]:
                    break
                fitted = size
            if fitted is None:
                break
        else:  # the others: the largest size that fits them, from the first stage's down
            for size in reversed([s for s in sizes if s <= fitted]):
                result = timed(stage, size)
                if result["fits"] or not result["out_of_memory"]:  # a smaller size mends only memory
                    break
    if fitted is None:
        raise SystemExit("no micro-batch size fitted: see the errors above")
    fitting = next((r for r in results if r["fits"]), {})
    print(f"\n{fitting.get('device_name', args.device)}, {fitting.get('device_memory_gib', float('nan')):.0f} GiB; "
          f"{args.encoder_length} + {args.decoder_length} tokens, {args.steps} steps measured after {args.steps} "
          f"warm-up steps; loss_chunk_tokens {args.chunk}, activation checkpointing {args.checkpointing}")
    if args.chunk:
        print("(with the loss in chunks the head runs on real targets only, so the padded MFU counts "
              "FLOPs that did not run: compare chunked tries on tokens/s and MFU real)")
    print(_header())
    for result in results:
        print(_row(result))


def _header() -> str:
    return (f"{'ZeRO':>4} {'micro':>5} {'tokens/s':>9} {'padded t/s':>10} {'s/step':>7} {'MFU':>6} {'MFU real':>8} "
            f"{'peak GiB':>8} {'reserved':>8}  attention")


def _row(r: dict) -> str:
    if not r["fits"]:
        verdict = "does not fit" if r.get("out_of_memory") else "failed"
        return f"{r['stage']:>4} {r['batch']:>5}  {verdict}: {r['error'].splitlines()[-1][:300]}"
    return (f"{r['stage']:>4} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {r['padded_tokens_per_s']:>10.0f} "
            f"{r['step_time_s']:>7.3f} {r['mfu']:>6.1%} {r['mfu_real']:>8.1%} "
            f"{r.get('peak_allocated_gib', float('nan')):>8.1f} {r.get('peak_reserved_gib', float('nan')):>8.1f}  "
            f"{r['attention']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here: the model's config and the wheels the GPU machine lacks")
    prep.add_argument("--out", default=PREPARED)
    timing = commands.add_parser("run", help="on the GPU machine: search the micro-batch, time each ZeRO stage")
    timing.add_argument("--model-config", default=os.path.join(PREPARED, "model"),
                        help="a folder with the model's config.json (random weights)")
    timing.add_argument("--init", help="an adapted checkpoint to train instead of random weights")
    timing.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    timing.add_argument("--stages", default="0,2,3", help="ZeRO stages; the first one searches the micro-batch")
    timing.add_argument("--batches", default="8,16,32,64,128,256", help="micro-batch sizes to try, smallest first")
    timing.add_argument("--steps", type=int, default=10, help="warm-up steps, then as many measured")
    timing.add_argument("--encoder-length", type=int, default=512)
    timing.add_argument("--decoder-length", type=int, default=256)
    timing.add_argument("--chunk", type=int, default=0, help="train.loss_chunk_tokens")
    timing.add_argument("--checkpointing", action="store_true", help="train.activation_checkpointing")
    timing.add_argument("--results", help="write every try's figures to this JSON file (after each try)")
    timing.add_argument("--try-timeout", type=float, default=240, help="seconds before a try is stopped")
    once = commands.add_parser("trial")  # internal: one try, in its own process
    once.add_argument("job")
    once.add_argument("result")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "run":
        run(args)
    else:
        with open(args.result, "w") as f:
            json.dump(trial(json.loads(args.job)), f)


if __name__ == "__main__":
    main()
