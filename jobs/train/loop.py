"""The training loop: one function, top to bottom. Ray Train's per-worker function (worker.py) only
builds the WorkerContext it reads from.

Per optimizer step: set the lr (schedule + cross-attention warm-up), take the step's micro-batches
and count their target tokens on every rank, then for each micro-batch: forward, backward (the loss
normalised by that count); before the boundary's step, check the loss is finite on every rank (the
step's only host sync). Then maybe_log, maybe_checkpoint. Sums for logging stay on the device
until a log step. Everything a resumed run needs (step, data position)
comes from the checkpoint, never from the config.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from jobs.train import checkpoints
from jobs.core.examples_io import IGNORE, seq2seq_logits, target_losses, token_losses
from jobs.train.config import TrainConfig
from jobs.train.metrics import FlopsModel, device_peak_flops
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
    teacher_source: str = ""  # train.distill.teacher=online: the source model spec the teacher loads
    teacher_dir: str = ""  # train.distill.teacher=precomputed: the teacher stage's output
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
    flops = FlopsModel(model)
    # Counted before DeepSpeed replaces each group's params with this rank's flat partition.
    counts = {phase: count_parameters(groups, step, warmup) for phase, step in (("warmup", 0), ("full", warmup))}
    engine, optimizer = build_engine(model, groups, cfg, ctx.world_size)
    state = resume(engine, spec, ctx.rank)
    if state.get("stopped"):
        return stop(ctx, spec, state, state["stopped"])
    peak = device_peak_flops(cfg.peak_tflops_per_device, ctx.device, cfg.bf16)
    padded_flops = float(flops(spec.encoder_length, spec.decoder_length))
    tracker = RankZeroTracker(spec, ctx, peak, padded_flops) if ctx.rank == 0 else None
    if tracker:
        tracker.started(state, counts["warmup"] if state["step"] < warmup else counts["full"])
        tracker.tag({"t5adapt.attn_implementation": getattr(model.config, "_attn_implementation", "unknown")})

    batches = ctx.micro_batches(state["micro_batches"])
    engine.train()
    window = Window(len(spec.denoiser_names), ctx.device)
    distill = Distillation.start(cfg, spec.teacher_source, ctx.device, window)
    batch = None
    try:
        while state["step"] < cfg.max_steps:
            step = state["step"]
            started = time.perf_counter()
            lr = set_learning_rate(optimizer, step, cfg, warmup)
            # Any randomness in the step (dropout, if a model has it) is a function of (seed, step, rank),
            # so a resumed run draws what the uninterrupted one drew.
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + ctx.rank)
            waited = time.perf_counter()
            micro = [{k: v.to(ctx.device, non_blocking=True) for k, v in next(batches).items()}
                     for _ in range(cfg.grad_accum_steps)]
            window.data_wait_s += time.perf_counter() - waited
            # DeepSpeed averages gradients over accumulation steps and ranks; scaling each micro-batch's
            # loss sum by (ranks * accumulation steps / the step's target tokens on all ranks) turns that
            # mean into the token mean of the whole optimizer step, however the batch is split.
            normaliser = global_targets(micro, ctx.world_size) / (ctx.world_size * cfg.grad_accum_steps)
            step_sums = torch.zeros(len(spec.denoiser_names), 2, dtype=torch.float64, device=ctx.device)
            for index, batch in enumerate(micro):
                loss, by_denoiser = forward_loss(engine, batch, len(spec.denoiser_names), normaliser,
                                                 cfg.loss_chunk_tokens, distill)
                # A non-finite loss still goes backward: under "skip" its gradients are not finite, and
                # DeepSpeed's ZeRO optimizer discards any step whose gradient norm is not finite.
                engine.backward(loss)
                step_sums += by_denoiser
                window.add_batch(batch, flops)
                if index == len(micro) - 1:  # before the boundary's engine.step() updates the weights
                    finite = all_ranks_finite(step_sums[:, 0].sum())  # the step's one host sync
                    if not finite and cfg.on_nonfinite_loss == "stop":
                        # Returned, not raised: Ray would retry an exception from the last checkpoint,
                        # and this would only happen again. Every rank sees the same flag and stops here.
                        return stop(ctx, spec, state, f"loss is not finite at step {step + 1}: lower train.lr, "
                                    "check the data and the initial checkpoint, or set "
                                    "train.on_nonfinite_loss=skip")
                    window.grad_norm = clip_gradients(engine, cfg)
                engine.step()
                state["micro_batches"] += 1
            state["step"] = step + 1
            state["skipped_steps"] += int(not finite)
            if finite:
                window.by_denoiser += step_sums
            window.step_s += time.perf_counter() - started
            window.steps += 1
            if step + 1 == warmup and tracker:
                tracker.phase_change(step + 1, counts["full"])
            metrics = maybe_log(tracker, window, state, engine, lr, ctx, cfg)
            maybe_checkpoint(engine, spec, state, batch, ctx, metrics, tracker)
        if tracker:
            tracker.finished(state)
    finally:
        if hasattr(batches, "close"):  # a generator: stops and joins its reading thread
            batches.close()
        if tracker:
            tracker.close()
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
    """The adapted checkpoint as a transformers module, in fp32 (DeepSpeed casts for bf16). Under
    ZeRO-3 it is built partitioned (jobs/train/partitioned.py): each rank holds only its share of
    every parameter, and the parameters' tensors are placeholders until DeepSpeed gathers them.
    Needs the process group to be up under ZeRO-3."""
    from jobs.core import storage
    from jobs.core.pretrained import load_seq2seq
    from jobs.train.partitioned import partitioned_build

    local = storage.local_copy(init_dir)
    with partitioned_build(cfg):
        try:
            # torch's fused attention kernels (flash / memory-efficient on GPU) where the model allows it.
            model = load_seq2seq(local, attn_implementation="sdpa")
        except (ValueError, NotImplementedError) as e:  # a model without an SDPA path
            log.info("attention: eager (%s)", e)
            model = load_seq2seq(local, attn_implementation="eager")
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def forward_loss(engine, batch: dict, num_denoisers: int, normaliser: Optional[torch.Tensor] = None,
                 chunk_tokens: int = 0, distill: Optional["Distillation"] = None):
    """(loss, by_denoiser): the sum of the decoder targets' cross-entropies (padding ignored) divided
    by `normaliser` (default: this batch's target count, i.e. the token mean), and per-denoiser
    [sum of token losses, token count] (float64, detached, on the batch's device) for logging.
    chunk_tokens > 0: the logits of at most that many targets exist at once (chunked_loss.py).
    distill: targets with a teacher (the batch's teacher_* keys) count (1 - weight) * cross-entropy
    + weight * the distillation loss (distill.py); its sums go to distill.sums for logging."""
    if chunk_tokens:
        from jobs.train.chunked_loss import chunked_token_losses

        token_loss, mask = chunked_token_losses(engine, batch, chunk_tokens)
        logits = None
    else:
        logits = seq2seq_logits(engine, batch)
        token_loss, mask = target_losses(logits, batch["labels"])
    labels = batch["labels"]
    if normaliser is None:
        normaliser = mask.sum().clamp(min=1)
    total = token_loss.sum()
    if distill is not None and logits is not None and batch["teacher_rows"].numel():  # a shape: no host sync
        total = distill.loss_sum(logits, token_loss, batch)
    loss = total / normaliser
    with torch.no_grad():
        by_denoiser = torch.zeros(num_denoisers, 2, dtype=torch.float64, device=labels.device)
        by_denoiser[:, 0].index_add_(0, batch["denoiser"], token_loss.detach().sum(1).double())
        by_denoiser[:, 1].index_add_(0, batch["denoiser"], mask.sum(1).double())
    return loss, by_denoiser


@dataclass
class Distillation:
    """Distillation in the loop: the config, the online teacher (None: log-probs come with the
    batch, precomputed), and [distillation loss sum, targets with a teacher] since the last log."""
    cfg: "object"  # DistillConfig
    teacher: Optional[torch.nn.Module]
    sums: torch.Tensor

    @staticmethod
    def start(cfg: TrainConfig, teacher_source: str, device: torch.device, window: "Window") -> Optional["Distillation"]:
        if not cfg.distill.enabled:
            return None
        from jobs.train.distill import load_teacher

        teacher = load_teacher(teacher_source, device, cfg.bf16) if cfg.distill.teacher == "online" else None
        return Distillation(cfg.distill, teacher, window.distill)

    def loss_sum(self, logits: torch.Tensor, token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """(1 - weight) * CE + weight * KD summed over targets with a teacher, plus CE elsewhere."""
        from jobs.core.teacher_io import teacher_topk
        from jobs.train.distill import kd_token_losses

        soft = teacher_topk(self.teacher, batch, self.cfg.top_k) if self.teacher is not None else batch
        kd = kd_token_losses(logits, soft, self.cfg.temperature)
        covered = torch.zeros_like(token_loss)
        covered[batch["teacher_rows"]] = batch["teacher_mask"].to(token_loss.dtype)
        weight = self.cfg.weight
        with torch.no_grad():
            self.sums += torch.stack([kd.detach().sum().double(), batch["teacher_mask"].sum().double()])
        return (token_loss * (1 - weight * covered)).sum() + weight * kd.sum()


def global_targets(micro: List[dict], world_size: int) -> torch.Tensor:
    """Decoder target tokens of one optimizer step on every rank (float64 scalar on the device, at
    least 1); one all-reduce, no host sync."""
    import torch.distributed as dist

    count = sum((batch["labels"] != IGNORE).sum() for batch in micro).double()
    if world_size > 1:
        dist.all_reduce(count)
    return count.clamp(min=1)


def all_ranks_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank (one all-reduce and one host sync)."""
    import torch.distributed as dist

    flag = torch.isfinite(value.detach()).to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def clip_gradients(engine, cfg: TrainConfig) -> Optional[torch.Tensor]:
    """Where the loop clips (ZeRO-0 in fp32, see deepspeed_config.loop_clips): clip the reduced
    gradients to train.grad_clip and return their global norm (a device tensor, not synced).
    Elsewhere DeepSpeed clips and records the norm itself: None."""
    from jobs.train.deepspeed_config import loop_clips

    if not loop_clips(cfg):
        return None
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class Window:
    """Sums since the last log line, on the device until logged (no host sync per step)."""

    def __init__(self, num_denoisers: int, device: torch.device):
        self.num_denoisers, self.device = num_denoisers, device
        # [distillation loss sum, targets with a teacher]; zeroed in place, Distillation adds to it.
        self.distill = torch.zeros(2, dtype=torch.float64, device=device)
        self.reset()

    def reset(self):
        self.steps, self.step_s, self.data_wait_s, self.examples = 0, 0.0, 0.0, 0
        self.by_denoiser = torch.zeros(self.num_denoisers, 2, dtype=torch.float64, device=self.device)
        self.real = torch.zeros(2, dtype=torch.float64, device=self.device)  # [real tokens, FLOPs at real lengths]
        self.distill.zero_()
        self.grad_norm = None

    def add_batch(self, batch: dict, flops: FlopsModel):
        encoder, decoder = batch["attention_mask"].sum(1).double(), batch["decoder_attention_mask"].sum(1).double()
        self.real += torch.stack([(encoder + decoder).sum(), flops(encoder, decoder).sum()])
        self.examples += batch["input_ids"].shape[0]


def maybe_log(tracker, window: Window, state: dict, engine, lr: float, ctx: WorkerContext, cfg: TrainConfig) -> dict:
    """Every train.log_every_steps steps (and the last): reduce the window across ranks; rank 0 logs."""
    import torch.distributed as dist

    step = state["step"]
    if step % cfg.log_every_steps and step != cfg.max_steps:
        return {}
    host = torch.tensor([window.examples, window.data_wait_s, window.step_s], dtype=torch.float64, device=ctx.device)
    packed = torch.cat([host, window.real, window.distill, window.by_denoiser.flatten()])
    dist.all_reduce(packed)
    packed = packed.cpu()  # the one sync of a log step
    examples, wait_s, step_s, real_tokens, real_flops, distill_sum, distill_targets = packed[:7].tolist()
    by_denoiser = packed[7:].view(-1, 2)
    step_s /= ctx.world_size  # every rank timed the same steps
    loss_sum, targets = by_denoiser.sum(0).tolist()
    metrics = {"loss": loss_sum / targets if targets else float("nan"), "lr": lr,
               "step_time_s": step_s / max(window.steps, 1), "tokens_per_s": real_tokens / max(step_s, 1e-9),
               "examples_per_s": examples / max(step_s, 1e-9),
               "model_tflops_per_s_real": real_flops / max(step_s, 1e-9) / 1e12,
               "data_wait_fraction": wait_s / ctx.world_size / max(step_s, 1e-9),
               "skipped_steps": state["skipped_steps"]}
    if cfg.distill.enabled:
        metrics["distill_loss"] = distill_sum / distill_targets if distill_targets else float("nan")
    grad_norm = window.grad_norm if window.grad_norm is not None else engine.get_global_grad_norm()
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


PROBE_DECODER_POSITIONS = 16


def probe_logits(engine, batch: dict) -> dict:
    """The engine's logits (eval mode) on the first example of `batch`, its decoder inputs cut to
    PROBE_DECODER_POSITIONS, for export to check it reproduces the trained model. Small at any
    scale: the whole micro-batch's fp32 logits would be 64 GiB at 256 examples of 256 targets.
    Every rank runs it: under ZeRO-3 the forward gathers parameters collectively."""
    engine.eval()
    positions = {"decoder_input_ids": PROBE_DECODER_POSITIONS, "decoder_attention_mask": PROBE_DECODER_POSITIONS}
    inputs = {k: batch[k][:1, :positions.get(k)]
              for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
    with torch.no_grad():
        logits = engine(**inputs).logits.float().cpu()
    engine.train()
    return {"inputs": {k: v.cpu() for k, v in inputs.items()}, "logits": logits, "bf16": engine.bfloat16_enabled()}


def resume(engine, spec: RunSpec, rank: int) -> dict:
    """Load the newest checkpoint that every rank finds intact and loadable into the engine; returns
    the trainer state to go on from (step 0 when none is left)."""
    import shutil

    import torch.distributed as dist

    world = dist.get_world_size()
    listed = [checkpoints.committed_steps(spec.storage) if rank == 0 else None]
    dist.broadcast_object_list(listed, src=0)  # one listing, so every rank walks the same steps
    fresh = {"step": 0, "micro_batches": 0, "skipped_steps": 0, "resumed_from": None}
    loads_failed = []

    def agreed(problem: Optional[str]) -> Optional[str]:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)

    for index, step in enumerate(listed[0]):
        local, problem = checkpoints.fetch_for_resume(spec.storage, step, rank, world)
        try:
            problem = agreed(problem)
            if problem is None:
                # A file can match its checksum and still not load (written by another DeepSpeed, a
                # different model): that is as unusable as a damaged one.
                state = _load(engine, local)
                problem = agreed(None if isinstance(state, dict) else state)
                if problem:
                    loads_failed.append(step)
        finally:
            if local != checkpoints.step_dir(spec.storage, step):
                shutil.rmtree(local, ignore_errors=True)
        if problem is None:
            state["resumed_from"] = step
            log.info("rank %d resumed from checkpoint step %d (data position %d)", rank, step, state["micro_batches"])
            return state
        if rank == 0:
            checkpoints.warn_skipped(spec.storage, step, problem, has_previous=index + 1 < len(listed[0]))
    if loads_failed:
        # A failed load may have overwritten part of the engine's weights: step 0 from here would
        # not be the initial model.
        return dict(fresh, stopped=f"no checkpoint in {checkpoints.folder(spec.storage)} could be used (steps "
                    f"{', '.join(map(str, loads_failed))} did not load): delete that folder, or run again with "
                    "--force, to start from step 0")
    if listed[0] and rank == 0:
        log.warning("starting from step 0: none of the checkpoints in %s could be used",
                    checkpoints.folder(spec.storage))
    return fresh


def _load(engine, local: str):
    """The trainer state of the checkpoint in `local` after loading it into the engine, or a
    string saying why it could not be loaded."""
    import json

    try:
        loaded, _ = engine.load_checkpoint(local, tag=checkpoints.DS_TAG)
        if loaded is None:  # DeepSpeed returns instead of raising when its model file is missing
            return f"DeepSpeed found no model state in {local}/{checkpoints.DS_TAG}"
        with open(f"{local}/{checkpoints.STATE}") as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001 - any failure to load means: use an older checkpoint
        return f"it does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
