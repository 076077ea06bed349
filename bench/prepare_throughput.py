"""Throughput of tokenize + pack + denoise (UL2 mixture, quickstart lengths 512/256, real Gemma 3 tokenizer).

Side by side in one run, on the same corpus (shipped English prose, split over 8 files and repeated):
  reference   a plain single-process implementation: one tokenizer call per document, Python-list
              packing, and T5's per-example span noise (tests/span_reference.py)
  fast        the project's path in one process: batched tokenization, vectorised packing and
              span corruption (jobs/data), no Ray
  ray 1 / 2   the full `prepare` stage on a local Ray cluster of 1 and 2 CPUs (Parquet written)
Figures are corpus tokens per second, and per core. Also: what one H100 would consume training the
270M-270M, from the model's FLOPs per token at 40% of bf16 peak.

Run: .venv/bin/python bench/prepare_throughput.py [--repeat 6]
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Per-core figures: the Rust tokenizer would otherwise use every core in the single-process rows.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
TOKENIZER = "builtin:gemma3-270m"

# The lengths this benchmark has always measured (the quickstart trains shorter examples on 2 cores).
LENGTHS = ["data.encoder_length=512", "data.decoder_length=256", "data.documents_per_piece=2000"]

def write_corpus(folder, repeat):
    from jobs.core.shipped_text import prose_documents

    documents = prose_documents() * repeat
    os.makedirs(folder, exist_ok=True)
    for part in range(8):
        with open(os.path.join(folder, f"part-{part}.jsonl"), "w") as f:
            for document in documents[part::8]:
                f.write(json.dumps({"text": document}) + "\n")
    return [os.path.join(folder, f"part-{p}.jsonl") for p in range(8)]


def load(files):
    return [json.loads(line)["text"] for path in files for line in open(path)]


def reference_pipeline(documents, tokenizer, plan, seed):
    """Plain: per-document tokenizer calls, one token list, examples cut and corrupted one by one.

    Returns (corpus tokens, examples, tokenize seconds, pack + denoise seconds)."""
    from jobs.data.plan import choose_denoisers
    from tests.span_reference import reference_corrupt

    started = time.perf_counter()
    stream = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        stream.append(plan.eos_id)
    tokenized = time.perf_counter()
    examples, offset, index = 0, 0, 0
    while True:
        denoiser = plan.denoisers[int(choose_denoisers(plan, seed, np.array([index], dtype=np.uint64))[0])]
        if offset + denoiser.raw_length > len(stream):
            break
        segment = stream[offset:offset + denoiser.raw_length]
        if denoiser.rate is not None:
            reference_corrupt(np.array(segment), denoiser.rate, denoiser.mean_span, plan.sentinel_ids, seed, index)
        offset += denoiser.raw_length
        index += 1
        examples += 1
    return len(stream), examples, tokenized - started, time.perf_counter() - tokenized


def fast_pipeline(documents, tokenizer, plan, seed, documents_per_piece=2000):
    """The project's functions in one process: batched Rust tokenization, vectorised packing and corruption."""
    from jobs.data.examples import build_examples, count_examples

    rust = tokenizer.backend_tokenizer
    rust.encode_special_tokens = True  # as the pipeline's actors do
    tokens, examples, start, tokenize_s, build_s = 0, 0, 0, 0.0, 0.0
    eos = np.array([plan.eos_id], dtype=np.int32)
    for first in range(0, len(documents), documents_per_piece):
        started = time.perf_counter()
        encodings = rust.encode_batch_fast(documents[first:first + documents_per_piece], add_special_tokens=False)
        stream = np.concatenate([np.concatenate([np.asarray(e.ids, dtype=np.int32), eos]) for e in encodings])
        tokenized = time.perf_counter()
        count = count_examples(len(stream), start, plan, seed)
        build_examples(stream, start, count, plan, seed)
        tokenize_s, build_s = tokenize_s + tokenized - started, build_s + time.perf_counter() - tokenized
        tokens, examples, start = tokens + len(stream), examples + count, start + count
    rust.encode_special_tokens = False
    return tokens, examples, tokenize_s, build_s


def ray_child(corpus_dir, out, cpus):
    """In a fresh process: the prepare stage on a local Ray cluster with `cpus` CPUs; prints seconds."""
    import ray

    from jobs.data.stage import run_prepare
    from orchestrator.config import load_config

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stage_seconds = {}

    class StageTimes(logging.Handler):
        """Reads the stage durations run_prepare logs ("tokenized ... in 12.3 s")."""

        def emit(self, record):
            message = record.getMessage()
            if message.startswith(("tokenized", "built")):
                stage_seconds["tokenize" if message.startswith("tokenized") else "build"] = float(message.rsplit(" in ", 1)[1].split()[0])
            elif message.startswith("tokenize operator ran"):
                stage_seconds["tokenize_operator"] = float(message.split()[3])

    logger = logging.getLogger("t5adapt.prepare")
    logger.setLevel(logging.INFO)
    logger.addHandler(StageTimes())
    cfg = load_config(os.path.join(REPO, "configs", "quickstart.yaml"),
                      LENGTHS + [f"data.corpus=[{{path: '{corpus_dir}'}}]", f"data.num_tokenizer_workers={cpus}"]).data
    started = time.perf_counter()
    metadata = run_prepare(cfg, TOKENIZER, out, key="bench", force=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "tokens": sum(s["tokens"] for s in metadata["sources"]),
                      "examples": metadata["num_examples"], "padding": metadata["padding_fraction"], **stage_seconds}))


def gpu_consumption_tokens_per_s():
    """Corpus tokens per second one H100 consumes training T5Gemma 2 270M-270M at 512/256, 40% of bf16 peak.

    Training FLOPs ~ 6 x (parameters each token passes through): encoder tokens pass the encoder's
    non-embedding weights; decoder tokens pass the decoder's and the 262144 x 640 LM head. Attention
    score FLOPs add 6 x 2 x layers x context x d per token (small at these lengths).
    """
    d, layers, vocab, ffn, q, kv = 640, 18, 262144, 2048, 1024, 256
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ffn
    encoder_flops = 6 * (layers * per_layer) + 12 * layers * 512 * q
    decoder_flops = 6 * (layers * per_layer + vocab * d) + 12 * layers * (256 + 512) * q
    per_example = 512 * encoder_flops + 256 * decoder_flops
    examples_per_s = 0.40 * 989e12 / per_example
    # An example consumes ~ its raw segment of corpus tokens; at 512/256 the UL2 mixture averages ~530.
    return examples_per_s, per_example


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=6, help="copies of the shipped corpus")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ray_child(args.child[0], args.child[1], int(args.child[2]))
        return
    from jobs.core.sources import load_tokenizer
    from jobs.data.plan import make_plan
    from orchestrator.config import load_config

    work = tempfile.mkdtemp(prefix="t5adapt-prepare-bench-")
    try:
        files = write_corpus(os.path.join(work, "corpus"), args.repeat)
        documents = load(files)
        tokenizer = load_tokenizer(TOKENIZER)
        cfg = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), LENGTHS).data
        plan = make_plan(cfg, tokenizer)
        rows, parts, ray_stages = [], [], []
        for name, pipeline in (("reference (plain, 1 process)", reference_pipeline), ("fast (jobs/data, 1 process)", fast_pipeline)):
            tokens, examples, tokenize_s, build_s = pipeline(documents, tokenizer, plan, cfg.seed)
            rows.append((name, tokens, examples, tokenize_s + build_s, 1))
            parts.append((name, tokens, tokenize_s, build_s))
        for cpus in (1, 2):
            result = subprocess.run([sys.executable, __file__, "--child", os.path.join(work, "corpus"),
                                     os.path.join(work, f"out-{cpus}"), str(cpus)], capture_output=True, text=True, cwd=REPO)
            if result.returncode:
                raise SystemExit(result.stderr[-3000:])
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append((f"ray prepare, {cpus} CPU(s), Parquet written", figures["tokens"], figures["examples"], figures["seconds"], cpus))
            ray_stages.append((cpus, figures["tokenize"], figures["tokenize_operator"], figures["build"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference_rate = rows[0][1] / rows[0][3]
    print(f"\ncorpus: {rows[0][1]:,} tokens ({args.repeat} copies of the shipped prose, 8 files); UL2 mixture, 512/256")
    print(f"{'pipeline':<40} {'examples':>9} {'seconds':>8} {'tokens/s':>10} {'tokens/s/core':>14} {'vs reference':>13}")
    for name, tokens, examples, seconds, cores in rows:
        rate = tokens / seconds
        print(f"{name:<40} {examples:>9,} {seconds:>8.2f} {rate:>10,.0f} {rate / cores:>14,.0f} {rate / reference_rate:>12.1f}x")
    print(f"\n{'where the time goes (1 core)':<40} {'tokenize tok/s':>15} {'pack+denoise tok/s':>19}")
    for name, tokens, tokenize_s, build_s in parts:
        print(f"{name:<40} {tokens / tokenize_s:>15,.0f} {tokens / build_s:>19,.0f}")
    print(f"pack+denoise, fast vs reference: {parts[0][3] / parts[1][3]:.1f}x")
    print(f"\n{'ray stages (wall seconds)':<40} {'tokenize':>9} {'of which operator':>18} {'build+write':>12}")
    for cpus, tokenize_s, operator_s, build_s in ray_stages:
        print(f"{f'{cpus} CPU(s)':<40} {tokenize_s:>9.1f} {operator_s:>18.1f} {build_s:>12.1f}")
    print(f"tokenize speed-up, 1 -> 2 CPUs: stage {ray_stages[0][1] / ray_stages[1][1]:.2f}x, "
          f"operator {ray_stages[0][2] / ray_stages[1][2]:.2f}x")
    examples_per_s, flops = gpu_consumption_tokens_per_s()
    print(f"\none H100 at 40% of 989 TFLOPS bf16 trains ~{examples_per_s:,.0f} examples/s of 512+256 tokens "
          f"({flops / 1e9:,.0f} GFLOP each), i.e. ~{examples_per_s * 530:,.0f} corpus tokens/s")


if __name__ == "__main__":
    main()
