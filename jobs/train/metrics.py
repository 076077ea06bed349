"""Throughput and MFU: FLOPs per example from the model's shape, and the device's peak.

MFU = (training FLOPs per example * examples per second) / (peak FLOP/s per device * devices), with

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

# Dense bf16 peak per device in TFLOP/s, from the vendors' datasheets; matched on the CUDA name.
# Most specific names first: "L40S" before "L40" before "L4".
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                   "L40": 181.0, "L4": 121.0, "A10G": 70.0}


def _text(config):
    return getattr(config, "text_config", None) or config


def flops_per_example(model: torch.nn.Module, encoder_length: int, decoder_length: int) -> float:
    """Training FLOPs (forward + backward) for one padded example; see the module docstring."""
    positions = _encoder_reading_kv(model, encoder_length, decoder_length)
    dense = 0
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or "embed" in name or "lm_head" in name:
            continue
        seen.add(id(param))
        default = encoder_length if ".encoder." in f".{name}" else decoder_length
        dense += 6 * param.numel() * positions.get(id(param), default)
    encoder, decoder = _text(model.config.encoder), _text(model.config.decoder)
    dense += 6 * decoder.vocab_size * decoder.hidden_size * decoder_length  # the output projection
    d_enc = encoder.num_attention_heads * encoder.head_dim
    d_dec = decoder.num_attention_heads * decoder.head_dim
    attention = 12 * (encoder.num_hidden_layers * d_enc * encoder_length ** 2
                      + decoder.num_hidden_layers * d_dec * decoder_length * (decoder_length + encoder_length))
    return float(dense + attention)


def _encoder_reading_kv(model: torch.nn.Module, encoder_length: int, decoder_length: int) -> Dict[int, int]:
    """id(param) -> positions per example, for the decoder's key/value projections that read the
    encoder's output (the other parameters see their own stack's length)."""
    positions = {}
    for name, module in model.named_modules():
        merged = type(module).__name__.endswith("MergedAttention")  # T5Gemma 2: encoder + decoder positions
        if merged or name.endswith("cross_attn"):  # T5Gemma: encoder positions only
            for projection in (module.k_proj, module.v_proj):
                for param in projection.parameters():
                    positions[id(param)] = encoder_length + (decoder_length if merged else 0)
    return positions


def device_peak_flops(configured_tflops: Optional[float], device: torch.device) -> Dict[str, object]:
    """{"flops": peak FLOP/s of one device, "source": where the number comes from}."""
    if configured_tflops:
        return {"flops": configured_tflops * 1e12, "source": "train.peak_tflops_per_device"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return {"flops": tflops * 1e12, "source": f"datasheet bf16 dense ({name})"}
        return {"flops": float("nan"), "source": f"unknown GPU {name}: set train.peak_tflops_per_device"}
    return {"flops": measured_matmul_flops(), "source": f"measured fp32 matmul ({torch.get_num_threads()} threads)"}


def measured_matmul_flops(size: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of repeated square fp32 matmuls on this process's threads: CPUs have no datasheet
    figure that fits a worker's share of a machine, so MFU on CPU is relative to this rate."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start)
