"""Configuration of the evaluate stage (trained model + held-out data -> evaluation.json / .md).

Kept free of torch/transformers imports so config validation stays instant.
"""

from dataclasses import dataclass


@dataclass
class EvaluateConfig:
    """Defaults sized for the real Gemma 3 270M on a 2-core CPU: about 2.5 min measured on a busy
    2-core machine (~50 s of it loading both models); raise the counts on real hardware."""

    enabled: bool = True
    # Held-out loss: up to this many held-out examples, scored in batches.
    max_examples: int = 32
    batch_size: int = 8
    # The adaptation probe: held-out passages cut into a prefix (encoder) and a target (decoder).
    probe_passages: int = 8
    probe_prefix_tokens: int = 64
    probe_target_tokens: int = 32
    # Inference cost, measured the same way for the encoder-decoder and its source model.
    cost_input_tokens: int = 128
    cost_output_tokens: int = 16
    cost_repeats: int = 3
    # Sample generations (greedy) from held-out prefixes.
    num_samples: int = 2
    sample_new_tokens: int = 24

    def __post_init__(self):
        for key in ("max_examples", "batch_size", "probe_passages", "probe_prefix_tokens", "probe_target_tokens",
                    "cost_input_tokens", "cost_output_tokens", "cost_repeats", "sample_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"evaluate.{key}={getattr(self, key)} must be at least 1")
        if self.cost_output_tokens < 2:
            raise ValueError(f"evaluate.cost_output_tokens={self.cost_output_tokens} must be at least 2: the per-token "
                             "latency is timed between consecutive generated tokens")
        if self.num_samples < 0:
            raise ValueError(f"evaluate.num_samples={self.num_samples} must be >= 0")
