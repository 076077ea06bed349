"""`t5adapt sweep`: many adaptation runs under Ray Tune, and the quality-vs-inference-cost frontier.

Every trial is one controller run (orchestrator/controller.py) of its own job config, inside a Tune
function trainable: stages that trials share (the prepared data, an adapted checkpoint used by
several learning rates) have equal stage keys and are built once. The trainable's training stage
fits a TorchTrainer whose TuneReportCallback passes every checkpoint report (step, heldout_loss) up
to Tune, which is what ASHA compares; the trial's last report carries the evaluation.

Resume: the Tune experiment lives at STORAGE/ID/tune (ID = NAME-KEY, the key covering everything
the trials compute), so running the same command again restores it: finished trials are kept, an
unfinished one runs again and its controller resumes from its committed stages and checkpoints.
A changed sweep config has another key: a new experiment, still reusing every stage it can.

Outputs, in ROOT/sweeps/ID: sweep.yaml, trials.json (kept current while the sweep runs, for
`t5adapt ls --sweep`), frontier.txt / .csv / .png. MLflow: a parent run per sweep, each trial's run
nested under it, the trial's stage runs under the trial.
"""

import functools
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional

from ray.tune import Callback

from jobs.core import storage, tracking
from jobs.core.errors import RunFailed, UserError
from orchestrator import frontier
from orchestrator.sweep_config import (SweepConfig, corner_params, pairings, sweep_key, trial_job, tune_space)

log = logging.getLogger("t5adapt")
TRIALS = "trials.json"
DONE = "trial_done"  # in a trial's last result: it ran every stage
DRIVER_CPU = 0.01  # what a trial's own process (the controller) reserves


def sweep_dir(root: str, sweep_id: str) -> str:
    return os.path.join(os.path.abspath(root), "sweeps", sweep_id)


def run_sweep(sweep: SweepConfig, root: str, say: Callable[[str], None] = print) -> dict:
    """Run (or resume) a sweep; returns {"id", "dir", "trials", "rows", "mlflow_run_id"}."""
    from omegaconf import OmegaConf

    from orchestrator.config import load_config, to_yaml

    root = os.path.abspath(root)
    base = load_config(sweep.run, [])
    key = sweep_key(sweep, to_yaml(base))
    sweep_id = f"{sweep.name}-{key}"
    pairing_list = pairings(sweep)
    jobs = [trial_job(sweep, key, p, params)[1] for p in pairing_list for params in corner_params(sweep)]
    _check_pairings(jobs)
    from orchestrator.controller import preflight

    preflight(jobs[0], root, ("prepare",))  # root, store and tracking store; resources are checked below
    per_trial = _check_resources(sweep, jobs)
    max_steps = max(job.train.max_steps for job in jobs)
    folder = sweep_dir(root, sweep_id)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sweep.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(sweep)))
    count = len(pairing_list) * _grid_size(sweep) * sweep.num_samples
    say(f"sweep {sweep_id}: {count} trial(s), {len(pairing_list)} pairing(s), at most {sweep.max_concurrent_trials} "
        f"at a time, {per_trial:g} CPUs each; scheduler: {sweep.scheduler.type}")
    parent = _sweep_run(sweep, sweep_id, base, root, folder)
    context = {"sweep": sweep, "key": key, "root": root, "sweep_id": sweep_id, "mlflow_run_id": parent,
               "threads": max(1, int(per_trial - 1)), "pairings": {p["label"]: p for p in pairing_list}}
    status = "FAILED"
    try:
        _fit(sweep, sweep_id, root, folder, context, tune_space(sweep, pairing_list), max_steps)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        trials = _load_trials(folder)
        _close_stopped_trials(trials, base, root)
        rows = write_frontier(trials, root, folder, sweep, say if status == "FINISHED" else (lambda _: None))
        if parent:
            _close_sweep_run(base, root, parent, status, folder, rows)
    return {"id": sweep_id, "dir": folder, "trials": trials, "rows": rows, "mlflow_run_id": parent}


def _check_pairings(jobs: list) -> None:
    """Every pairing must be one adapt can build (one family; T5Gemma 2 from one source; layer
    selections the sources have): checked before the first trial, not when its adapt stage runs."""
    from jobs.adapt.stage import check_pairing

    checked, opened = set(), {}
    for job in jobs:
        adapt = (job.adapt.source, job.adapt.decoder_source, job.adapt.encoder_layers, job.adapt.decoder_layers)
        if adapt in checked:
            continue
        checked.add(adapt)
        try:
            check_pairing(job.adapt, opened)
        except UserError as e:
            from orchestrator.controller import pairing

            raise UserError(f"sweep pairing {pairing(job)}: {e}") from None


def _grid_size(sweep: SweepConfig) -> int:
    from orchestrator.sweep_config import flat

    size = 1
    for space in flat(sweep.search).values():
        if isinstance(space, dict) and "grid" in space:
            size *= len(space["grid"])
    return size


def _check_resources(sweep: SweepConfig, jobs: list) -> float:
    """The CPUs (and GPUs) one trial's training takes must fit the cluster, and on the embedded
    cluster max_concurrent_trials of them must fit this machine: else an error before anything runs."""
    from jobs.core.ray_runtime import machine_cpus, reserve_local_cpus
    from jobs.train.stage import cpus_needed

    worst = max(jobs, key=lambda job: cpus_needed(job.train))
    per_trial = cpus_needed(worst.train)
    workers = worst.train.num_workers * worst.train.cpus_per_worker
    if os.environ.get("RAY_ADDRESS"):
        import ray

        from jobs.core.ray_runtime import ensure_ray

        ensure_ray()
        resources = ray.cluster_resources()
        need = {"CPU": per_trial + DRIVER_CPU, **({"GPU": worst.train.num_workers * worst.train.gpus_per_worker}
                                     if worst.train.use_gpu else {})}
        short = {k: v for k, v in need.items() if resources.get(k, 0) < v}
        if short:
            raise UserError(f"one sweep trial needs {_resources(need)} (train.num_workers={worst.train.num_workers} "
                            f"x train.cpus_per_worker={worst.train.cpus_per_worker:g}), but the "
                            f"cluster has {_resources(resources, need)}: lower those, or add nodes")
        return per_trial
    machine = machine_cpus()
    if workers * sweep.max_concurrent_trials > machine:
        raise UserError(f"max_concurrent_trials={sweep.max_concurrent_trials} x (train.num_workers="
                        f"{worst.train.num_workers} x train.cpus_per_worker={worst.train.cpus_per_worker:g}) = "
                        f"{workers * sweep.max_concurrent_trials:g} CPUs, but this machine has {machine}: lower "
                        "max_concurrent_trials or the workers per trial, or run on a cluster (RAY_ADDRESS)")
    reserve_local_cpus(int((per_trial + DRIVER_CPU) * sweep.max_concurrent_trials + 0.999))
    return per_trial


def _resources(values: dict, only: Optional[dict] = None) -> str:
    return ", ".join(f"{values.get(k, 0):g} {k}" for k in (only or values))


# -- the trainable: one trial = one controller run -------------------------------------------------

def _trial(config: dict, context: dict) -> None:
    import torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.controller import run

    torch.set_num_threads(context["threads"])  # the trial's own stages (adapt, evaluate) use its CPUs
    pairing, params = context["pairings"][config["pairing"]], _params(config)
    name, job = trial_job(context["sweep"], context["key"], pairing, params)
    current = run(job, context["root"], say=lambda line: print(f"[{name}] {line}", flush=True),
                  mlflow_parent=context["mlflow_run_id"],
                  tags={"t5adapt.sweep_id": context["sweep_id"], "t5adapt.trial": name},
                  train_callbacks=[TuneReportCallback()])
    tune.report(trial_metrics(current))


def trial_metrics(current) -> dict:
    """A finished trial's last Tune result: the evaluation's numbers the frontier uses."""
    evaluation = current.results.get("evaluate") or {}
    probe, cost = evaluation.get("probe") or {}, (evaluation.get("cost") or {}).get("model") or {}
    metrics = {"step": (current.results.get("train") or {}).get("step"), DONE: 1,
               "heldout_loss": (evaluation.get("heldout") or {}).get("loss"),
               "probe_encoder": probe.get("encoder"), "probe_encoder_masked": probe.get("encoder_masked"),
               "latency_s": cost.get("generate_s"), "parameters": (cost.get("parameters") or {}).get("total")}
    return {k: v for k, v in metrics.items() if v is not None}


def _trial_name(trial, sweep: SweepConfig, key: str, pairings: Dict[str, dict]) -> str:
    """Tune's trial name (and directory): the trial's run name (see sweep_config.trial_name)."""
    from orchestrator.sweep_config import trial_name

    return trial_name(sweep, key, pairings[trial.config["pairing"]], _params(trial.config))


def _params(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "pairing"}


# -- Ray Tune ----------------------------------------------------------------------------------------

def _fit(sweep: SweepConfig, sweep_id: str, root: str, folder: str, context: dict, space: dict, max_steps: int) -> None:
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from jobs.core.ray_runtime import ensure_ray

    # Results without the metric (none here, but a trial that fails early) must not abort the sweep.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    ensure_ray(dashboard=True)  # without it, a trial ASHA stops keeps its placement group: the next one hangs
    # The trainable only drives: its training workers take their CPUs through Ray Train. (Tune
    # refuses an empty request, so it takes a sliver.)
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), {"CPU": DRIVER_CPU})
    where = storage.join(sweep.storage, sweep_id) if sweep.storage else folder
    filesystem, tune_root = storage.arrow_filesystem(where)  # on s3: a path inside the bucket's filesystem
    experiment = f"{tune_root}/tune"
    if Tuner.can_restore(experiment, storage_filesystem=filesystem):
        print(f"sweep {sweep_id}: resuming from {storage.join(where, 'tune')} (finished trials are kept)", flush=True)
        tuner = Tuner.restore(experiment, trainable=trainable, param_space=space, resume_unfinished=True,
                              resume_errored=True, storage_filesystem=filesystem)
    else:
        name = functools.partial(_trial_name, sweep=sweep, key=context["key"], pairings=context["pairings"])
        # max_t beyond the last step: ASHA stops any trial that reaches max_t, which would kill a
        # trial after its last training report, before its evaluation.
        scheduler = (ASHAScheduler(time_attr="step", max_t=max_steps + 1, grace_period=sweep.scheduler.grace_period,
                                   reduction_factor=sweep.scheduler.reduction_factor)
                     if sweep.scheduler.type == "asha" else FIFOScheduler())
        tuner = Tuner(
            trainable, param_space=space,
            # The generator itself caps concurrency: TuneConfig.max_concurrent_trials is ignored
            # next to a generator instance (Tune says so), and that one is needed for the seed.
            tune_config=TuneConfig(metric="heldout_loss", mode="min", scheduler=scheduler, num_samples=sweep.num_samples,
                                   search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                                                    max_concurrent=sweep.max_concurrent_trials),
                                   trial_name_creator=name, trial_dirname_creator=name),
            run_config=RunConfig(name="tune", storage_path=tune_root, storage_filesystem=filesystem,
                                 callbacks=[TrialsFile(folder)], verbose=1))
    results = tuner.fit()
    errors = [r for r in results if r.error]
    if errors:
        raise RunFailed(f"{len(errors)} of {len(results)} sweep trial(s) failed, e.g. {_first_line(errors[0].error)}; "
                        f"see t5adapt ls --sweep {sweep_id}; run the same command again to retry them")


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class TrialsFile(Callback):
    """A Tune callback that keeps ROOT/sweeps/ID/trials.json current: every trial's name, pairing,
    parameters, state and latest metrics (what `t5adapt ls --sweep` prints while the sweep runs)."""

    def __init__(self, folder: str):
        self.folder = folder

    def _record(self, trial, state: str) -> None:
        trials = _load_trials(self.folder)
        result = trial.last_result or {}
        previous = trials.get(str(trial), {})
        trials[str(trial)] = {
            "name": str(trial), "pairing": trial.config["pairing"], "params": _params(trial.config),
            "state": state, "updated": time.time(),
            "metrics": {k: result[k] for k in _KEPT if k in result} or previous.get("metrics", {}),
            **({"error": _trial_error(trial)} if trial.status == "ERROR" else {})}
        _write_json(os.path.join(self.folder, TRIALS), trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(trial, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record(trial, "running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Called before Tune marks the trial TERMINATED: its last result tells done from stopped.
        self._record(trial, "done" if (trial.last_result or {}).get(DONE) else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "failed")


def _trial_error(trial) -> str:
    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # an unreadable error file: the state says enough
        error = None
    return _first_line(error) if error else "see the trial's error file"


_KEPT = ("step", "heldout_loss", "probe_encoder", "probe_encoder_masked", "latency_s", "parameters", DONE)


def _load_trials(folder: str) -> Dict[str, dict]:
    path = os.path.join(folder, TRIALS)
    return json.load(open(path)) if os.path.isfile(path) else {}


def _write_json(path: str, value) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(temporary, path)


# -- after the trials: stopped trials closed, the frontier ----------------------------------------------

def _close_stopped_trials(trials: Dict[str, dict], base, root: str) -> None:
    """A trial that ASHA stopped was killed mid-training: its ledger and MLflow runs say so. Its
    controller may have seen its training actors die first and recorded a failure: Tune stopped it,
    so that is overwritten too (a trial that really failed is Tune's ERROR, never "stopped")."""
    from orchestrator import ledger as ledgers

    for name, trial in trials.items():
        if trial["state"] != "stopped":
            continue
        run_dir = os.path.join(root, name)
        data = ledgers.read(run_dir)
        if not data:
            continue
        why = f"stopped early by the sweep's scheduler at step {trial['metrics'].get('step', '?')}"
        run_ids = [data.get("mlflow_run_id")]
        book = ledgers.Ledger(run_dir)
        for stage, entry in data.get("stages", {}).items():
            if entry.get("state") in ("running", "failed"):
                book.mark(stage, state="interrupted", error=why)
                run_ids.append(entry.get("mlflow_run_id"))
        for run_id in filter(None, run_ids):
            try:
                client = tracking.client(base.tracking, root)
                if client.get_run(run_id).info.status in ("RUNNING", "FAILED"):
                    client.set_tag(run_id, "t5adapt.stopped", why)
                    client.set_terminated(run_id, "KILLED")
            except Exception as e:  # tracking trouble must not hide the sweep's results
                log.warning("could not close the MLflow run %s of trial %s: %s", run_id, name, e)


def frontier_points(trials: Dict[str, dict], root: str, reference: bool = True) -> List[dict]:
    """Every trial's point (quality: the probe's target CE with the prefix in the encoder; cost: its
    generate latency and parameters), read from its evaluation; and one point per source model,
    measured by the same evaluations on the same workload (the median over the trials)."""
    from orchestrator import ledger as ledgers

    points, sources = [], {}
    for name, trial in sorted(trials.items()):
        evaluation = _evaluation(ledgers.read(os.path.join(root, name)))
        probe, cost = evaluation.get("probe") or {}, evaluation.get("cost") or {}
        model = cost.get("model") or {}
        points.append({"name": name, "kind": "trial", "pairing": trial.get("pairing", ""), "params": trial.get("params", {}),
                       "quality": probe.get("encoder"), "encoder_masked": probe.get("encoder_masked"),
                       "heldout_loss": (evaluation.get("heldout") or {}).get("loss"),
                       "latency_s": model.get("generate_s"), "parameters": (model.get("parameters") or {}).get("total"),
                       "state": trial.get("state", "?")})
        source = cost.get("source") or {}
        if reference and source and probe.get("source_with_context") is not None:
            spec = evaluation.get("source", "source")
            sources.setdefault(spec, []).append((probe["source_with_context"], source.get("generate_s"),
                                                 (source.get("parameters") or {}).get("total")))
    for spec, measured in sorted(sources.items()):
        quality, latency, parameters = (_median([m[i] for m in measured]) for i in range(3))
        points.append({"name": f"source: {spec}", "kind": "source", "pairing": "decoder-only", "params": {},
                       "quality": quality, "encoder_masked": None, "heldout_loss": None, "latency_s": latency,
                       "parameters": parameters, "state": f"reference ({len(measured)} measurement(s))"})
    return points


def _evaluation(data: dict) -> dict:
    entry = (data.get("stages") or {}).get("evaluate") or {}
    if entry.get("state") not in ("done", "reused") or not entry.get("output"):
        return {}
    path = storage.join(entry["output"], "evaluation.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def _median(values: list):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def write_frontier(trials: Dict[str, dict], root: str, folder: str, sweep: SweepConfig,
                   say: Callable[[str], None] = print) -> List[dict]:
    """frontier.txt, frontier.csv and frontier.png in the sweep directory; prints the table."""
    rows = frontier.frontier_rows(frontier_points(trials, root, sweep.reference))
    if not rows:
        return rows
    table = frontier.frontier_table(rows)
    with open(os.path.join(folder, "frontier.txt"), "w") as f:
        f.write(table + "\n")
    frontier.write_csv(rows, os.path.join(folder, "frontier.csv"))
    frontier.plot(rows, os.path.join(folder, "frontier.png"), title=f"sweep {os.path.basename(folder)}")
    say(table)
    say(f"frontier: {os.path.join(folder, 'frontier.csv')} and frontier.png")
    return rows


# -- MLflow: one parent run per sweep ---------------------------------------------------------------------

def _sweep_run(sweep: SweepConfig, sweep_id: str, base, root: str, folder: str) -> Optional[str]:
    if not base.tracking.enabled:
        return None
    from dataclasses import asdict

    found = tracking.find_run(base.tracking, root, {"t5adapt.sweep_id": sweep_id, "t5adapt.kind": "sweep"})
    if found:
        tracking.client(base.tracking, root).update_run(found, status="RUNNING")
        return found
    tags = {"t5adapt.sweep_id": sweep_id, "t5adapt.kind": "sweep", "t5adapt.sweep_dir": folder,
            "t5adapt.scheduler": sweep.scheduler.type}
    params = tracking.flatten("sweep", {k: v for k, v in asdict(sweep).items() if k != "pairings"})
    params.update({f"sweep.pairings.{i}": json.dumps(p) for i, p in enumerate(asdict(sweep)["pairings"])})
    return tracking.start_run(base.tracking, root, f"sweep {sweep.name}", tags, params=params)


def _close_sweep_run(base, root: str, run_id: str, status: str, folder: str, rows: List[dict]) -> None:
    artifacts = [os.path.join(folder, name) for name in ("sweep.yaml", TRIALS, "frontier.txt", "frontier.csv",
                                                          "frontier.png")]
    trials = [r for r in rows if r["kind"] == "trial" and r.get("quality") is not None]
    metrics = {"trials_evaluated": float(len(trials))}
    if trials:
        best = min(trials, key=lambda r: r["quality"])
        metrics["best_probe_encoder"] = best["quality"]
    tags = {"t5adapt.best_trial": best["name"]} if trials else {}
    try:
        tracking.finish_run(base.tracking, root, run_id, status, metrics, tags, [a for a in artifacts if os.path.isfile(a)])
    except Exception as e:  # tracking trouble must not hide the sweep's own outcome
        log.warning("could not close the sweep's MLflow run %s: %s", run_id, e)


def find_sweep(root: str, wanted: str) -> str:
    """The directory of sweep `wanted` (an ID, or a name: its newest ID) under ROOT/sweeps."""
    base = os.path.join(os.path.abspath(root), "sweeps")
    found = sorted(os.listdir(base)) if os.path.isdir(base) else []
    if wanted in found:
        return os.path.join(base, wanted)
    named = [d for d in found if d.rsplit("-", 1)[0] == wanted]
    if not named:
        raise UserError(f"no sweep {wanted!r} under {base} (sweeps there: {', '.join(found) or 'none'})")
    return max((os.path.join(base, d) for d in named), key=os.path.getmtime)


def ls_sweep(root: str, wanted: str) -> str:
    """`t5adapt ls --sweep ID`: one line per trial: pairing, parameters, state, step and metrics."""
    folder = find_sweep(root, wanted)
    trials = _load_trials(folder)
    if not trials:
        return f"sweep {os.path.basename(folder)}: no trial has started yet"
    rows = [["trial", "pairing", "params", "state", "step", "heldout_loss", "probe_ce", "latency_ms"]]
    for name, trial in sorted(trials.items()):
        metrics = trial.get("metrics", {})
        rows.append([name, trial.get("pairing", ""), ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                for k, v in trial.get("params", {}).items()),
                     trial.get("state", "?") + (f" ({trial['error']})" if trial.get("error") else ""),
                     _cell(metrics.get("step")), _cell(metrics.get("heldout_loss")), _cell(metrics.get("probe_encoder")),
                     _cell(metrics["latency_s"] * 1000 if metrics.get("latency_s") is not None else None)])
    from orchestrator.report import _table

    lines = [f"sweep {os.path.basename(folder)} ({folder})", _table(rows)]
    if os.path.isfile(os.path.join(folder, "frontier.txt")):
        lines += ["", "frontier:", open(os.path.join(folder, "frontier.txt")).read().rstrip()]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
