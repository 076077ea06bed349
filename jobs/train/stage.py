"""The train stage on the driver: checks, Ray Train's TorchTrainer, the final model.

  1. checks: the data's tokenizer fits the model; checkpoints already in storage were made from
     this stage key (else refuse, or start over with force).
  2. Ray Train: TorchTrainer over loop.train, each rank streaming its own Ray Data dataset;
     FailureConfig restarts a dead worker group, which resumes from the newest intact checkpoint.
  3. the final checkpoint consolidated into a Hugging Face directory, STORAGE/model.
Inputs and outputs are explicit locations; the controller (orchestrator/controller.py) decides them
and owns the MLflow runs: this job logs its metrics into the stage run it is handed.
"""

import contextlib
import json
import logging
import os
import threading
import time
from typing import Optional

from jobs.core import storage
from jobs.core.commits import COMMIT_MARKER
from jobs.core.errors import RunFailed, UserError
from jobs.train import checkpoints
from jobs.core.examples_io import denoiser_names, read_metadata
from jobs.train.config import TrainConfig
from jobs.train.loop import STOPPED, RunSpec

log = logging.getLogger("t5adapt.train")
MODEL = "model"  # STORAGE/model: the final checkpoint as a Hugging Face directory
# Environment a worker needs from the driver's (never credentials: Ray records the loop config).
_FORWARDED_ENV = ("T5ADAPT_CACHE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE",
                  "TRANSFORMERS_OFFLINE", "HF_HOME")


def cpus_needed(cfg: TrainConfig) -> float:
    """Ray CPUs training takes: its workers (each reads its own data in a thread; see batches.py)."""
    return cfg.num_workers * cfg.cpus_per_worker


def start_ray(cfg: TrainConfig) -> None:
    import ray

    from jobs.core.ray_runtime import ensure_ray, reserve_local_cpus

    reserve_local_cpus(int(cpus_needed(cfg) + 0.999))  # counts only if this starts the embedded cluster
    ensure_ray()
    available = ray.cluster_resources().get("CPU", 0)
    if available < cpus_needed(cfg):
        raise UserError(f"the Ray cluster has {available:g} CPUs; training needs train.num_workers x "
                        f"train.cpus_per_worker = {cfg.num_workers} x {cfg.cpus_per_worker:g}: "
                        "lower those, or add nodes")


def run_train(cfg: TrainConfig, data_dir: str, init_dir: str, storage_root: str, key: str,
              tracking_uri: Optional[str] = None, mlflow_run_id: Optional[str] = None, force: bool = False,
              callbacks: Optional[list] = None, teacher_source: str = "", teacher_dir: str = "") -> dict:
    """Train the adapted model in `init_dir` on the examples in `data_dir`, with checkpoints under
    `storage_root` (a directory or an s3:// prefix) and the final model at STORAGE/model. `key` is the
    stage key every checkpoint records; a re-run resumes from the newest intact checkpoint of that
    key. Metrics go to the MLflow run `mlflow_run_id` when given; `callbacks` are Ray Train callbacks
    (a sweep passes Tune's TuneReportCallback: every checkpoint report is a Tune result). With
    train.distill: the online teacher is the source `teacher_source`; a precomputed one is the teacher
    stage's output `teacher_dir`. Returns a summary (final step, model location, probe difference,
    tokens seen)."""
    advise(cfg)
    metadata = read_metadata(data_dir)
    check_teacher(cfg, metadata, teacher_source, teacher_dir)
    adapt_info = json.loads(storage.read_text(storage.join(init_dir, "t5adapt_adapt.json")))
    check_compatible(metadata, data_dir, init_dir)
    check_readable(data_dir, metadata)
    if cfg.heldout_examples and not (metadata.get("heldout") or {}).get("examples"):
        raise UserError(f"train.heldout_examples={cfg.heldout_examples} but {data_dir} has no held-out examples: "
                        "raise data.heldout_fraction, or set train.heldout_examples=0")
    if not storage.is_s3(storage_root):
        os.makedirs(storage_root, exist_ok=True)
    with training_lock(storage_root):
        check_previous_checkpoints(storage_root, key, force)
        check_world_size(storage_root, cfg, force)
        start_ray(cfg)
        spec = _spec(cfg, data_dir, init_dir, storage_root, metadata, adapt_info, key, tracking_uri, mlflow_run_id,
                     teacher_source, teacher_dir)
        if mlflow_run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).log_param(mlflow_run_id, "resolved.cross_attn_warmup_steps",
                                                 spec.cross_attn_warmup_steps)
        # The driver reads a checkpoint once: export downloads (for s3://) and verifies the final one.
        # The workers verify what they resume from, so a damaged final checkpoint is trained again.
        for attempt in range(2):
            committed = checkpoints.committed_steps(storage_root)
            if not committed or committed[0] < cfg.max_steps:
                _fit(cfg, data_dir, storage_root, spec, metadata, key, callbacks or [])
                committed = checkpoints.committed_steps(storage_root)
            final = committed[0] if committed else None
            if final is None or final < cfg.max_steps:
                raise RunFailed(f"training ended without a committed checkpoint of step {cfg.max_steps} in "
                                f"{checkpoints.folder(storage_root)} (newest: {final}); re-run to resume")
            from jobs.train.export import export

            model = storage.join(storage_root, MODEL)
            print(f"train: consolidating checkpoint step {final} into {model}", flush=True)
            try:
                info = export(storage_root, final, init_dir, model, key)
                break
            except checkpoints.DamagedCheckpoint as e:
                if attempt:
                    raise RunFailed(f"training ended with a damaged final checkpoint ({e}); re-run to resume") from None
                log.warning("%s: training again from the newest intact checkpoint before it", e)
                storage.delete_file(storage.join(checkpoints.step_dir(storage_root, final), COMMIT_MARKER))
    tokens = final * cfg.global_batch * (metadata["encoder_length"] + metadata["decoder_length"])
    return {"step": final, "model": model, "probe_max_abs_diff": info.get("probe_max_abs_diff"),
            "storage": storage_root, "tokens_seen_padded": tokens}


def check_teacher(cfg: TrainConfig, metadata: dict, teacher_source: str, teacher_dir: str) -> None:
    """Distillation needs S examples in the data and its teacher: the source (online), or a
    committed teacher output of this data with train.distill.top_k (precomputed)."""
    if not cfg.distill.enabled:
        return
    from jobs.core.commits import is_committed
    from jobs.core.teacher_io import TEACHER_INFO, TeacherLayout

    TeacherLayout.of(metadata)
    if cfg.distill.teacher == "online":
        if not teacher_source:
            raise UserError("train.distill.teacher=online needs the source model (adapt.source) as the teacher")
        return
    if not teacher_dir or not is_committed(teacher_dir):
        raise UserError(f"train.distill.teacher=precomputed needs the teacher stage's output, and {teacher_dir or '(none)'} "
                        "holds none: run `t5adapt run` (it builds the teacher stage first), or set "
                        "train.distill.teacher=online")
    info = json.loads(storage.read_text(storage.join(teacher_dir, TEACHER_INFO)))
    if info.get("top_k") != cfg.distill.top_k or info.get("data_key") != metadata.get("config_hash"):
        raise UserError(f"{teacher_dir} stores the top-{info.get('top_k')} of data {info.get('data_key')}, but training "
                        f"asks for top-{cfg.distill.top_k} of data {metadata.get('config_hash')}: run the teacher "
                        "stage again for this config (t5adapt run does)")


@contextlib.contextmanager
def training_lock(storage_root: str):
    """Hold STORAGE/checkpoints.lock while training: a second driver on the same storage is refused
    (two would write the same checkpoints), naming who holds it."""
    from jobs.core.locks import StageLock, describe_holder

    lock = StageLock(checkpoints.folder(storage_root), info="training")
    holder = lock.try_acquire()
    if holder is not None:
        raise UserError(f"{checkpoints.folder(storage_root)} is being trained by {describe_holder(holder)}: wait "
                        "for it to finish, or stop it (a dead holder's lock is taken over when its lease ends)")
    try:
        yield
        lock.check()
    finally:
        lock.release()


def check_world_size(storage_root: str, cfg: TrainConfig, force: bool) -> None:
    """Resuming needs the world size the checkpoints were saved with: DeepSpeed's ZeRO partitions and
    each rank's rows and data position belong to it. force: delete checkpoints of another one."""
    for step in checkpoints.committed_steps(storage_root):
        try:
            saved = checkpoints.read_manifest(storage_root, step).get("world_size")
        except Exception:  # a damaged manifest: resume skips that checkpoint
            continue
        if saved is not None and saved != cfg.num_workers and force:
            log.warning("--force: deleting the checkpoints of %d workers in %s", saved, checkpoints.folder(storage_root))
            storage.delete_tree(checkpoints.folder(storage_root))
        elif saved is not None and saved != cfg.num_workers:
            raise UserError(f"the checkpoints in {checkpoints.folder(storage_root)} were saved by {saved} workers "
                            f"(step {step}); train.num_workers={cfg.num_workers} cannot resume them: set "
                            f"train.num_workers={saved}, or pass --force to delete them and start over")
        return


def advise(cfg) -> None:
    """Warn about settings that run but cost time for nothing."""
    if cfg.num_workers == 1 and cfg.zero_stage > 0 and not (cfg.offload_optimizer or cfg.offload_params):
        log.warning("train.zero_stage=%d with one worker partitions nothing, and DeepSpeed's ZeRO buffers add "
                    "copies to every step (ZeRO-2: +55-70%% step time on the 270M-270M on CPU, bench/train_overhead.py): "
                    "set train.zero_stage=0, or keep ZeRO for train.offload_optimizer", cfg.zero_stage)


def check_compatible(metadata: dict, data_dir: str, init_dir: str) -> None:
    """The data must speak the model's vocabulary, with the sentinels the model was exported with."""
    config = read_model_config(init_dir)
    decoder = getattr(config.decoder, "text_config", None) or config.decoder
    if metadata["vocab_size"] > decoder.vocab_size:
        raise UserError(f"{data_dir} was tokenized with {metadata['tokenizer']} ({metadata['vocab_size']} tokens), "
                        f"more than the model in {init_dir} has ({decoder.vocab_size}): prepare the data with "
                        "the model's tokenizer (data.tokenizer, default adapt.source)")
    tokenizer_config = storage.join(init_dir, "tokenizer_config.json")
    recorded = json.loads(storage.read_text(tokenizer_config)).get("t5adapt_denoising") if storage.exists(tokenizer_config) else None
    if recorded and recorded.get("sentinel_ids") and recorded["sentinel_ids"] != metadata["sentinel_ids"]:
        raise UserError(f"{data_dir} uses sentinel ids {metadata['sentinel_ids'][:4]}..., but {init_dir} "
                        f"was exported with {recorded['sentinel_ids'][:4]}...: prepare and adapt from the same "
                        "tokenizer (data.tokenizer, adapt.source)")


def read_model_config(model_dir: str):
    """The transformers config of a checkpoint directory (local or s3://), reading only config.json."""
    import tempfile

    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="t5adapt-config-") as scratch:
        with open(os.path.join(scratch, "config.json"), "w") as f:
            f.write(storage.read_text(storage.join(model_dir, "config.json")))
        return AutoConfig.from_pretrained(scratch)


def check_readable(data_dir: str, metadata: dict) -> None:
    """Every prepared Parquet file opens (its footer reads): a truncated or damaged file is named here,
    not deep inside a Ray Data worker after the training workers have started."""
    import pyarrow.parquet as pq

    filesystem, root = storage.arrow_filesystem(data_dir)
    for entry in metadata["files"]:
        path = f"{root}/{entry['name']}"
        try:
            pq.ParquetFile(filesystem.open_input_file(path) if filesystem else path).metadata
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"prepared file {storage.join(data_dir, entry['name'])} cannot be read ({e}): the "
                            "prepared data is damaged; delete that prepare output and run again to rebuild it") from None


def check_previous_checkpoints(storage_root: str, config_hash: str, force: bool) -> None:
    made_from = None
    for step in checkpoints.committed_steps(storage_root):
        try:
            made_from = checkpoints.read_manifest(storage_root, step).get("config_hash")
            break
        except Exception:  # a damaged manifest: resume will skip that checkpoint, so look further back
            continue
    if made_from is None:
        return
    if made_from == config_hash:
        log.info("resuming from the checkpoints in %s", checkpoints.folder(storage_root))
        return
    if not force:
        raise UserError(f"{checkpoints.folder(storage_root)} holds checkpoints of another training config "
                        f"(train key {made_from}, this one is {config_hash}): train into another storage (the controller "
                        "puts each train key in its own STORE/train-<key>), or pass --force to delete them and "
                        "start over")
    log.warning("--force: deleting the checkpoints of another config in %s", checkpoints.folder(storage_root))
    storage.delete_tree(checkpoints.folder(storage_root))
    storage.delete_tree(storage.join(storage_root, "export"))


def _spec(cfg: TrainConfig, data_dir: str, init_dir: str, storage_root: str, metadata: dict, adapt_info: dict,
          key: str, tracking_uri: Optional[str], mlflow_run_id: Optional[str], teacher_source: str = "",
          teacher_dir: str = "") -> RunSpec:
    warmup = adapt_info["cross_attn_warmup"]
    warmup_steps = 0
    if warmup["required"]:
        warmup_steps = cfg.cross_attn_warmup_steps if cfg.cross_attn_warmup_steps is not None else warmup["steps"]
        if warmup_steps >= cfg.max_steps:
            log.warning("the cross-attention warm-up (%d steps) covers the whole run (train.max_steps=%d): "
                        "only cross-attention will train", warmup_steps, cfg.max_steps)
    patterns = list(warmup["trainable_patterns"])
    if cfg.encoder_warmup_steps:
        # The warm-up phase widens to the encoder: it and the cross-attention train, the decoder waits.
        from jobs.train.schedule import ENCODER_PATTERNS

        warmup_steps = max(warmup_steps, cfg.encoder_warmup_steps)
        patterns += list(ENCODER_PATTERNS)
    return RunSpec(train=cfg, init_dir=init_dir, storage=storage_root, config_hash=key, data_dir=data_dir,
                   heldout_examples=cfg.heldout_examples,
                   encoder_length=metadata["encoder_length"], decoder_length=metadata["decoder_length"],
                   pad_id=metadata["pad_id"], num_examples=metadata["num_examples"],
                   denoiser_names=denoiser_names(metadata),
                   cross_attn_warmup_steps=warmup_steps, cross_attn_patterns=patterns,
                   tracking_uri=tracking_uri if mlflow_run_id else None, mlflow_run_id=mlflow_run_id,
                   teacher_source=teacher_source if cfg.distill.enabled else "",
                   teacher_dir=teacher_dir if cfg.distill.enabled and cfg.distill.teacher == "precomputed" else "",
                   env={k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})


def _fit(cfg: TrainConfig, data_dir: str, storage_root: str, spec: RunSpec, metadata: dict, key: str,
         callbacks: list) -> None:
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train.batches import batches_per_epoch
    from jobs.train.worker import train_loop_per_worker
    batches_per_epoch(metadata["num_examples"], cfg.num_workers, cfg.micro_batch_size, data_dir)  # fail early
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    # Ray keeps its run state under STORAGE/ray; the checkpoints themselves are ours (checkpoints.py),
    # because resuming must verify them and fall back past a damaged one, which Ray's cannot.
    filesystem, ray_storage = storage.arrow_filesystem(storage.join(storage_root, "ray"))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        # Named by the stage key, never a timestamp: a re-run finds the same Ray Train run.
        run_config=RunConfig(name=f"train-{key}", storage_path=ray_storage, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures), callbacks=callbacks))
    stopped = storage.join(storage_root, STOPPED)
    storage.delete_file(stopped)
    started = time.time()
    try:
        with progress_bar(spec, cfg.max_steps):
            trainer.fit()
    except SystemExit as e:
        # Ray Train turns Ctrl-C into a graceful abort of the run, then exits the process from its
        # signal handler: say what it was, so the controller reports an interruption, not code 1.
        raise KeyboardInterrupt(f"training interrupted (Ray Train aborted the run, exit {e.code})") from None
    except ray.train.TrainingFailedError as e:
        raise RunFailed(f"training failed after {cfg.max_failures} restart(s): {_root_cause(e)} "
                        f"(checkpoints so far: {checkpoints.folder(storage_root)}; re-run to resume)") from e
    if storage.exists(stopped):
        raise RunFailed(f"training stopped: {storage.read_text(stopped)}")
    log.info("training finished in %.0f s", time.time() - started)


@contextlib.contextmanager
def progress_bar(spec: RunSpec, total_steps: int):
    """A progress bar on the driver, fed from the MLflow run rank 0 logs to (worker output does not
    reach the driver): step, loss, tokens/s. Nothing without tracking."""
    if not spec.mlflow_run_id:
        yield
        return
    from mlflow.tracking import MlflowClient
    from jobs.core.progress import progress

    client, done = MlflowClient(tracking_uri=spec.tracking_uri), threading.Event()

    def follow():
        with progress(total=total_steps, desc="train", unit="step") as bar:
            while not done.wait(2.0):
                try:
                    data = client.get_run(spec.mlflow_run_id).data
                except Exception:  # a busy store: try again on the next tick
                    continue
                # The tag is where the current attempt is (a restart from an older checkpoint goes
                # back); the metrics' history also holds earlier attempts.
                step = data.tags.get("t5adapt.step")
                if step is None:
                    continue
                if "loss" in data.metrics:
                    # The postfix rides on the next refresh, which update() paces (a line every few
                    # seconds when output is not a terminal), instead of forcing one every tick.
                    bar.set_postfix(loss=f"{data.metrics['loss']:.3f}",
                                    tokens_per_s=f"{data.metrics.get('tokens_per_s', 0):.0f}", refresh=False)
                if int(step) < bar.n:
                    bar.reset(total=total_steps)
                bar.update(int(step) - bar.n)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def export_checkpoint(storage_root: str, init_dir: str, step: Optional[int], out: str) -> dict:
    """Export checkpoint `step` (default: the newest intact one) of a training storage to `out`."""
    from jobs.train.export import export

    steps = checkpoints.committed_steps(storage_root)
    if step is None:
        step = checkpoints.newest_intact(storage_root)
        if step is None:
            raise UserError(f"{checkpoints.folder(storage_root)} holds no intact checkpoint: train first")
    elif step not in steps:
        raise UserError(f"no committed checkpoint for step {step} in {checkpoints.folder(storage_root)} "
                        f"(committed: {', '.join(map(str, steps)) or 'none'})")
    config_hash = checkpoints.read_manifest(storage_root, step)["config_hash"]
    info = export(storage_root, step, init_dir, out, config_hash)
    return dict(info, out=out)
