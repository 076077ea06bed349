"""The controller end to end: `t5adapt run` on the tiny config with a real local Ray cluster, real
DeepSpeed and a real MLflow store. Stages are content-addressed: what a changed config reuses and
what it rebuilds, a Ctrl-C'd controller, two controllers sharing one build. (A SIGKILLed controller
resuming: tests/test_s3_faults.py, with every stage on S3; a killed sweep: tests/test_sweep.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.cli import main
from tests.helpers import files as _files, mlflow_runs as _mlflow_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
# Small and quick: one worker, ZeRO-0, a few steps; the evaluation sized down to match.
SMALL = ["train.num_workers=1", "train.zero_stage=0", "train.max_steps=4", "train.checkpoint_every_steps=2",
         "evaluate.max_examples=16", "evaluate.probe_passages=4", "evaluate.cost_repeats=1", "evaluate.num_samples=1",
         "evaluate.probe_prefix_tokens=16", "evaluate.probe_target_tokens=8", "evaluate.cost_input_tokens=16",
         "evaluate.cost_output_tokens=4", "evaluate.sample_new_tokens=4"]
STAGES = ("prepare", "adapt", "train", "evaluate", "export")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ledger(root, name="tiny"):
    from orchestrator import ledger

    return ledger.read(os.path.join(root, name))


def _states(root):
    return {name: entry["state"] for name, entry in _ledger(root)["stages"].items()}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("controller"))
    assert main(["run", TINY, "--root", root] + SMALL) == 0
    return root


def test_run_builds_every_stage_with_an_evaluation_and_one_mlflow_tree(first_run, capsys):
    root = first_run
    ledger = _ledger(root)
    assert _states(root) == {name: "done" for name in STAGES}
    for name in STAGES:
        entry = ledger["stages"][name]
        assert entry["output"] == os.path.join(root, "stages", f"{name}-{entry['key']}")
        assert os.path.isfile(os.path.join(entry["output"], "COMMITTED")), name
    assert ledger["stages"]["train"]["step"] == 4
    evaluation = json.load(open(os.path.join(ledger["stages"]["evaluate"]["output"], "evaluation.json")))
    assert evaluation["heldout"]["loss"] > 0 and evaluation["heldout"]["by_denoiser"]
    for key in ("encoder", "encoder_masked", "source_target_only", "source_with_context"):
        assert evaluation["probe"][key] > 0, key
    export = ledger["stages"]["export"]["output"]
    card = open(os.path.join(export, "README.md")).read()
    assert "Optimizer steps: 4" in card and "builtin:tiny-gemma3" in card and "held-out" in card.lower()
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(export)

    client, experiment, runs = _mlflow_runs(root)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["t5adapt.run_key"] == ledger["run_key"]
    for tag in ("t5adapt.pairing", "t5adapt.git_commit", "t5adapt.version", "t5adapt.stage_key.train"):
        assert parent.data.tags[tag], tag
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {f"tiny/{name}" for name in STAGES}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert "heldout.loss" in parent.data.metrics and "probe.encoder" in children["tiny/evaluate"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "evaluation.json", "evaluation.md", "README.md"} <= artifacts


def test_rerun_reuses_every_stage_and_rewrites_nothing(first_run, capsys):
    root = first_run
    before = _files(os.path.join(root, "stages"))
    _, _, runs_before = _mlflow_runs(root)
    assert main(["run", TINY, "--root", root] + SMALL) == 0
    assert _files(os.path.join(root, "stages")) == before
    assert _states(root) == {name: "reused" for name in STAGES}
    _, _, runs_after = _mlflow_runs(root)
    assert len(runs_after) == len(runs_before)  # no duplicate parent, no stage logged again
    out = capsys.readouterr().out
    assert "reused" in out and "exported model:" in out and "t5adapt ui" in out


def test_ls_and_show_describe_the_run(first_run, capsys):
    assert main(["ls", "--root", first_run]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "builtin:tiny-gemma3[all]" in table and "heldout_loss" in table
    loss = _ledger(first_run)["stages"]["evaluate"]["heldout_loss"]
    assert f"{loss:.3f}" in table
    assert main(["show", "tiny", "--root", first_run]) == 0
    text = capsys.readouterr().out
    for name in STAGES:
        assert _ledger(first_run)["stages"][name]["key"] in text
    assert "took" in text and "step 4" in text
    assert main(["show", "nope", "--root", first_run]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_changed_lr_rebuilds_only_train_evaluate_export(first_run, capsys):
    root = first_run
    before = _ledger(root)["stages"]
    old_train = _files(before["train"]["output"])
    capsys.readouterr()
    assert main(["run", TINY, "--root", root, "train.lr=0.001"] + SMALL) == 0
    out = capsys.readouterr().out
    # Says which key changed and that the old output stays (reused if the key goes back).
    assert "the train stage's key changed (train.lr: 0.002 -> 0.001). Training starts from step 0 in " in out
    assert f"the previous output stays in {before['train']['output']} and is reused" in out
    after = _ledger(root)["stages"]
    assert _states(root) == {"prepare": "reused", "adapt": "reused", "train": "done", "evaluate": "done", "export": "done"}
    assert after["train"]["key"] != before["train"]["key"]
    assert _files(before["train"]["output"]) == old_train  # the old training output is intact


def test_a_new_user_changing_lengths_and_init_gets_new_outputs(first_run):
    """The scenario that used to reuse old checkpoints silently: every stage that depends on the
    changed fields is built anew; worker counts alone change nothing."""
    root = first_run
    before = _ledger(root)["stages"]
    assert main(["run", TINY, "--root", root, "adapt.encoder_scale=0", "data.encoder_length=48"] + SMALL) == 0
    assert _states(root) == {name: "done" for name in STAGES}
    after = _ledger(root)["stages"]
    assert all(after[name]["key"] != before[name]["key"] for name in STAGES)
    # Worker counts and checkpoint cadence are not in any key.
    from orchestrator import keys
    from orchestrator.config import load_config

    def stage_keys(*overrides):
        job = load_config(TINY, SMALL + list(overrides))
        return {n: s.key for n, s in keys.plan_stages(job, root, keys.denoising_plan(job)).items()}

    assert stage_keys("data.num_tokenizer_workers=2", "train.checkpoint_every_steps=3", "train.max_failures=5") == \
        stage_keys()


def test_a_fixed_corpus_file_is_prepared_again(ray_cluster, tmp_path, capsys):
    """Corpus files enter the prepare key by identity: fixing a file makes new data, not a reuse."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("")
    overrides = [f"data.corpus=[{{path: '{corpus}'}}]", "evaluate.enabled=false"]
    assert main(["prepare", TINY, "--root", str(tmp_path / "root")] + overrides) == 2
    assert str(corpus) in capsys.readouterr().err
    from jobs.core.shipped_text import prose_documents

    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in prose_documents()[:60]))
    assert main(["prepare", TINY, "--root", str(tmp_path / "root")] + overrides) == 0
    assert _states(str(tmp_path / "root"))["prepare"] == "done"


@pytest.mark.parametrize("overrides,message", [
    (["data.seed=-1"], "data.seed"),
    (["tracking.uri=foo://bar"], "tracking.uri=foo://bar"),
    (["train.num_workers=100"], "train.num_workers"),
    (["no_such_key=1"], "unknown config key no_such_key"),
])
def test_bad_input_fails_before_any_stage_starts(tmp_path, capsys, overrides, message):
    root = tmp_path / "root"
    assert main(["run", TINY, "--root", str(root)] + overrides) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (root / "stages").exists() or not os.listdir(root / "stages")


def test_root_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["run", TINY, "--root", str(afile)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["adapt", TINY, "--root", str(tmp_path / "r"), "--out", str(afile)]) == 2
    assert f"--out of adapt {afile} is a file" in capsys.readouterr().err
    assert main(["export", TINY, "--root", str(tmp_path / "r"), "--step", "2", "--out", str(afile)]) == 2
    assert f"--out {afile} is a file" in capsys.readouterr().err
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    else:  # root writes through permission bits; sysfs refuses new files even to root
        locked = "/sys/kernel/t5adapt-root"
    assert main(["run", TINY, "--root", str(locked)]) == 2
    assert "not writable" in capsys.readouterr().err


def _run_process(root, *extra):
    """`t5adapt run` in its own process group (so it can be killed with its Ray cluster)."""
    command = [sys.executable, "-m", "orchestrator.cli", "run", TINY, "--root", root] + SMALL + list(extra)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(predicate, timeout_s, what):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _first_checkpoint_committed(root) -> bool:
    """Whether the run's train stage (as its ledger names it) has committed its step-2 checkpoint."""
    ledger = _ledger(root) if os.path.exists(os.path.join(root, "tiny", "ledger.json")) else {}
    train = ledger.get("stages", {}).get("train", {}).get("output")
    return bool(train) and os.path.exists(os.path.join(train, "checkpoints", "step-000002", "COMMITTED"))


def test_two_concurrent_runs_build_each_stage_once_and_take_over_a_dead_lock(tmp_path):
    from jobs.core import locks
    from orchestrator import keys
    from orchestrator.config import load_config

    root = str(tmp_path)
    job = load_config(TINY, SMALL)
    prepare_out = keys.plan_stages(job, root, keys.denoising_plan(job))["prepare"].output
    # A lock left by a controller that died: same host, a pid that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(os.path.dirname(prepare_out), exist_ok=True)
    now = time.time()
    with open(prepare_out + ".lock", "w") as f:
        json.dump({"owner": f"{locks.lock_host()}:{dead.pid}", "host": locks.lock_host(), "pid": dead.pid,
                   "token": "dead", "started": now, "heartbeat": now, "expires": now + 3600}, f)
    first = _run_process(root)
    time.sleep(3)
    second = _run_process(root)
    outputs = [p.communicate(timeout=900)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[-3000:] for o in outputs]
    _, _, runs = _mlflow_runs(root)
    for name in STAGES:
        assert len([r for r in runs if r.info.run_name == f"tiny/{name}"]) == 1, name  # built once
    assert any("waiting for stage" in o or "built by another run" in o for o in outputs), outputs[1][-2000:]
    assert not os.path.exists(prepare_out + ".lock")


def test_ctrl_c_during_training_says_interrupted_and_how_to_resume(tmp_path):
    """Ray Train turns SIGINT into an abort and exits from its signal handler; the command must still
    say it was interrupted (exit 130), mark the stage and its MLflow run as killed, not failed."""
    root = str(tmp_path)
    process = _run_process(root, "train.max_steps=40")

    try:
        _wait_for(lambda: _first_checkpoint_committed(root), 600, "the first training checkpoint")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted" in output and "run the same command again to resume" in output
    assert _states(root)["train"] == "interrupted"
    _, _, runs = _mlflow_runs(root)
    train = next(r for r in runs if r.info.run_name == "tiny/train")
    assert train.info.status == "KILLED" and "re-run the same command" in train.data.tags["t5adapt.error"]


def test_ui_serves_the_run_store_on_loopback(first_run):
    """`t5adapt ui` starts the MLflow UI on the root's store, bound to 127.0.0.1, and prints its URL."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--root", first_run, "--port", str(port)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline()
        # ... and the runs table's URL: MLflow 3 otherwise opens the experiment on its GenAI overview.
        assert "/runs?workflowType=machine_learning" in process.stdout.readline()

        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search"
                                            "?max_results=10", timeout=5) as response:
                    return "t5adapt" in response.read().decode()
            except OSError:
                return False

        _wait_for(answers, 120, "the MLflow UI")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_changed_train_fields_are_the_keyed_ones_that_differ():
    from orchestrator import keys
    from orchestrator.config import load_config, to_yaml

    before = to_yaml(load_config(TINY))
    job = load_config(TINY, ["train.max_steps=60", "train.max_failures=5", "train.checkpoint_every_steps=3"])
    assert keys.changed_train_fields(before, job) == {"train.max_steps": (30, 60)}  # the others are not keyed
