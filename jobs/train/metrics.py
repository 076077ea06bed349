"""Throughput and MFU: FLOPs per example from the model's shape, and the device's peak.

MFU = (training FLOPs per second) / (peak FLOP/s per device * devices), reported twice: "mfu" counts
every example at its padded lengths (the work the device does), "mfu_real" at its real lengths (the
useful part; padding is waste). The peak is the training precision's (bf16 only when training in
bf16). Training FLOPs per example:

  training FLOPs per example = 6 * (N_enc * L_enc + (N_dec + N_head) * L_dec + N_kv * L_enc)
                             + 12 * d_attn * (layers_enc * L_enc^2 + layers_dec * L_dec * (L_dec + L_enc))

N_enc, N_dec: encoder and decoder parameters without embeddings; N_head = vocab * hidden (the output
projection, tied or not); L_enc, L_dec: padded lengths (the work the device really does); d_attn =
heads * head_dim. N_kv: the decoder's key/value projections that also read the encoder's output
(T5Gemma 2's merged attention projects encoder and decoder positions with the same K/V weights;
T5Gemma's cross-attention K/V read only the encoder, so for those L_enc replaces L_dec). The first
term is the usual 6 FLOPs per parameter per position (forward 2, backward 4); the second is
attention's score and value products (forward 4 * L_q * L_k * d_attn, times 3), with every decoder
position attending to the decoder so far and the whole encoder. Sliding windows and causal masks are
not discounted, so the estimate is an upper bound on useful work. tests/test_train_config.py checks
it against torch's FLOP counter on both tiny architectures.
"""

import time
from typing import Dict, Optional

import torch

from jobs.train.partitioned import full_numel

# Dense peak per device in TFLOP/s, from the vendors' datasheets; matched on the CUDA name. bf16:
# tensor cores without sparsity; fp32: the non-tensor-core rate (torch leaves TF32 off for matmuls).
# Most specific names first: "L40S" before "L40" before "L4".
GPU_PEAK_TFLOPS = {
    "bf16": {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
             "L40": 181.0, "L4": 121.0, "A10G": 70.0},
    "fp32": {"H200": 67.0, "H100 PCIe": 51.0, "H100 NVL": 60.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6,
             "L40": 90.5, "L4": 30.3, "A10G": 31.2},
}


def _text(config):
    return getattr(config, "text_config", None) or config


class FlopsModel:
    """Training FLOPs of one example as a function of its encoder and decoder lengths (see the
    module docstring): a * L_enc + b * L_dec + c * L_enc^2 + d * L_dec * (L_dec + L_enc). Called with
    padded lengths it is the work the device does; with each example's real lengths (tensors of
    shape [batch]) it is the useful part of it."""

    def __init__(self, model: torch.nn.Module):
        reads_encoder = _kv_reading_encoder(model)
        per_encoder, per_decoder, seen = 0, 0, set()
        for name, param in model.named_parameters():
            if id(param) in seen or "embed" in name or "lm_head" in name:
                continue
            seen.add(id(param))
            numel = full_numel(param)  # a ZeRO-3 placeholder has 0 elements here
            if id(param) in reads_encoder:  # the decoder's K/V over encoder positions (and its own, if merged)
                per_encoder += numel
                per_decoder += numel if reads_encoder[id(param)] else 0
            elif ".encoder." in f".{name}":
                per_encoder += numel
            else:
                per_decoder += numel
        encoder, decoder = _text(model.config.encoder), _text(model.config.decoder)
        per_decoder += decoder.vocab_size * decoder.hidden_size  # the output projection
        self.per_encoder_token, self.per_decoder_token = 6.0 * per_encoder, 6.0 * per_decoder
        self.encoder_attention = 12.0 * encoder.num_hidden_layers * encoder.num_attention_heads * encoder.head_dim
        self.decoder_attention = 12.0 * decoder.num_hidden_layers * decoder.num_attention_heads * decoder.head_dim

    def __call__(self, encoder_length, decoder_length):
        return (self.per_encoder_token * encoder_length + self.per_decoder_token * decoder_length
                + self.encoder_attention * encoder_length ** 2
                + self.decoder_attention * decoder_length * (decoder_length + encoder_length))


def flops_per_example(model: torch.nn.Module, encoder_length: int, decoder_length: int) -> float:
    """Training FLOPs (forward + backward) for one padded example; see the module docstring."""
    return float(FlopsModel(model)(encoder_length, decoder_length))


def _kv_reading_encoder(model: torch.nn.Module) -> Dict[int, bool]:
    """id(param) -> whether it also projects decoder positions, for the decoder's key/value
    projections that read the encoder's output."""
    found = {}
    for name, module in model.named_modules():
        merged = type(module).__name__.endswith("MergedAttention")  # T5Gemma 2: encoder + decoder positions
        if merged or name.endswith("cross_attn"):  # T5Gemma: encoder positions only
            for projection in (module.k_proj, module.v_proj):
                for param in projection.parameters():
                    found[id(param)] = merged
    return found


def device_peak_flops(configured_tflops: Optional[float], device: torch.device, bf16: bool) -> Dict[str, object]:
    """{"flops": peak FLOP/s of one device in the training precision, "source": where it comes from}."""
    precision = "bf16" if bf16 else "fp32"
    if configured_tflops:
        return {"flops": configured_tflops * 1e12, "source": "train.peak_tflops_per_device"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS[precision].items():
            if key in name:
                return {"flops": tflops * 1e12, "source": f"datasheet {precision} dense ({name})"}
        return {"flops": float("nan"), "source": f"unknown GPU {name}: set train.peak_tflops_per_device"}
    dtype = torch.bfloat16 if bf16 else torch.float32
    return {"flops": measured_matmul_flops(dtype=dtype),
            "source": f"measured {precision} matmul ({torch.get_num_threads()} threads)"}


def measured_matmul_flops(size: int = 512, seconds: float = 0.3, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of repeated square matmuls in `dtype` on this process's threads: CPUs have no datasheet
    figure that fits a worker's share of a machine, so MFU on CPU is relative to this rate."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start)
