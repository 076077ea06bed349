"""How each target tensor is made: copied from a named source tensor, or initialised by a stated rule.

A plan is a list of TargetTensor; every parameter of the target model must have exactly one.
Rules read sources through `role` ("encoder" / "decoder"), so a plan never holds tensors itself.
"""

import hashlib
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

# Gemma decoder-layer names -> encoder/decoder-layer names in T5Gemma / T5Gemma 2; the rest keep theirs.
LAYER_RENAMES = {"input_layernorm": "pre_self_attn_layernorm", "post_attention_layernorm": "post_self_attn_layernorm"}


def rename_layer_tensor(suffix: str) -> str:
    """'input_layernorm.weight' -> 'pre_self_attn_layernorm.weight'; other names unchanged."""
    module, _, rest = suffix.partition(".")
    return LAYER_RENAMES.get(module, module) + "." + rest if rest else suffix


class Rule:
    """Subclasses have `role` and `source_name` (the source tensor read, or None for pure
    initialisation) and `same_shape` (whether that tensor must have the target's shape)."""

    same_shape = False

    def describe(self) -> str:
        raise NotImplementedError

    def build(self, read, shape: Tuple[int, ...], generator_seed: int) -> torch.Tensor:
        """`read(role, name)` returns a source tensor; returns a float32 tensor of `shape`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Copy(Rule):
    role: str
    source_name: str
    same_shape = True

    def describe(self) -> str:
        return "copy"

    def build(self, read, shape, generator_seed):
        return read(self.role, self.source_name).float()


@dataclass(frozen=True)
class ScaledNorm(Rule):
    """A Gemma RMSNorm weight w (the norm multiplies by 1 + w) rescaled so its output is `scale` times."""

    role: str
    source_name: str
    scale: float
    same_shape = True

    def describe(self) -> str:
        return f"gemma_norm_scale({self.scale:g}): w' = {self.scale:g} * (1 + w) - 1"

    def build(self, read, shape, generator_seed):
        return self.scale * (1.0 + read(self.role, self.source_name).float()) - 1.0


@dataclass(frozen=True)
class EmbeddingRow(Rule):
    """One row of an embedding matrix times a multiplier (T5Gemma 2 keeps its end-of-image token
    embedding as a separate, already-scaled vector)."""

    role: str
    source_name: str
    row: int
    multiplier: float

    def describe(self) -> str:
        return f"row({self.row}) * {self.multiplier:.6g}"

    def build(self, read, shape, generator_seed):
        return read(self.role, self.source_name)[self.row].float() * self.multiplier


@dataclass(frozen=True)
class Constant(Rule):
    value: float
    role = source_name = None

    def describe(self) -> str:
        return f"constant({self.value:g})"

    def build(self, read, shape, generator_seed):
        return torch.full(shape, self.value, dtype=torch.float32)


@dataclass(frozen=True)
class Normal(Rule):
    """Normal(0, std), drawn from a generator seeded by (job seed, target name): the same tensor
    whatever order or subset of the plan is built."""

    std: float
    role = source_name = None

    def describe(self) -> str:
        return f"normal(0, {self.std:g})"

    def build(self, read, shape, generator_seed):
        generator = torch.Generator().manual_seed(generator_seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32) * self.std


@dataclass(frozen=True)
class TargetTensor:
    name: str
    shape: Tuple[int, ...]
    rule: Rule


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the job seed and a tensor name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def init_rule_for_unused(name: str, std: float) -> Rule:
    """Initialisation for modules that exist only because the class builds them (the vision tower of a
    text-only T5Gemma 2): transformers' own defaults, stated here so the manifest says them."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return Constant(0.0)
    if "mm_soft_emb_norm" in name or "mm_input_projection" in name:
        return Constant(0.0)  # Gemma RMSNorm (1 + w) and transformers' zero projection init
    if "norm" in name and leaf == "weight":
        return Constant(1.0)  # LayerNorm
    return Normal(std)


def check_plan_covers(plan, expected: Dict[str, Tuple[int, ...]]) -> None:
    """Every target parameter has exactly one rule with the right shape (a bug otherwise, not user error)."""
    planned = {t.name: t.shape for t in plan}
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    wrong = sorted(n for n in set(planned) & set(expected) if tuple(planned[n]) != tuple(expected[n]))
    if missing or extra or wrong or len(planned) != len(plan):
        raise RuntimeError(f"adaptation plan does not match the target: missing={missing[:5]} extra={extra[:5]} "
                           f"wrong_shape={wrong[:5]} duplicates={len(plan) - len(planned)}")
