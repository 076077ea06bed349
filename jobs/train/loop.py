"""The training loop: one function, top to bottom. Ray Train's per-worker function (worker.py) only
builds the WorkerContext it reads from.

Per optimizer step: set the lr (schedule + cross-attention warm-up), then for each micro-batch:
forward, check the loss is finite on every rank, backward; DeepSpeed steps at the accumulation
boundary. Then maybe_log, maybe_checkpoint. Everything a resumed run needs (step, data position)
comes from the checkpoint, never from the config.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from jobs.train import checkpoints
from jobs.core.examples_io import token_losses
from jobs.train.config import TrainConfig
from jobs.train.metrics import device_peak_flops, flops_per_example
from jobs.train.schedule import count_parameters, param_groups, set_learning_rate

log = logging.getLogger("t5adapt.train")
STOPPED = "stopped.txt"  # in the storage root: why the last attempt stopped itself


@dataclass
class RunSpec:
    """Everything a worker needs, resolved by the driver (jobs/train/stage.py)."""
    train: TrainConfig
    init_dir: str  # adapted checkpoint (local path or s3://)
    storage: str  # checkpoints live under STORAGE/checkpoints
    config_hash: str  # what a checkpoint must have been made from to be resumed
    encoder_length: int
    decoder_length: int
    pad_id: int
    num_examples: int
    denoiser_names: List[str]
    cross_attn_warmup_steps: int  # 0: none
    cross_attn_patterns: List[str]
    data_dir: str = ""  # the prepared examples (for the held-out split)
    heldout_examples: int = 0  # score this many held-out examples at every checkpoint
    tracking_uri: Optional[str] = None  # None: no MLflow
    mlflow_run_id: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)  # set in each worker before anything imports


@dataclass
class WorkerContext:
    """What the loop gets from its runtime (Ray Train, or a test harness)."""
    rank: int
    world_size: int
    device: torch.device
    micro_batches: Callable[[int], Iterator[dict]]  # position -> endless micro-batches from there
    report: Callable[[dict], None]  # metrics to the runtime (all ranks call it together)


def train(ctx: WorkerContext, spec: RunSpec) -> dict:
    """Train until spec.train.max_steps; returns the final metrics (every rank returns them)."""
    from jobs.train.tracker import RankZeroTracker

    cfg = spec.train
    model = load_model(spec.init_dir, cfg)
    groups = param_groups(model, spec.cross_attn_patterns, cfg.weight_decay)
    warmup = spec.cross_attn_warmup_steps
    flops = flops_per_example(model, spec.encoder_length, spec.decoder_length)
    # Counted before DeepSpeed replaces each group's params with this rank's flat partition.
    counts = {phase: count_parameters(groups, step, warmup) for phase, step in (("warmup", 0), ("full", warmup))}
    engine, optimizer = build_engine(model, groups, cfg, ctx.world_size)
    state = resume(engine, spec, ctx.rank)
    peak = device_peak_flops(cfg.peak_tflops_per_device, ctx.device)
    tracker = RankZeroTracker(spec, ctx, peak, flops) if ctx.rank == 0 else None
    if tracker:
        tracker.started(state, counts["warmup"] if state["step"] < warmup else counts["full"])

    batches = ctx.micro_batches(state["micro_batches"])
    engine.train()
    window = Window(len(spec.denoiser_names))
    batch = None
    while state["step"] < cfg.max_steps:
        step = state["step"]
        started = time.perf_counter()
        lr = set_learning_rate(optimizer, step, cfg, warmup)
        # Any randomness in the step (dropout, if a model has it) is a function of (seed, step, rank),
        # so a resumed run draws what the uninterrupted one drew.
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + ctx.rank)
        skipped = False
        for _ in range(cfg.grad_accum_steps):
            waited = time.perf_counter()
            batch = {k: v.to(ctx.device) for k, v in next(batches).items()}
            window.data_wait_s += time.perf_counter() - waited
            loss, by_denoiser = forward_loss(engine, batch, len(spec.denoiser_names))
            finite = all_ranks_finite(loss)
            if not finite and cfg.on_nonfinite_loss == "stop":
                # Returned, not raised: Ray would retry an exception from the last checkpoint, and
                # this would only happen again. Every rank sees the same flag and stops here.
                return stop(ctx, spec, state, f"loss is not finite at step {step + 1} (micro-batch "
                            f"{state['micro_batches'] + 1}): lower train.lr, check the data and the initial "
                            "checkpoint, or set train.on_nonfinite_loss=skip")
            # A non-finite loss under "skip" still goes backward: its gradients are not finite, and
            # DeepSpeed's ZeRO optimizer discards any step whose gradient norm is not finite.
            engine.backward(loss)
            if finite:
                window.add(loss.detach(), by_denoiser, batch)
            else:
                skipped = True
            engine.step()
            state["micro_batches"] += 1
        state["step"] = step + 1
        state["skipped_steps"] += int(skipped)
        window.step_s += time.perf_counter() - started
        window.steps += 1
        if step + 1 == warmup and tracker:
            tracker.phase_change(step + 1, counts["full"])
        metrics = maybe_log(tracker, window, state, engine, lr, ctx, cfg)
        maybe_checkpoint(engine, spec, state, batch, ctx, metrics, tracker)
    if tracker:
        tracker.finished(state)
    return dict(state)


def build_engine(model: torch.nn.Module, groups: list, cfg: TrainConfig, world_size: int):
    """(DeepSpeed engine, its optimizer) for `model`: torch's AdamW over `groups`, the generated config."""
    import deepspeed

    from jobs.train.deepspeed_config import build_deepspeed_config

    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=build_deepspeed_config(cfg))
    if cfg.zero_stage == 0 and world_size == 1:
        # One data-parallel rank has nothing to all-reduce, but DeepSpeed would still flatten every
        # gradient into a bucket, "reduce" it and copy it back after each backward: ~+20% step time
        # on the 270M-270M on CPU (bench/train_overhead.py, "bare DeepSpeed, ZeRO-0"). The
        # gradients are already the right ones.
        engine.enable_backward_allreduce = False
    return engine, optimizer


def stop(ctx: WorkerContext, spec: RunSpec, state: dict, reason: str) -> dict:
    """End the run on every rank without a retry; rank 0 leaves the reason for the driver."""
    from jobs.core import storage

    if ctx.rank == 0:
        storage.write_text(storage.join(spec.storage, STOPPED), reason)
    ctx.report({"step": state["step"]})
    return dict(state, stopped=reason)


def load_model(init_dir: str, cfg: TrainConfig) -> torch.nn.Module:
    """The adapted checkpoint as a transformers module, in fp32 (DeepSpeed casts for bf16)."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.core import storage

    model = AutoModelForSeq2SeqLM.from_pretrained(storage.local_copy(init_dir), dtype=torch.float32)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def forward_loss(engine, batch: dict, num_denoisers: int):
    """Mean token cross-entropy over decoder targets (padding ignored), and per-denoiser
    [sum of token losses, token count] (float64, detached) for logging."""
    token_loss, mask = token_losses(engine, batch)
    labels = batch["labels"]
    loss = token_loss.sum() / mask.sum().clamp(min=1)
    with torch.no_grad():
        by_denoiser = torch.zeros(num_denoisers, 2, dtype=torch.float64, device=labels.device)
        by_denoiser[:, 0].index_add_(0, batch["denoiser"], token_loss.detach().sum(1).double())
        by_denoiser[:, 1].index_add_(0, batch["denoiser"], mask.sum(1).double())
    return loss, by_denoiser


def all_ranks_finite(loss: torch.Tensor) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([float(torch.isfinite(loss.detach()).item())], device=loss.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Window:
    """Sums since the last log line, reduced across ranks when logged."""

    def __init__(self, num_denoisers: int):
        self.num_denoisers = num_denoisers
        self.reset()

    def reset(self):
        self.loss_sum, self.micro, self.steps, self.step_s, self.data_wait_s, self.tokens = 0.0, 0, 0, 0.0, 0.0, 0
        self.examples = 0
        self.by_denoiser = torch.zeros(self.num_denoisers, 2, dtype=torch.float64)

    def add(self, loss, by_denoiser, batch):
        self.loss_sum += float(loss)
        self.micro += 1
        self.by_denoiser += by_denoiser.cpu()
        self.tokens += int(batch["attention_mask"].sum() + batch["decoder_attention_mask"].sum())
        self.examples += batch["input_ids"].shape[0]


def maybe_log(tracker, window: Window, state: dict, engine, lr: float, ctx: WorkerContext, cfg: TrainConfig) -> dict:
    """Every train.log_every_steps steps (and the last): reduce the window across ranks; rank 0 logs."""
    import torch.distributed as dist

    step = state["step"]
    if step % cfg.log_every_steps and step != cfg.max_steps:
        return {}
    sums = torch.tensor([window.loss_sum, window.micro, window.tokens, window.examples, window.data_wait_s,
                         window.step_s], dtype=torch.float64)
    packed = torch.cat([sums, window.by_denoiser.flatten()]).to(ctx.device)
    dist.all_reduce(packed)
    packed = packed.cpu()
    loss_sum, micro, tokens, examples, wait_s, step_s = packed[:6].tolist()
    by_denoiser = packed[6:].view(-1, 2)
    grad_norm = engine.get_global_grad_norm()
    step_s /= ctx.world_size  # every rank timed the same steps
    metrics = {"loss": loss_sum / max(micro, 1), "lr": lr, "step_time_s": step_s / max(window.steps, 1),
               "tokens_per_s": tokens / max(step_s, 1e-9), "examples_per_s": examples / max(step_s, 1e-9),
               "data_wait_fraction": wait_s / ctx.world_size / max(step_s, 1e-9),
               "skipped_steps": state["skipped_steps"]}
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if tracker:
        metrics.update(tracker.log(step, metrics, by_denoiser))
    window.reset()
    return metrics


def maybe_checkpoint(engine, spec: RunSpec, state: dict, batch: dict, ctx: WorkerContext, metrics: dict,
                     tracker) -> None:
    """Every train.checkpoint_every_steps steps and at the end; the final one carries a probe."""
    cfg = spec.train
    step = state["step"]
    final = step == cfg.max_steps
    if step % cfg.checkpoint_every_steps and not final:
        return
    if spec.heldout_examples:
        metrics = dict(metrics, heldout_loss=heldout_loss(engine, spec, ctx))
        if tracker:
            tracker.evaluated(step, metrics["heldout_loss"])
    probe = probe_logits(engine, batch) if final else None
    uri = checkpoints.save(engine, spec.storage, step, dict(state), spec.config_hash, cfg.keep_checkpoints,
                           probe=probe if ctx.rank == 0 else None)
    if tracker:
        tracker.checkpointed(step, uri)
    ctx.report({**metrics, "step": step, "checkpoint": uri})


def heldout_loss(engine, spec: RunSpec, ctx: WorkerContext) -> float:
    """Mean token cross-entropy of the first spec.heldout_examples held-out examples, as the evaluate
    stage computes it (jobs/evaluate/heldout.py, the same examples first). Rank r scores examples
    r, r + world, ...; every rank runs the same number of forwards (ZeRO-3 gathers parameters in
    each), a rank short of examples repeating one with weight 0."""
    import torch.distributed as dist

    from jobs.core.examples_io import make_collate, read_heldout_examples

    _, rows = read_heldout_examples(spec.data_dir, limit=spec.heldout_examples)
    count, size = len(rows["input_ids"]), spec.train.micro_batch_size
    mine = list(range(ctx.rank, count, ctx.world_size))
    forwards = -(-(-(-count // ctx.world_size)) // size)  # ceil(ceil(count / world) / size)
    collate = make_collate(spec.encoder_length, spec.decoder_length, spec.pad_id)
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [loss sum, target tokens]
    engine.eval()
    with torch.no_grad():
        for start in range(0, forwards * size, size):
            chosen = mine[start:start + size]
            weights = [1.0] * len(chosen) + [0.0] * (size - len(chosen))
            chosen = chosen + [mine[0] if mine else 0] * (size - len(chosen))
            batch = {k: v.to(ctx.device) for k, v in collate({c: v[chosen] for c, v in rows.items()}).items()}
            token_loss, mask = token_losses(engine, batch)
            weight = torch.tensor(weights, dtype=torch.float64, device=ctx.device)[:, None]
            sums += torch.stack([(token_loss.double() * weight).sum(), (mask.double() * weight).sum()])
    engine.train()
    dist.all_reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


def probe_logits(engine, batch: dict) -> dict:
    """The engine's logits on `batch` (eval mode), for export to check it reproduces the trained model.
    Every rank runs it: under ZeRO-3 the forward gathers parameters collectively."""
    engine.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
    with torch.no_grad():
        logits = engine(**inputs).logits.float().cpu()
    engine.train()
    return {"inputs": {k: v.cpu() for k, v in inputs.items()}, "logits": logits, "bf16": engine.bfloat16_enabled()}


def resume(engine, spec: RunSpec, rank: int) -> dict:
    """Load the newest intact checkpoint into the engine; returns the trainer state to go on from."""
    import json
    import shutil

    import torch.distributed as dist

    world = dist.get_world_size()
    listed = [checkpoints.committed_steps(spec.storage) if rank == 0 else None]
    dist.broadcast_object_list(listed, src=0)  # one listing, so every rank walks the same steps

    def check_together(candidate: int):
        """Each rank hashes its share of the files, so no rank waits on one that hashes them all."""
        problems = [None] * world
        dist.all_gather_object(problems, checkpoints.damage(spec.storage, candidate, (rank, world)))
        return next((p for p in problems if p), None)

    step = checkpoints.newest_intact(spec.storage, listed[0], check_together)
    if step is None:
        return {"step": 0, "micro_batches": 0, "skipped_steps": 0, "resumed_from": None}
    local = checkpoints.fetch(spec.storage, step)
    try:
        loaded, _ = engine.load_checkpoint(local, tag=checkpoints.DS_TAG)
        if loaded is None:  # DeepSpeed returns instead of raising when its model file is missing
            raise RuntimeError(f"DeepSpeed found no model state in {local}/{checkpoints.DS_TAG}")
        with open(f"{local}/{checkpoints.STATE}") as f:
            state = json.load(f)
    finally:
        if local != checkpoints.step_dir(spec.storage, step):
            shutil.rmtree(local, ignore_errors=True)
    state["resumed_from"] = step
    log.info("rank %d resumed from checkpoint step %d (data position %d)", rank, step, state["micro_batches"])
    return state
