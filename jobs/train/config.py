"""Configuration of the train stage (adapted checkpoint + prepared examples -> trained model).

Kept free of torch/deepspeed imports so config validation stays instant. The DeepSpeed config is
generated from these fields (jobs/train/deepspeed_config.py) and checked here, at load time, so a
conflicting `train.deepspeed` key fails before any worker starts.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "constant")
NONFINITE_POLICIES = ("stop", "skip")
TEACHERS = ("online", "precomputed")


@dataclass
class DistillConfig:
    """Knowledge distillation from the source decoder-only model (jobs/train/distill.py): its
    next-token distribution as soft targets for the decoder on PrefixLM (S) examples. R/X examples
    have no teacher and train on their hard labels alone."""

    enabled: bool = False
    # loss = (1 - weight) * cross-entropy + weight * distillation, both token means of the step.
    weight: float = 0.5
    temperature: float = 1.0
    # Keep only the teacher's top-k log-probs per target token (the vocabulary is 262k: full teacher
    # logits do not fit in memory or on disk at scale). 0: the full vocabulary (online only).
    top_k: int = 64
    # online: a frozen copy of the source on every training worker computes them each step;
    # precomputed: the teacher stage stores them beside the prepared data once (Ray Data actors).
    teacher: str = "online"
    # precomputed: Ray actors that run the teacher, the examples per forward, CPUs per actor.
    teacher_workers: int = 1
    teacher_batch_size: int = 8
    teacher_cpus: float = 1.0

    def __post_init__(self):
        if not 0 <= self.weight <= 1:
            raise ValueError(f"train.distill.weight={self.weight} must be in [0, 1] (share of the distillation loss)")
        if self.temperature <= 0:
            raise ValueError(f"train.distill.temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            raise ValueError(f"train.distill.top_k={self.top_k} must be >= 0 (0: the full vocabulary)")
        if self.teacher not in TEACHERS:
            raise ValueError(f"train.distill.teacher={self.teacher!r} must be online or precomputed")
        if self.teacher == "precomputed" and self.top_k == 0:
            raise ValueError("train.distill.teacher=precomputed needs train.distill.top_k > 0: stored full-vocabulary "
                             "log-probs are 1 MiB per target token; use top_k (e.g. 64) or teacher=online")
        if self.teacher_workers < 1 or self.teacher_batch_size < 1 or self.teacher_cpus <= 0:
            raise ValueError("train.distill.teacher_workers and teacher_batch_size must be at least 1, teacher_cpus > 0")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    # Ray Train workers (one DeepSpeed rank each) and what each one holds.
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    # How Ray places the workers: PACK (fewest nodes), SPREAD, STRICT_PACK, STRICT_SPREAD (one per node).
    placement_strategy: str = "PACK"
    # Batch: micro_batch_size examples per worker per forward, grad_accum_steps forwards per step.
    micro_batch_size: int = 2
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None  # optional cross-check of the three numbers above
    # DeepSpeed ZeRO stage 0-3; offload keeps optimizer state / parameters in host memory.
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    # Cross-entropy over at most this many target tokens' logits at a time (jobs/train/chunked_loss.py):
    # with a 262k vocabulary the full logits are 1 MiB per target in fp32. 0: the full logits at once.
    # Pays when a micro-batch has well over ~1000 targets; below that it only adds recompute.
    loss_chunk_tokens: int = 0
    # AdamW with linear warm-up, then cosine decay to lr * min_lr_ratio (or constant).
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.01  # matrices only; norms and biases are not decayed
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # Unbalanced T5Gemma pairs: steps in which only cross-attention trains. None: what the adapted
    # checkpoint records (adapt.cross_attn_warmup_steps); ignored when the model needs no warm-up.
    cross_attn_warmup_steps: Optional[int] = None
    # Steps in which only the encoder (and cross-attention, if any) trains: the decoder and the shared
    # embedding stay the source's, so the model with its encoder masked is exactly the source and any
    # gain comes from reading the encoder (bench/distill_proof.py). 0: none.
    encoder_warmup_steps: int = 0
    on_nonfinite_loss: str = "stop"  # stop: fail naming the step | skip: discard that optimizer step, count it
    checkpoint_every_steps: int = 100
    # Held-out examples scored at every checkpoint (the first N of the prepared held-out split, the
    # ones the evaluate stage scores first), logged as heldout_loss to MLflow and to Ray Tune (a
    # sweep's ASHA scheduler stops trials on it). 0: none.
    heldout_examples: int = 0
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    max_failures: int = 2  # dead-worker restarts (from the last committed checkpoint) before giving up
    seed: int = 0
    # Device peak for the MFU estimate, in TFLOP/s. None: a table for known GPUs; on CPU, a measured
    # dense matmul rate (see README, "MFU").
    peak_tflops_per_device: Optional[float] = None
    # Extra DeepSpeed config keys, merged into the generated config; a key that the fields above
    # already set is an error (set it through the field), never a silent override.
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        for key in ("max_steps", "num_workers", "micro_batch_size", "grad_accum_steps", "checkpoint_every_steps",
                    "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be at least 1")
        product = self.micro_batch_size * self.grad_accum_steps * self.num_workers
        if self.global_batch_size is not None and self.global_batch_size != product:
            raise ValueError(
                "train.micro_batch_size * train.grad_accum_steps * train.num_workers must equal "
                f"train.global_batch_size ({self.micro_batch_size}*{self.grad_accum_steps}*{self.num_workers} "
                f"!= {self.global_batch_size}): change one of them, or drop train.global_batch_size")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"train.offload_params=true needs train.zero_stage=3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer=true needs train.zero_stage 1, 2 or 3 (got 0)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        # precision=bf16 without use_gpu is allowed: DeepSpeed's CPU accelerator supports bf16. It is
        # slow there and meant for checks (tests/test_bf16_export.py); auto stays fp32 on CPU.
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"train.on_nonfinite_loss={self.on_nonfinite_loss!r} must be stop or skip")
        if self.on_nonfinite_loss == "skip" and self.zero_stage == 0:
            raise ValueError("train.on_nonfinite_loss=skip needs train.zero_stage 1, 2 or 3: DeepSpeed's ZeRO "
                             "optimizer is what discards a step whose gradients are not finite")
        if self.keep_checkpoints < 2:
            raise ValueError(f"train.keep_checkpoints={self.keep_checkpoints} must be at least 2, so a damaged "
                             "newest checkpoint always has a predecessor to fall back on")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.seed < 0:
            raise ValueError(f"train.seed={self.seed} must be >= 0")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"train.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: full logits)")
        if self.distill.enabled and self.loss_chunk_tokens:
            raise ValueError("train.distill.enabled=true needs train.loss_chunk_tokens=0: the distillation loss uses "
                             "the student's full logits (set loss_chunk_tokens=0, or turn distillation off)")
        if self.heldout_examples < 0:
            raise ValueError(f"train.heldout_examples={self.heldout_examples} must be >= 0 (0: no held-out loss in training)")
        if self.lr < 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.max_failures < -1:
            raise ValueError("train.lr, train.warmup_steps and train.grad_clip must be >= 0 (lr=0 trains nothing: "
                             "a baseline), train.max_failures >= -1 (-1 retries forever)")
        if self.encoder_warmup_steps < 0:
            raise ValueError(f"train.encoder_warmup_steps={self.encoder_warmup_steps} must be >= 0")
        if self.cross_attn_warmup_steps is not None and self.cross_attn_warmup_steps < 0:
            raise ValueError(f"train.cross_attn_warmup_steps={self.cross_attn_warmup_steps} must be >= 0")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"train.placement_strategy={self.placement_strategy!r} must be PACK, SPREAD, "
                             "STRICT_PACK or STRICT_SPREAD")
        if self.cpus_per_worker <= 0 or (self.use_gpu and self.gpus_per_worker <= 0):
            raise ValueError("train.cpus_per_worker (and train.gpus_per_worker with use_gpu) must be > 0")
        from jobs.train.deepspeed_config import build_deepspeed_config

        build_deepspeed_config(self)  # raises ValueError on a conflicting train.deepspeed key

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers
