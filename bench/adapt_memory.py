"""Peak memory and time of `t5adapt adapt`, as a ratio to the size of the checkpoint it writes.

Cases (each in a fresh process; peak RSS from the kernel via wait4):
  1. the real Gemma 3 270M (GGUF) -> T5Gemma 2 270M-270M, float32
     (its GGUF metadata/tokenizer parse happens once per file and is cached; the first case
     clears that cache and shows the one-off cost, the second is every later run)
  2. a synthetic sharded Gemma 2 source of >= 2 GB (bfloat16, random weights, 13 layers of the 2B's
     width) -> balanced T5Gemma, bfloat16: the streaming path on a checkpoint too big to hold twice

Run: .venv/bin/python bench/adapt_memory.py [--skip-synthetic]
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


def run_cli(args, env):
    """Run `t5adapt ARGS` in a child process; return (seconds, peak RSS bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"t5adapt {' '.join(args)} failed:\n{child.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def checkpoint_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def write_synthetic_gemma2(path, num_layers=13):
    """A Gemma 2 checkpoint of the 2B's width, bfloat16, written tensor by tensor (never whole in memory)."""
    import torch
    from transformers import Gemma2Config

    from jobs.core.builtin import tiny_tokenizer
    from jobs.core.tensors import StreamingWriter

    config = Gemma2Config(vocab_size=32768, hidden_size=2304, intermediate_size=9216, num_hidden_layers=num_layers,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256, dtype="bfloat16")
    h, kv, q, ff = config.hidden_size, 4 * 256, 8 * 256, config.intermediate_size
    per_layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
                 "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h),
                 "mlp.down_proj.weight": (h, ff), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)}
    specs = [("model.embed_tokens.weight", (config.vocab_size, h), torch.bfloat16)]
    specs += [(f"model.layers.{i}.{k}", s, torch.bfloat16) for i in range(num_layers) for k, s in per_layer.items()]
    specs += [("model.norm.weight", (h,), torch.bfloat16)]
    os.makedirs(path, exist_ok=True)
    writer = StreamingWriter(path, specs, max_shard_bytes=512 * 2**20)
    generator = torch.Generator().manual_seed(0)
    for name, shape, dtype in specs:
        writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(dtype))
    writer.close()
    config.save_pretrained(path)
    # The tokenizer only has to exist; vocab ids beyond its 512 are never looked up here.
    tiny_tokenizer().save_pretrained(path)
    return checkpoint_bytes(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="t5adapt-bench-")
    env = dict(os.environ, T5ADAPT_CACHE=os.path.join(work, "cache"), HF_HUB_OFFLINE="1")
    rows = []
    try:
        quickstart = os.path.join(REPO, "configs", "quickstart.yaml")
        for label in ("real 270M, first run (GGUF metadata parsed)", "real 270M, later runs (metadata cached)"):
            out = os.path.join(work, "real")
            seconds, peak = run_cli(["adapt", quickstart, "--out", out, "--force"], env)
            rows.append((label, checkpoint_bytes(out), peak, seconds))
            shutil.rmtree(out)
        if not args.skip_synthetic:
            source = os.path.join(work, "synthetic-gemma2")
            started = time.perf_counter()
            source_bytes = write_synthetic_gemma2(source)
            print(f"synthetic Gemma 2 source: {source_bytes / 1e9:.2f} GB in "
                  f"{len(os.listdir(source))} files ({time.perf_counter() - started:.0f} s to write)")
            out = os.path.join(work, "synthetic-out")
            seconds, peak = run_cli(["adapt", quickstart, f"adapt.source={source}", "adapt.dtype=bfloat16",
                                     "adapt.max_shard_mb=1024", "--out", out, "--force"], env)
            rows.append((f"synthetic Gemma 2 ({source_bytes / 1e9:.2f} GB, sharded) -> T5Gemma", checkpoint_bytes(out), peak, seconds))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'case':<58} {'target GB':>9} {'peak RSS GB':>11} {'ratio':>6} {'time s':>7}")
    for label, target, peak, seconds in rows:
        print(f"{label:<58} {target / 1e9:>9.2f} {peak / 1e9:>11.2f} {peak / target:>6.2f} {seconds:>7.1f}")
    print(json.dumps([{"case": r[0], "target_bytes": r[1], "peak_rss_bytes": r[2], "seconds": round(r[3], 1)} for r in rows]))


if __name__ == "__main__":
    main()
