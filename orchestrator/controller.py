"""One adaptation run: prepare -> adapt -> train -> evaluate -> export, as content-addressed stages.

Each stage has a key (orchestrator/keys.py) and an output at STORE/<stage>-<key>, written as a
commit (marker last). A committed output is reused, by this run or any other whose stage key is
equal; an output being built holds a lock with a heartbeat lease (jobs/core/locks.py), so a second
controller that needs it waits and then reuses it. The run directory ROOT/NAME holds the resolved
config and a ledger (orchestrator/ledger.py). MLflow: one parent run per run key, found again on a
re-run, with a nested run per stage that was built (a reused stage is not logged again).

Killing the controller loses at most the stage being built (training: the steps since its last
checkpoint); running the same command again resumes there.
"""

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from jobs.core import locks, storage, tracking
from jobs.core.commits import COMMIT_MARKER, is_committed
from jobs.core.errors import UserError
from orchestrator import keys
from orchestrator.keys import STAGES, Stage
from orchestrator.ledger import Ledger

log = logging.getLogger("t5adapt")


@dataclass
class Run:
    job: object  # JobConfig
    root: str
    stages: Dict[str, Stage]
    denoising: dict
    ledger: Ledger
    run_key: str
    parent_run_id: Optional[str] = None
    results: Dict[str, dict] = field(default_factory=dict)  # stage -> what its job returned (or read back)
    say: Callable[[str], None] = print
    mlflow_parent: Optional[str] = None  # a sweep's MLflow run: this run's parent run nests under it
    tags: Dict[str, str] = field(default_factory=dict)  # extra tags of the parent run (a sweep trial's)
    train_callbacks: list = field(default_factory=list)  # Ray Train callbacks (a sweep's TuneReportCallback)

    @property
    def tracking_uri(self) -> Optional[str]:
        return tracking.tracking_uri(self.job.tracking, self.root) if self.job.tracking.enabled else None


def run(job, root: str, wanted=STAGES, outputs: Optional[Dict[str, str]] = None, force: bool = False,
        say: Callable[[str], None] = print, mlflow_parent: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
        train_callbacks: Optional[list] = None) -> Run:
    """Run these of `job`'s stages, in pipeline order (`t5adapt run`: all; `train`: up to train;
    `adapt`: adapt alone). `outputs` places a stage's output somewhere else than the store (`--out`);
    force replaces what is there if it was made from another key. A sweep trial passes the sweep's
    MLflow run (`mlflow_parent`), tags for its own parent run, and Ray Train callbacks that pass
    training metrics up to Ray Tune. Returns the Run (stages, results)."""
    from orchestrator.config import to_yaml

    wanted = [name for name in STAGES if name in wanted or name == "teacher" and "train" in wanted]
    preflight(job, root, wanted, outputs)
    say(f"run {job.name}: resolving stage keys")
    denoising = keys.denoising_plan(job)
    stages = keys.plan_stages(job, root, denoising, outputs)
    wanted = [name for name in wanted if name in stages]  # the teacher stage only with a precomputed teacher
    run_key = keys.run_key(job, stages)
    say_train_changes(job, os.path.join(root, job.name), stages["train"], say)
    ledger = Ledger.open(os.path.join(root, job.name), to_yaml(job), run_key, stages)
    ledger.set(pairing=pairing(job))
    current = Run(job, root, stages, denoising, ledger, run_key, say=say, mlflow_parent=mlflow_parent,
                  tags=dict(tags or {}), train_callbacks=list(train_callbacks or []))
    current.parent_run_id = _parent_run(current)
    status = "FAILED"
    try:
        for name in wanted:
            if name == "evaluate" and not job.evaluate.enabled:
                ledger.mark(name, state="skipped")
                continue
            _run_stage(current, name, force and name in (outputs or {}))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_parent(current, status)
    return current


def say_train_changes(job, run_dir: str, train: Stage, say: Callable[[str], None]) -> None:
    """When this run trained before under another train key, say which keys differ and what it
    means: a new output from step 0, the old one kept (and reused if the keys go back)."""
    from orchestrator import ledger as ledger_module

    try:
        before = ledger_module.read(run_dir)["stages"]["train"]
        old_yaml = open(os.path.join(run_dir, ledger_module.CONFIG)).read()
    except (OSError, KeyError, ValueError):
        return  # a new run
    if before.get("key") in (None, train.key) or before.get("state") == "pending" and not before.get("step"):
        return
    changed = keys.changed_train_fields(old_yaml, job)
    what = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items())) or \
        "its inputs (the prepare or adapt stage) changed"
    say(f"run {job.name}: the train stage's key changed ({what}). Training starts from step 0 in "
        f"{train.output}; the previous output stays in {before.get('output')} and is reused if you set those "
        "keys back.")
    if "train.max_steps" in changed and job.train.schedule == "cosine":
        say("  train.max_steps sets the cosine schedule's length, so the learning rate of every step changes with "
            "it: a longer run cannot continue the shorter one's checkpoints, and trains from step 0.")


def preflight(job, root: str, wanted, outputs: Optional[Dict[str, str]] = None) -> None:
    """Everything that can be checked before any work starts: the root and the store are writable
    directories, no output points at a file, the tracking store answers, training fits the cluster."""
    _check_writable_dir(root, "--root (or $T5ADAPT_ROOT)")
    store = keys.store_of(job, root)
    if not storage.is_s3(store):
        _check_writable_dir(store, "store")
        if os.environ.get("RAY_ADDRESS"):  # a cluster (the embedded one has a single node)
            from jobs.core.ray_runtime import check_shared_storage, ensure_ray

            ensure_ray()
            check_shared_storage(store, "store")
    placed = {f"--out of {name}": out for name, out in (outputs or {}).items()}
    for what, out in dict(placed, **{"export.out": job.export.out}).items():
        check_output_location(out, what)
    tracking.check_store(job.tracking, root)
    if "train" in wanted:
        _check_train_fits(job.train)


def check_output_location(out: Optional[str], what: str) -> None:
    """An output location must be a directory (or s3:// prefix), never an existing file."""
    if out and not storage.is_s3(out) and os.path.isfile(out):
        raise UserError(f"{what} {out} is a file: give a directory (or an s3:// prefix)")


def _check_writable_dir(path: str, what: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a directory: point it at a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror}): choose a directory you can write to") from None


def _check_train_fits(cfg) -> None:
    """On the embedded cluster, training gets this machine's CPUs; asking for more would start
    workers that never run a step."""
    from jobs.train.stage import cpus_needed

    if os.environ.get("RAY_ADDRESS"):
        return  # a real cluster: jobs/train/stage.start_ray checks its resources
    from jobs.core.ray_runtime import machine_cpus, reserve_local_cpus

    machine = machine_cpus()
    workers = cfg.num_workers * cfg.cpus_per_worker
    if workers > machine:
        raise UserError(f"train.num_workers x train.cpus_per_worker = {cfg.num_workers} x {cfg.cpus_per_worker:g} "
                        f"= {workers:g} CPUs, but this machine has {machine}: lower train.num_workers or "
                        "train.cpus_per_worker, or run on a cluster (RAY_ADDRESS)")
    reserve_local_cpus(int(cpus_needed(cfg) + 0.999))


def _run_stage(current: Run, name: str, force: bool) -> None:
    stage = current.stages[name]
    ledger, say = current.ledger, current.say
    if _finished(current, name) and not force:
        current.results[name] = _read_back(current, name)
        ledger.mark(name, state="reused", **_headline(name, current.results[name]))
        say(f"{name}: reusing {stage.output}")
        return
    describe = f"stage {name} (key {stage.key})"
    with locks.hold(stage.output, describe, is_done=lambda: _finished(current, name) and not force,
                    say=say, info=f"run {current.job.name}") as build:
        if not build:
            current.results[name] = _read_back(current, name)
            ledger.mark(name, state="reused", **_headline(name, current.results[name]))
            say(f"{name}: reusing {stage.output} (built by another run meanwhile)")
            return
        started = time.time()
        ledger.mark(name, state="running", started=started, ended=None, error=None)
        say(f"{name}: building {stage.output}")
        run_id = _stage_run(current, name)
        ledger.mark(name, mlflow_run_id=run_id)
        try:
            result = BUILDERS[name](current, stage, run_id, force)
        except KeyboardInterrupt:
            ledger.mark(name, state="interrupted", ended=time.time())
            _close_stage_run(current, run_id, "KILLED", error="interrupted (Ctrl-C); re-run the same command to resume")
            raise
        except BaseException as e:
            ledger.mark(name, state="failed", ended=time.time(), error=_first_line(e))
            _close_stage_run(current, run_id, "FAILED", error=_first_line(e))
            raise
        current.results[name] = result
        ended = time.time()
        ledger.mark(name, state="done", ended=ended, **_headline(name, result))
        _close_stage_run(current, run_id, "FINISHED", **_stage_record(name, result))
        say(f"{name}: done in {ended - started:.0f} s")


def _headline(name: str, result: dict) -> dict:
    """The numbers `t5adapt ls` shows, kept in the ledger."""
    if name == "evaluate" and isinstance(result.get("heldout"), dict):
        return {"heldout_loss": result["heldout"].get("loss")}
    if name == "train":
        return {"step": result.get("step")}
    return {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- the stages: each calls one job with its config slice and explicit locations ---------------------

def _prepare(current: Run, stage: Stage, run_id, force) -> dict:
    from jobs.data.stage import run_prepare

    return run_prepare(current.job.data, keys.tokenizer_spec(current.job), stage.output, stage.key, force=force)


def _adapt(current: Run, stage: Stage, run_id, force) -> dict:
    from jobs.adapt.stage import STAGE_INFO, run_adapt

    run_adapt(current.job.adapt, stage.output, stage.key, current.denoising, force=force)
    return _read_json(stage.output, STAGE_INFO)


def _teacher(current: Run, stage: Stage, run_id, force) -> dict:
    from jobs.teacher.stage import run_teacher

    return run_teacher(current.job.train.distill, current.job.adapt.source, current.stages["prepare"].output,
                       stage.output, stage.key, force=force)


def _train(current: Run, stage: Stage, run_id, force) -> dict:
    from jobs.train.stage import run_train

    teacher = current.stages.get("teacher")
    result = run_train(current.job.train, current.stages["prepare"].output, current.stages["adapt"].output,
                       stage.output, stage.key, tracking_uri=current.tracking_uri, mlflow_run_id=run_id,
                       callbacks=current.train_callbacks, teacher_source=current.job.adapt.source,
                       teacher_dir=teacher.output if teacher else "")
    _write_json(stage.output, "t5adapt_stage.json", dict(result, config_hash=stage.key))
    locks.check_before_commit(stage.output)
    storage.write_text(storage.join(stage.output, COMMIT_MARKER), "")  # the output builds in place: marker last
    return result


def _evaluate(current: Run, stage: Stage, run_id, force) -> dict:
    from jobs.evaluate.stage import run_evaluate
    from jobs.train.stage import MODEL

    model = storage.join(current.stages["train"].output, MODEL)
    return run_evaluate(current.job.evaluate, model, current.job.adapt.source, current.stages["prepare"].output,
                        stage.output, stage.key, force=force)


def _export(current: Run, stage: Stage, run_id, force) -> dict:
    from jobs.export.stage import copy_export, run_export
    from jobs.train.stage import MODEL

    job = current.job
    train = current.results.get("train") or _read_back(current, "train")
    evaluation_md = None
    evaluate_out = current.stages["evaluate"].output
    if job.evaluate.enabled and storage.exists(storage.join(evaluate_out, "evaluation.md")):
        evaluation_md = storage.read_text(storage.join(evaluate_out, "evaluation.md"))
    metadata = current.results.get("prepare") or _read_back(current, "prepare")
    card = {"title": f"{job.name}: {pairing(job)}", "sources": sorted({job.adapt.source, job.adapt.decoder_source or job.adapt.source}),
            "pairing": pairing(job), "objective": _objective(metadata), "steps": train.get("step"),
            "tokens_seen": train.get("tokens_seen_padded"), "run": job.name,
            "stage_keys": {n: s.key for n, s in current.stages.items()}}
    info = run_export(storage.join(current.stages["train"].output, MODEL), stage.output, stage.key, card, evaluation_md,
                      force=force)
    if job.export.out:
        current.say(f"export: copying to {job.export.out}")
        copy_export(stage.output, job.export.out)
    return info


BUILDERS = {"prepare": _prepare, "adapt": _adapt, "teacher": _teacher, "train": _train, "evaluate": _evaluate,
            "export": _export}
_INFO_FILES = {"prepare": "metadata.json", "adapt": "t5adapt_adapt.json", "teacher": "teacher.json",
               "train": "t5adapt_stage.json",
               "evaluate": "evaluation.json", "export": "t5adapt_export.json"}


def _finished(current: Run, name: str) -> bool:
    """A committed output that records this stage's key. (Under the store, the path carries the key;
    an output placed elsewhere with --out may hold another config's work: its job then refuses it.)"""
    stage = current.stages[name]
    return is_committed(stage.output) and _read_back(current, name).get("config_hash") == stage.key


def _read_back(current: Run, name: str) -> dict:
    """What a committed stage recorded about itself (for a reused stage)."""
    output = current.stages[name].output
    return _read_json(output, _INFO_FILES[name]) if storage.exists(storage.join(output, _INFO_FILES[name])) else {}


def _read_json(base: str, name: str) -> dict:
    return json.loads(storage.read_text(storage.join(base, name)))


def _write_json(base: str, name: str, value: dict) -> None:
    storage.write_text(storage.join(base, name), json.dumps(value, indent=1, default=str))


def pairing(job) -> str:
    """A short name for the encoder/decoder pairing, e.g. builtin:gemma3-270m[all] / builtin:gemma3-270m[first:9]."""
    adapt = job.adapt
    return f"{adapt.source}[{adapt.encoder_layers}] / {adapt.decoder_source or adapt.source}[{adapt.decoder_layers}]"


def _objective(metadata: dict) -> str:
    names = [d.get("name") for d in metadata.get("denoisers", [])]
    return f"{metadata.get('objective', '?')} ({', '.join(names)})" if names else metadata.get("objective", "?")


# -- MLflow: one parent run per run key, a nested run per built stage ----------------------------------

def _parent_run(current: Run) -> Optional[str]:
    job = current.job
    if not job.tracking.enabled:
        return None
    from omegaconf import OmegaConf

    cfg, root = job.tracking, current.root
    found = tracking.find_run(cfg, root, {"t5adapt.run_key": current.run_key})
    if found:
        client = tracking.client(cfg, root)
        client.update_run(found, status="RUNNING")
        if current.mlflow_parent:  # a sweep re-run under a new sweep run: the trial moves under it
            client.set_tag(found, "mlflow.parentRunId", current.mlflow_parent)
        current.ledger.set(mlflow_run_id=found)
        return found
    tags = {**current.tags, "t5adapt.run_key": current.run_key, "t5adapt.run": job.name, "t5adapt.pairing": pairing(job),
            "t5adapt.source": job.adapt.source, "t5adapt.decoder_source": job.adapt.decoder_source or job.adapt.source,
            "t5adapt.git_commit": _git_commit(), "t5adapt.version": _version(),
            **{f"t5adapt.stage_key.{n}": s.key for n, s in current.stages.items()}}
    params = tracking.flatten("", OmegaConf.to_container(OmegaConf.structured(job)))
    run_id = tracking.start_run(cfg, root, job.name, tags, parent_id=current.mlflow_parent, params=params)
    current.ledger.set(mlflow_run_id=run_id)
    return run_id


def _close_parent(current: Run, status: str) -> None:
    if not current.parent_run_id:
        return
    artifacts = [os.path.join(current.ledger.run_dir, "config.yaml")]
    metrics = {}
    evaluation = current.results.get("evaluate")
    if evaluation:
        metrics = evaluation_metrics(evaluation)
        evaluate_out = current.stages["evaluate"].output
        artifacts += [_local_file(evaluate_out, "evaluation.json"), _local_file(evaluate_out, "evaluation.md")]
    if current.results.get("export"):
        artifacts.append(_local_file(current.stages["export"].output, "README.md"))
    tags = {"t5adapt.export": current.stages["export"].output} if "export" in current.results else {}
    try:
        tracking.finish_run(current.job.tracking, current.root, current.parent_run_id, status, metrics, tags,
                            [a for a in artifacts if a])
    except Exception as e:  # tracking trouble must not hide the run's own outcome
        log.warning("could not close the MLflow parent run %s: %s", current.parent_run_id, e)


def _local_file(base: str, name: str) -> Optional[str]:
    """A local path for a stage file (an s3:// one is fetched into the cache), or None."""
    path = storage.join(base, name)
    if not storage.exists(path):
        return None
    if not storage.is_s3(path):
        return path
    local = os.path.join(storage.cache_dir(), "artifacts", base.replace("/", "_"), name)
    storage.download_file(path, local)
    return local


def _stage_run(current: Run, name: str) -> Optional[str]:
    """The stage's nested MLflow run. Training reopens the run of its earlier attempts (recorded in its
    output), so a resumed training continues one metric history."""
    job, stage = current.job, current.stages[name]
    if not job.tracking.enabled:
        return None
    cfg, root = job.tracking, current.root
    record = storage.join(stage.output, "mlflow_run.json")
    if name == "train" and storage.exists(record):
        previous = _read_json(stage.output, "mlflow_run.json")
        if previous.get("tracking_uri") == current.tracking_uri:
            try:
                client = tracking.client(cfg, root)
                client.update_run(previous["run_id"], status="RUNNING")
                if "t5adapt.error" in client.get_run(previous["run_id"]).data.tags:
                    client.delete_tag(previous["run_id"], "t5adapt.error")  # the earlier attempt's
                return previous["run_id"]
            except Exception:  # deleted from the store: make a new one
                pass
    from dataclasses import asdict

    slice_name = {"prepare": "data"}.get(name, name)
    params = tracking.flatten(slice_name, asdict(getattr(job, slice_name))) if hasattr(job, slice_name) else {}
    if name == "teacher":
        params = dict(tracking.flatten("train.distill", asdict(job.train.distill)), **{"adapt.source": job.adapt.source})
    tags = {"t5adapt.stage": name, "t5adapt.stage_key": stage.key, "t5adapt.output": stage.output,
            "t5adapt.parent_run_key": current.run_key, **{f"t5adapt.input.{k}": v for k, v in stage.inputs.items()}}
    run_id = tracking.start_run(cfg, root, f"{job.name}/{name}", tags, parent_id=current.parent_run_id, params=params)
    if name == "train":
        if not storage.is_s3(stage.output):
            os.makedirs(stage.output, exist_ok=True)
        _write_json(stage.output, "mlflow_run.json", {"run_id": run_id, "tracking_uri": current.tracking_uri})
    return run_id


def _stage_record(name: str, result: dict) -> dict:
    """Metrics, tags and artifacts a finished stage leaves in its MLflow run."""
    if name == "prepare":
        from jobs.data.stage import tracking_record

        _, metrics = tracking_record(result)
        return {"metrics": metrics}
    if name == "teacher":
        from jobs.teacher.stage import tracking_record as teacher_record

        return {"metrics": teacher_record(result)}
    if name == "train":
        return {"metrics": {"final_step": result["step"]}, "tags": {"t5adapt.model": result["model"]}}
    if name == "evaluate":
        return {"metrics": evaluation_metrics(result)}
    return {}


def _close_stage_run(current: Run, run_id: Optional[str], status: str, metrics=None, tags=None, error: str = "") -> None:
    if not run_id:
        return
    tags = dict(tags or {}, **({"t5adapt.error": error} if error else {}))
    try:
        tracking.finish_run(current.job.tracking, current.root, run_id, status, metrics, tags)
    except Exception as e:  # tracking trouble must not hide the stage's own outcome
        log.warning("could not close the MLflow run %s: %s", run_id, e)


def evaluation_metrics(evaluation: dict) -> Dict[str, float]:
    """Flat numeric metrics of an evaluation.json (nested keys joined with '.')."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", {k: v for k, v in evaluation.items() if k in ("heldout", "probe", "cost")})
    return flat


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("t5adapt")
    except PackageNotFoundError:
        return "unknown"
