"""`t5adapt sweep` end to end on the tiny config: Ray Tune over 4 depth pairings x 2 learning rates
(every trial a controller run with a real local Ray cluster, real DeepSpeed, a real MLflow store),
a driver killed mid-sweep and resumed, ASHA stopping a trial that cannot learn, the frontier, and
the MLflow UI in headless Chromium."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jobs.train import checkpoints
from orchestrator.cli import main
from tests.helpers import files as _files, mlflow_runs as _mlflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO, "configs", "sweep_tiny.yaml")
PAIRINGS = {"eall-dall", "eall-dfirst3", "efirst3-dall", "efirst3-dfirst3"}


def _sweep_dir(root, name="sweep-tiny"):
    found = glob.glob(os.path.join(root, "sweeps", f"{name}-*"))
    return found[0] if len(found) == 1 else None


def _trials(root, name="sweep-tiny"):
    folder = _sweep_dir(root, name)
    path = os.path.join(folder, "trials.json") if folder else ""
    return json.load(open(path)) if os.path.isfile(path) else {}  # written whole (os.replace)


def _ledger(root, run):
    from orchestrator import ledger

    return ledger.read(os.path.join(root, run))


def _wait_for(predicate, timeout_s, what, process=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before {what}:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpointed_trial(root):
    """A running trial whose training committed its first checkpoint, once another trial is done."""
    trials = _trials(root)
    if not any(t["state"] == "done" for t in trials.values()):
        return None
    for name, trial in trials.items():
        if trial["state"] != "running":
            continue
        train = (_ledger(root, name).get("stages") or {}).get("train") or {}
        steps = checkpoints.committed_steps(train["output"]) if train.get("state") == "running" else []
        if steps and max(steps) < 12:
            return name
    return None


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny sweep, its driver SIGKILLed (with its Ray cluster) once a trial is done and the next
    one has a training checkpoint, then the same command run again to the end."""
    root = str(tmp_path_factory.mktemp("sweep"))
    command = [sys.executable, "-m", "orchestrator.cli", "sweep", SWEEP, "--root", root]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    killed = []
    try:
        _wait_for(lambda: killed.append(_checkpointed_trial(root)) or killed[-1], 1200,
                  "a trial with a training checkpoint", process)
        os.killpg(process.pid, signal.SIGKILL)  # at once: the trial trains on while we look
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    killed = killed[-1]
    done = sorted(n for n, t in _trials(root).items() if t["state"] == "done")
    before = {n: _files(os.path.join(root, "stages")) for n in done[:1]}
    _, _, runs_before = _mlflow(root)
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    return {"root": root, "killed": killed, "done_before_kill": done, "runs_before": runs_before,
            "stage_files_before": before, "output": rerun.stdout}


def test_sweep_runs_every_trial_nested_under_one_parent_and_shares_stages(swept):
    root = swept["root"]
    trials = _trials(root)
    assert len(trials) == 8 and {t["state"] for t in trials.values()} == {"done"}
    assert {t["pairing"] for t in trials.values()} == PAIRINGS
    assert sorted(t["params"]["train.lr"] for t in trials.values()) == [0.0005] * 4 + [0.002] * 4
    client, _, runs = _mlflow(root)
    by_id = {r.info.run_id: r for r in runs}
    sweeps = [r for r in runs if r.data.tags.get("t5adapt.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    trial_runs = [r for r in runs if r.data.tags.get("t5adapt.trial")]
    assert sorted(r.info.run_name for r in trial_runs) == sorted(trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {sweeps[0].info.run_id}
    stage_runs = [r for r in runs if r.data.tags.get("t5adapt.stage")]
    for run in stage_runs:  # every stage run sits under its trial's run, which sits under the sweep
        parent = by_id[run.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags.get("t5adapt.trial") and parent.info.run_name == run.info.run_name.split("/")[0]
    built = {stage: sum(r.data.tags["t5adapt.stage"] == stage for r in stage_runs)
             for stage in ("prepare", "adapt", "train", "evaluate", "export")}
    # One prepared dataset for all, one adapted checkpoint per pairing, the rest per trial.
    assert built == {"prepare": 1, "adapt": 4, "train": 8, "evaluate": 8, "export": 8}


def test_killed_sweep_resumes_without_rerunning_finished_trials(swept):
    root, killed = swept["root"], swept["killed"]
    assert killed and swept["done_before_kill"] and killed not in swept["done_before_kill"]
    client, _, runs = _mlflow(root)
    # A trial finished before the kill: no new run of its stages, and its outputs untouched.
    for name in swept["done_before_kill"]:
        key = _ledger(root, name)["run_key"]
        assert (sum(r.data.tags.get("t5adapt.parent_run_key") == key for r in runs)
                == sum(r.data.tags.get("t5adapt.parent_run_key") == key for r in swept["runs_before"]))
    now = _files(os.path.join(root, "stages"))
    for name, before in swept["stage_files_before"].items():
        for stage, entry in _ledger(root, name)["stages"].items():
            prefix = os.path.basename(entry["output"]) + os.sep
            kept = {k: v for k, v in before.items() if k.startswith(prefix)}
            assert kept and all(now.get(k) == v for k, v in kept.items()), (name, stage)
    # The killed trial resumed its training from the checkpoint, in the same MLflow run.
    train = _ledger(root, killed)["stages"]["train"]
    run = client.get_run(train["mlflow_run_id"])
    resumed = int(run.data.tags.get("t5adapt.resumed_from_step", 0))
    assert 2 <= resumed < 12 and run.info.status == "FINISHED"
    # Each step's loss was logged once before the kill or once after the resume, never from step 1 again.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, 13)) and steps.count(1) == 1
    assert "resuming from" in swept["output"]


def test_frontier_table_csv_and_plot(swept):
    import csv

    from PIL import Image

    root = swept["root"]
    folder = _sweep_dir(root)
    rows = list(csv.DictReader(open(os.path.join(folder, "frontier.csv"))))
    trials = [r for r in rows if r["kind"] == "trial"]
    sources = [r for r in rows if r["kind"] == "source"]
    assert len(trials) == 8 and [s["name"] for s in sources] == ["source: builtin:tiny-gemma3"]
    assert all(float(r["quality"]) > 0 and float(r["latency_s"]) > 0 and int(r["parameters"]) > 0 for r in rows)
    assert any(r["pareto"] == "true" for r in rows)
    # The fewer layers, the fewer parameters: the 3-3 pairing is the smallest trial.
    smallest = min(trials, key=lambda r: int(r["parameters"]))
    assert smallest["pairing"] == "efirst3-dfirst3"
    image = Image.open(os.path.join(folder, "frontier.png"))
    assert image.format == "PNG" and image.size[0] > 300
    assert sorted(json.loads(image.info["t5adapt.points"])) == sorted(r["name"] for r in rows)
    table = open(os.path.join(folder, "frontier.txt")).read()
    assert all(name in table for name in _trials(root)) and "source: builtin:tiny-gemma3" in table
    assert table.splitlines()[0].split()[:2] == ["name", "kind"] and table in swept["output"] + "\n"
    # ... all logged to the sweep's MLflow run.
    client, _, runs = _mlflow(root)
    sweep_run = next(r for r in runs if r.data.tags.get("t5adapt.kind") == "sweep")
    logged = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert {"frontier.csv", "frontier.png", "frontier.txt", "sweep.yaml", "trials.json"} <= logged


def test_ls_sweep_lists_trials_and_show_works_for_a_trial(swept, capsys):
    root = swept["root"]
    assert main(["ls", "--sweep", "sweep-tiny", "--root", root]) == 0
    out = capsys.readouterr().out
    trials, frontier = out.split("\nfrontier:\n")
    lines = [line for line in trials.splitlines() if line.startswith("sweep-tiny-")]
    assert len(lines) == 8 and all(" done " in line for line in lines)
    assert frontier.strip() == open(os.path.join(_sweep_dir(root), "frontier.txt")).read().strip()
    trial = sorted(_trials(root))[0]
    assert main(["show", trial, "--root", root]) == 0
    out = capsys.readouterr().out
    assert f"run {trial}" in out and "evaluate: " in out
    assert main(["ls", "--sweep", "no-such-sweep", "--root", root]) == 2
    assert "no sweep 'no-such-sweep'" in capsys.readouterr().err


def test_asha_stops_a_trial_that_cannot_learn_and_the_next_trial_starts(s3_endpoint, tmp_path, capsys):
    """lr=0 cannot learn: at the first rung (step 2) its held-out loss lags the lr=0.003 trial's and
    ASHA stops it; the trial after it must still get the cluster and train. The lr=0.003 trial runs
    its 12 steps and its evaluation (ASHA must not stop a trial at its last step). Tune keeps its
    experiment state on S3 (moto on loopback)."""
    import boto3
    import ray
    import yaml

    boto3.client("s3").create_bucket(Bucket="sweep-state")
    root = str(tmp_path / "root")

    values = yaml.safe_load(open(SWEEP))
    values.update(name="sweep-asha", run=os.path.join(REPO, "configs", "tiny.yaml"), depths={},
                  pairings=[{"name": "full", "encoder_layers": "all", "decoder_layers": "all"}],
                  search={"train.lr": {"grid": [0.003, 0.0, 0.004]}},
                  scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2}, max_concurrent_trials=1,
                  storage="s3://sweep-state/sweeps")
    config = tmp_path / "sweep_asha.yaml"
    config.write_text(yaml.safe_dump(values))
    try:
        assert main(["sweep", str(config), "--root", root]) == 0
        groups = ray.util.placement_group_table().values()
        assert groups and all(g["state"] == "REMOVED" for g in groups), [g["state"] for g in groups]
    finally:
        ray.shutdown()
    trials = {t["params"]["train.lr"]: t for t in _trials(root, "sweep-asha").values()}
    assert trials[0.0]["state"] == "stopped" and trials[0.0]["metrics"]["step"] == 2
    assert trials[0.003]["state"] == "done" and trials[0.003]["metrics"]["step"] == 12
    assert trials[0.004]["state"] in ("done", "stopped") and trials[0.004]["metrics"]["step"] >= 2
    stopped = _ledger(root, trials[0.0]["name"])
    assert stopped["stages"]["train"]["state"] == "interrupted" and "stopped early" in stopped["stages"]["train"]["error"]
    client, _, runs = _mlflow(root)
    run = client.get_run(stopped["mlflow_run_id"])
    assert run.info.status == "KILLED" and "step 2" in run.data.tags["t5adapt.stopped"]
    # The stopped trial is on the table, not on the frontier's plot (it has no evaluation).
    out = capsys.readouterr().out
    assert trials[0.0]["name"] in out
    folder = _sweep_dir(root, "sweep-asha")
    from PIL import Image

    assert trials[0.0]["name"] not in json.loads(Image.open(os.path.join(folder, "frontier.png")).info["t5adapt.points"])
    # Tune's experiment state went to S3: a later run of the same sweep restores it from there.
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="sweep-state")["Contents"]]
    prefix = f"sweeps/{os.path.basename(folder)}/tune/"
    assert any(k.startswith(prefix + "experiment_state") for k in keys), keys[:10]
    from ray.tune import Tuner

    from jobs.core import storage

    filesystem, path = storage.arrow_filesystem(f"s3://sweep-state/{prefix}")
    assert Tuner.can_restore(path, storage_filesystem=filesystem)


def test_mlflow_ui_lists_the_sweep_and_its_trials_in_a_browser(swept):
    from mlflow.tracking import MlflowClient

    from tests import browser

    root = swept["root"]
    experiment = MlflowClient(f"sqlite:///{root}/mlflow.db").get_experiment_by_name("t5adapt")
    process, url = browser.start_mlflow_ui(root)
    try:
        screenshot = os.path.join(browser.artifact_dir(), "sweep-mlflow-ui.png")
        names = sorted(_trials(root))
        page = browser.render(browser.experiment_url(url, experiment.experiment_id), screenshot,
                              expect=["sweep sweep-tiny"] + names)
    finally:
        browser.stop(process)
    assert all(name in page for name in names)
    assert open(screenshot, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(screenshot) > 20_000


def test_a_wrong_sweep_fails_before_any_trial_starts(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "root")
    assert main(["sweep", SWEEP, "--root", root, "overrides.train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key train.lrr" in err and "did you mean train.lr" in err
    assert main(["sweep", SWEEP, "--root", root, "search.train.lr={bogus: [1]}"]) == 2
    assert "search.train.lr must be a constant or one of" in capsys.readouterr().err
    # A pairing adapt cannot build: layers the source does not have; sources of two families.
    assert main(["sweep", SWEEP, "--root", root, "depths.encoder_layers=[all,first:9]"]) == 2
    assert "adapt.encoder_layers='first:9' asks for 9 layers but the source has 6" in capsys.readouterr().err
    assert main(["sweep", SWEEP, "--root", root, "depths.encoder_layers=[]", "depths.decoder_layers=[]",
                 "pairings=[{source: 'builtin:tiny-gemma3', decoder_source: 'builtin:tiny-gemma2'}]"]) == 2
    assert "a pair must come from one family" in capsys.readouterr().err
    monkeypatch.setenv("T5ADAPT_NUM_CPUS", "2")
    assert main(["sweep", SWEEP, "--root", root, "max_concurrent_trials=3"]) == 2
    assert "max_concurrent_trials=3 x (train.num_workers=1 x train.cpus_per_worker=1) = 3 CPUs, but this machine " \
           "has 2" in capsys.readouterr().err
    assert not os.path.isdir(os.path.join(root, "stages")) or not os.listdir(os.path.join(root, "stages"))


def test_explicit_pairings_set_the_sources_and_layers_of_each_trial():
    """Gemma 2 pairs as the T5Gemma paper made them: balanced, and unbalanced (a wider encoder source
    with a narrower decoder source); unset fields keep the run config's."""
    from orchestrator.config import load_config, to_yaml
    from orchestrator.sweep_config import load_sweep, pairings, sweep_key, trial_job

    sweep = load_sweep(SWEEP, ["depths.encoder_layers=[]", "depths.decoder_layers=[]", "pairings=["
                               "{name: balanced, source: 'builtin:tiny-gemma2'},"
                               "{name: wide-narrow, source: 'builtin:tiny-gemma2', decoder_source: 'builtin:tiny-gemma2-narrow'},"
                               "{decoder_layers: 'first:2'}]"])
    found = pairings(sweep)
    assert [p["label"] for p in found] == ["balanced", "wide-narrow", "dfirst2"]
    key = sweep_key(sweep, to_yaml(load_config(sweep.run)))
    jobs = [trial_job(sweep, key, p, {"train.lr": 0.001})[1] for p in found]
    assert [(j.adapt.source, j.adapt.decoder_source, j.adapt.decoder_layers) for j in jobs] == [
        ("builtin:tiny-gemma2", None, "all"), ("builtin:tiny-gemma2", "builtin:tiny-gemma2-narrow", "all"),
        ("builtin:tiny-gemma3", None, "first:2")]
    assert all(j.train.lr == 0.001 and j.train.max_steps == 12 for j in jobs)
    assert jobs[0].train.heldout_examples == jobs[0].evaluate.max_examples == 8  # ASHA's curve
    from jobs.adapt.stage import check_pairing

    for job in jobs:
        check_pairing(job.adapt)  # each one adapt can build


def test_trial_names_are_deterministic_and_follow_the_config():
    from orchestrator.config import load_config, to_yaml
    from orchestrator.sweep_config import load_sweep, pairings, sweep_key, trial_name

    def names(*overrides):
        sweep = load_sweep(SWEEP, overrides)
        key = sweep_key(sweep, to_yaml(load_config(sweep.run)))
        return [trial_name(sweep, key, p, {"train.lr": lr}) for p in pairings(sweep) for lr in (0.002, 0.0005)]

    first = names()
    assert first == names() and len(set(first)) == 8
    assert all(n.startswith("sweep-tiny-e") for n in first)
    assert set(names("overrides.train.max_steps=6")).isdisjoint(first)  # another config: other runs
    assert names("max_concurrent_trials=2") == first  # how it runs is not what it computes


def test_a_stopped_trial_whose_controller_saw_its_actors_die_is_marked_interrupted(tmp_path):
    """When ASHA stops a trial, its controller may see the Train actors die and record a failure before
    its own process is killed: Tune stopped it, so its ledger says interrupted and its MLflow runs
    KILLED (the race that a full sweep only sometimes shows)."""
    from jobs.core import tracking
    from orchestrator import ledger as ledgers
    from orchestrator.config import load_config
    from orchestrator.sweep import _close_stopped_trials

    base, root = load_config(os.path.join(REPO, "configs", "tiny.yaml")), str(tmp_path)
    tracking.check_store(base.tracking, root)
    client = tracking.client(base.tracking, root)
    experiment = tracking.experiment_id(base.tracking, root)
    runs = {name: client.create_run(experiment, run_name=name).info.run_id for name in ("trial", "train", "done")}
    for name in ("trial", "train"):
        client.set_terminated(runs[name], "FAILED")
    for trial, state in (("stopped-trial", "failed"), ("finished-trial", "done")):
        book = ledgers.Ledger(os.path.join(root, trial))
        book.set(mlflow_run_id=runs["trial"] if state == "failed" else runs["done"], stages={})
        book.mark("prepare", state="reused")
        book.mark("train", state=state, error="The actor died unexpectedly before finishing this task.",
                  mlflow_run_id=runs["train"] if state == "failed" else runs["done"])
    client.set_terminated(runs["done"], "FINISHED")
    _close_stopped_trials({"stopped-trial": {"state": "stopped", "metrics": {"step": 2}},
                           "finished-trial": {"state": "done", "metrics": {"step": 12}}}, base, root)
    stopped = ledgers.read(os.path.join(root, "stopped-trial"))["stages"]
    assert stopped["train"]["state"] == "interrupted" and "stopped early" in stopped["train"]["error"]
    assert stopped["prepare"]["state"] == "reused"
    assert ledgers.read(os.path.join(root, "finished-trial"))["stages"]["train"]["state"] == "done"
    for name in ("trial", "train"):
        run = client.get_run(runs[name])
        assert run.info.status == "KILLED" and "step 2" in run.data.tags["t5adapt.stopped"]
    assert client.get_run(runs["done"]).info.status == "FINISHED"
