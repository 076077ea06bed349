"""The teacher stage: the source model's top-k log-probs for distillation, stored beside prepared data."""
