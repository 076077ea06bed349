"""The train stage on the driver: inputs, MLflow run, Ray Train's TorchTrainer, export.

  1. inputs: the prepared data and the adapted checkpoint; default locations that hold nothing
     committed are produced first (prepare, then adapt), explicit ones must exist.
  2. checks: the data's tokenizer fits the model; checkpoints already in storage were made from
     this config (else refuse, or start over with --force).
  3. MLflow: one run per training job, reopened when the same command runs again.
  4. Ray Train: TorchTrainer over loop.train, each rank streaming its own Ray Data dataset;
     FailureConfig restarts a dead worker group, which resumes from the newest intact checkpoint.
  5. export: the final checkpoint as a Hugging Face directory (STORAGE/export).
"""

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, replace
from typing import Optional

from jobs.train import checkpoints
from jobs.train.batches import ingest_options, rank_datasets, read_metadata
from jobs.train.loop import STOPPED, RunSpec
from orchestrator import storage
from orchestrator.commits import config_digest, is_committed
from orchestrator.errors import RunFailed, UserError

log = logging.getLogger("t5adapt.train")
RUN_FILE = "mlflow_run.json"
# Fields that do not change what the model learns: checkpoints from a run that differs only in
# these are resumed (more failures allowed, another cadence, another storage). max_steps joins them
# under a constant schedule (a run can be extended); a cosine's every step depends on it.
_NOT_HASHED = ("max_steps", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "max_failures",
               "data", "init", "storage", "peak_tflops_per_device", "cpus_per_worker")
# Environment a worker needs from the driver's (never credentials: Ray records the loop config).
_FORWARDED_ENV = ("T5ADAPT_CACHE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE",
                  "TRANSFORMERS_OFFLINE", "HF_HOME")


def locations(job, root: str) -> dict:
    """Absolute locations of the inputs and the storage: Ray Train runs workers in another directory."""
    run_dir = os.path.join(root, job.name)
    cfg = job.train
    where = {"data": cfg.data or os.path.join(run_dir, "data"), "init": cfg.init or os.path.join(run_dir, "adapted"),
             "storage": cfg.storage or os.path.join(run_dir, "train")}
    return {k: v if storage.is_s3(v) else os.path.abspath(v) for k, v in where.items()}


def start_ray(cfg) -> None:
    """Join or start Ray with room for the training workers plus one CPU for Ray Data's readers
    (without it the readers wait forever behind the workers that wait for their data)."""
    import ray

    from orchestrator.ray_runtime import ensure_ray

    needed = cfg.num_workers * cfg.cpus_per_worker + 1
    ensure_ray(min_cpus=int(needed + 0.999))
    available = ray.cluster_resources().get("CPU", 0)
    if available < needed:
        raise UserError(f"the Ray cluster has {available:g} CPUs; training needs train.num_workers x "
                        f"train.cpus_per_worker = {cfg.num_workers} x {cfg.cpus_per_worker:g} plus 1 for data loading: "
                        "lower those, or add nodes")


def run_train(job, root: str, force: bool = False) -> dict:
    """Train `job` (a JobConfig) under `root`; returns a summary (final step, export path, MLflow run)."""
    where = locations(job, root)
    check_explicit_inputs(job, where)
    advise(job.train)
    start_ray(job.train)
    ensure_inputs(job, root, where)
    metadata = read_metadata(where["data"])
    adapt_info = json.loads(storage.read_text(storage.join(where["init"], "t5adapt_adapt.json")))
    check_compatible(metadata, where)
    trajectory = {k: v for k, v in asdict(job.train).items()
                  if k not in _NOT_HASHED or (k == "max_steps" and job.train.schedule == "cosine")}
    config_hash = config_digest(adapt_info["config_hash"], metadata["config_hash"], json.dumps(trajectory, sort_keys=True))
    check_previous_checkpoints(where["storage"], config_hash, force)
    if not storage.is_s3(where["storage"]):
        os.makedirs(where["storage"], exist_ok=True)
    spec = _spec(job, root, where, metadata, adapt_info, config_hash)
    run_id = open_mlflow_run(job, root, where, spec)
    spec = replace(spec, mlflow_run_id=run_id)
    try:
        # Verifying a checkpoint re-reads (for s3://, downloads) every file, so it happens once: here
        # only if the run looks finished already (the workers verify what they resume from), then
        # after training; export trusts that verification.
        committed = checkpoints.committed_steps(where["storage"])
        final = checkpoints.newest_intact(where["storage"]) if committed and committed[0] >= job.train.max_steps else None
        if final is None or final < job.train.max_steps:
            _fit(job, where, spec, metadata)
            final = checkpoints.newest_intact(where["storage"])
        if final is None or final < job.train.max_steps:
            raise RunFailed(f"training ended without an intact checkpoint of step {job.train.max_steps} in "
                            f"{checkpoints.folder(where['storage'])} (newest intact: {final}); re-run to resume")
        from jobs.train.export import export

        print(f"train: exporting checkpoint step {final} to {storage.join(where['storage'], 'export')}", flush=True)
        info = export(where["storage"], final, where["init"], storage.join(where["storage"], "export"), config_hash,
                      verified=True)
    except BaseException as e:
        close_mlflow_run(spec, "FAILED", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    close_mlflow_run(spec, "FINISHED", export=storage.join(where["storage"], "export"), step=final)
    return {"step": final, "export": storage.join(where["storage"], "export"), "mlflow_run_id": run_id,
            "probe_max_abs_diff": info.get("probe_max_abs_diff"), "storage": where["storage"]}


_PRODUCERS = (("data", "prepare"), ("init", "adapt"))


def advise(cfg) -> None:
    """Warn about settings that run but cost time for nothing."""
    if cfg.num_workers == 1 and cfg.zero_stage > 0 and not (cfg.offload_optimizer or cfg.offload_params):
        log.warning("train.zero_stage=%d with one worker partitions nothing, and DeepSpeed's ZeRO buffers add "
                    "copies to every step (ZeRO-2: +55-70%% step time on the 270M-270M on CPU, bench/train_overhead.py): "
                    "set train.zero_stage=0, or keep ZeRO for train.offload_optimizer", cfg.zero_stage)


def check_explicit_inputs(job, where: dict) -> None:
    """An input the config names must already be finished work (default ones are produced)."""
    for key, stage in _PRODUCERS:
        if getattr(job.train, key) is not None and not is_committed(where[key]):
            raise UserError(f"train.{key}={where[key]} holds no finished {stage} output (no COMMITTED marker): "
                            f"run `t5adapt {stage}` with --out {where[key]}, or drop train.{key} to build it in the run directory")


def ensure_inputs(job, root: str, where: dict) -> None:
    """Produce missing default inputs: prepare, then adapt."""
    for key, stage in _PRODUCERS:
        if is_committed(where[key]):
            continue
        print(f"train: {where[key]} is missing; running {stage} first", flush=True)
        if stage == "prepare":
            from jobs.data.stage import log_to_mlflow, run_prepare

            metadata = run_prepare(job.data, job.data.tokenizer or job.adapt.source, where[key])
            if job.tracking.enabled:
                log_to_mlflow(job.tracking, root, job.name, metadata, where[key])
        else:
            from jobs.adapt.stage import run_adapt

            run_adapt(job.adapt, where[key], data_cfg=job.data)


def check_compatible(metadata: dict, where: dict) -> None:
    """The data must speak the model's vocabulary, with the sentinels the model was exported with."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(storage.local_copy(where["init"]))
    decoder = getattr(config.decoder, "text_config", None) or config.decoder
    if metadata["vocab_size"] > decoder.vocab_size:
        raise UserError(f"{where['data']} was tokenized with {metadata['tokenizer']} ({metadata['vocab_size']} tokens), "
                        f"more than the model in {where['init']} has ({decoder.vocab_size}): prepare the data with "
                        "the model's tokenizer (data.tokenizer, default adapt.source)")
    tokenizer_config = storage.join(where["init"], "tokenizer_config.json")
    recorded = json.loads(storage.read_text(tokenizer_config)).get("t5adapt_denoising") if storage.exists(tokenizer_config) else None
    if recorded and recorded.get("sentinel_ids") and recorded["sentinel_ids"] != metadata["sentinel_ids"]:
        raise UserError(f"{where['data']} uses sentinel ids {metadata['sentinel_ids'][:4]}..., but {where['init']} "
                        f"was exported with {recorded['sentinel_ids'][:4]}...: prepare and adapt from the same "
                        "tokenizer (data.tokenizer, adapt.source)")


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
                        f"(hash {made_from}, this one is {config_hash}): use another train.storage, or pass "
                        "--force to delete them and start over")
    log.warning("--force: deleting the checkpoints of another config in %s", checkpoints.folder(storage_root))
    storage.delete_tree(checkpoints.folder(storage_root))
    storage.delete_tree(storage.join(storage_root, "export"))


def _spec(job, root: str, where: dict, metadata: dict, adapt_info: dict, config_hash: str) -> RunSpec:
    from orchestrator.tracking import tracking_uri

    warmup = adapt_info["cross_attn_warmup"]
    warmup_steps = 0
    if warmup["required"]:
        warmup_steps = job.train.cross_attn_warmup_steps if job.train.cross_attn_warmup_steps is not None else warmup["steps"]
        if warmup_steps >= job.train.max_steps:
            log.warning("the cross-attention warm-up (%d steps) covers the whole run (train.max_steps=%d): "
                        "only cross-attention will train", warmup_steps, job.train.max_steps)
    names = [d["name"] + (f"{d['mean_span']:g}_r{d['rate']:g}" if d.get("rate") else "") for d in metadata["denoisers"]]
    return RunSpec(train=job.train, init_dir=where["init"], storage=where["storage"], config_hash=config_hash,
                   encoder_length=metadata["encoder_length"], decoder_length=metadata["decoder_length"],
                   pad_id=metadata["pad_id"], num_examples=metadata["num_examples"], denoiser_names=names,
                   cross_attn_warmup_steps=warmup_steps, cross_attn_patterns=list(warmup["trainable_patterns"]),
                   tracking_uri=tracking_uri(job.tracking, root) if job.tracking.enabled else None,
                   env={k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})


def _fit(job, where: dict, spec: RunSpec, metadata: dict) -> None:
    import ray.train
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train.batches import batches_per_epoch
    from jobs.train.worker import train_loop_per_worker
    cfg = job.train
    batches_per_epoch(metadata["num_examples"], cfg.num_workers, cfg.micro_batch_size, where["data"])  # fail early
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    # Ray keeps its run state under STORAGE/ray; the checkpoints themselves are ours (checkpoints.py),
    # because resuming must verify them and fall back past a damaged one, which Ray's cannot.
    filesystem, ray_storage = storage.arrow_filesystem(storage.join(where["storage"], "ray"))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=job.name, storage_path=ray_storage, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets=rank_datasets(where["data"], metadata, cfg.num_workers),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest_options()))
    stopped = storage.join(where["storage"], STOPPED)
    storage.delete_file(stopped)
    started = time.time()
    try:
        with progress_bar(spec, cfg.max_steps):
            trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RunFailed(f"training failed after {cfg.max_failures} restart(s): {_root_cause(e)} "
                        f"(checkpoints so far: {checkpoints.folder(where['storage'])}; re-run to resume)") from e
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
    from tqdm import tqdm

    client, done = MlflowClient(tracking_uri=spec.tracking_uri), threading.Event()

    def follow():
        with tqdm(total=total_steps, desc="train", unit="step") as bar:
            while not done.wait(2.0):
                try:
                    metrics = client.get_run(spec.mlflow_run_id).data.metrics
                except Exception:  # a busy store: try again on the next tick
                    continue
                if "loss" in metrics:
                    step = max(m.step for m in client.get_metric_history(spec.mlflow_run_id, "loss"))
                    bar.update(max(0, step - bar.n))
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tokens_per_s=f"{metrics.get('tokens_per_s', 0):.0f}")

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


def open_mlflow_run(job, root: str, where: dict, spec: RunSpec) -> Optional[str]:
    """Create the training job's MLflow run, or reopen the one an earlier attempt of it made."""
    if not job.tracking.enabled:
        return None
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import experiment_id, flatten

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    run_file = storage.join(where["storage"], RUN_FILE)
    if storage.exists(run_file):
        previous = json.loads(storage.read_text(run_file))
        if previous.get("config_hash") == spec.config_hash and previous.get("tracking_uri") == spec.tracking_uri:
            try:
                client.update_run(previous["run_id"], status="RUNNING")
                if "t5adapt.error" in client.get_run(previous["run_id"]).data.tags:
                    client.delete_tag(previous["run_id"], "t5adapt.error")  # the earlier attempt's
                log.info("reopened MLflow run %s", previous["run_id"])
                return previous["run_id"]
            except Exception:  # deleted from the store: make a new one
                pass
    tags = {"t5adapt.stage": "train", "t5adapt.config_hash": spec.config_hash, "t5adapt.storage": where["storage"],
            "t5adapt.data": where["data"], "t5adapt.init": where["init"]}
    run = client.create_run(experiment_id(job.tracking, root), run_name=f"{job.name}/train", tags=tags)
    from omegaconf import OmegaConf

    params = flatten("", OmegaConf.to_container(OmegaConf.structured(job)))
    params.update({"resolved.cross_attn_warmup_steps": str(spec.cross_attn_warmup_steps),
                   "resolved.storage": where["storage"], "resolved.data": where["data"], "resolved.init": where["init"]})
    items = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start:start + 90])
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    storage.write_text(run_file, json.dumps({"run_id": run.info.run_id, "config_hash": spec.config_hash,
                                             "tracking_uri": spec.tracking_uri}))
    return run.info.run_id


def close_mlflow_run(spec: RunSpec, status: str, error: str = "", export: str = "", step=None) -> None:
    if not spec.mlflow_run_id:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    tags = {"t5adapt.error": error[:5000]} if error else {"t5adapt.export": export, "t5adapt.final_step": str(step)}
    client.log_batch(spec.mlflow_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(spec.mlflow_run_id, status)


def export_checkpoint(job, root: str, step: Optional[int] = None, out: Optional[str] = None) -> dict:
    """Export checkpoint `step` (default: the newest intact one) of `job`'s training storage."""
    from jobs.train.export import export

    where = locations(job, root)
    steps = checkpoints.committed_steps(where["storage"])
    if step is None:
        step = checkpoints.newest_intact(where["storage"])
        if step is None:
            raise UserError(f"{checkpoints.folder(where['storage'])} holds no intact checkpoint: train first")
    elif step not in steps:
        raise UserError(f"no committed checkpoint for step {step} in {checkpoints.folder(where['storage'])} "
                        f"(committed: {', '.join(map(str, steps)) or 'none'})")
    out = out or storage.join(where["storage"], f"export-step{step}")
    config_hash = checkpoints.read_manifest(where["storage"], step)["config_hash"]
    info = export(where["storage"], step, where["init"], out, config_hash)
    return dict(info, out=out)
