"""`t5adapt submit` and the job commands against a real Ray head started by cluster/local/up.sh (token
auth on, dashboard and MLflow server on 127.0.0.1), and the pieces submit is made of."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from orchestrator import submit
from tests.helpers import SMALL_EVALUATE, free_port_range, free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SWEEP_TINY = os.path.join(REPO, "configs", "sweep_tiny.yaml")
VENV_BIN = os.path.dirname(sys.executable)
SMALL = ["train.num_workers=1", "train.zero_stage=0", "train.max_steps=2", "train.checkpoint_every_steps=2",
         *SMALL_EVALUATE]
# Planted secrets: present in the cluster's and the submitter's environment, never in any output.
AWS_KEY_ID, AWS_SECRET = "AKIAPLANTEDKEY0000001", "planted-secret-access-key-6d1f0b"


def _cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli"] + args, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


@pytest.fixture(scope="module")
def local_cluster(s3_endpoint):
    """cluster/local/up.sh on free ports with a short state directory (Ray's socket paths are limited);
    down.sh at the end, which must leave no process of that cluster behind."""
    state = tempfile.mkdtemp(prefix="t5c-", dir="/tmp")
    dashboard, mlflow_port, gcs = free_ports(3)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", T5ADAPT_CLUSTER_DIR=state,
               T5ADAPT_DASHBOARD_PORT=str(dashboard), T5ADAPT_MLFLOW_PORT=str(mlflow_port), T5ADAPT_RAY_PORT=str(gcs),
               T5ADAPT_RAY_PORTS_BASE=str(free_port_range()), T5ADAPT_NUM_CPUS="3",
               RAY_AUTH_TOKEN_PATH=os.path.join(state, "auth_token"),
               AWS_ACCESS_KEY_ID=AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=AWS_SECRET)
    env.pop("T5ADAPT_ROOT", None)
    env.pop("RAY_ADDRESS", None)
    # The MLflow server keeps its artifacts on S3 (moto): runs upload them through the server.
    import boto3

    boto3.client("s3").create_bucket(Bucket="mlflow-artifacts")
    env["T5ADAPT_MLFLOW_ARTIFACTS"] = "s3://mlflow-artifacts/local-cluster"
    # The token in the environment as well as in its file (up.sh keeps a token file that exists): a
    # secret the runs must never echo.
    token = "planted-ray-token-" + os.urandom(8).hex()
    with open(os.path.join(state, "auth_token"), "w") as f:
        f.write(token + "\n")
    os.chmod(os.path.join(state, "auth_token"), 0o600)
    env["RAY_AUTH_TOKEN"] = token
    up = subprocess.run([os.path.join(REPO, "cluster", "local", "up.sh")], env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    try:
        assert up.returncode == 0, up.stdout
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))
        assert exports == {"RAY_ADDRESS": f"http://127.0.0.1:{dashboard}",
                           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                           "RAY_AUTH_TOKEN_PATH": os.path.join(state, "auth_token")}, up.stdout
        assert token not in up.stdout
        assert oct(os.stat(os.path.join(state, "auth_token")).st_mode & 0o777) == "0o600"
        client = dict(env, **exports)
        client.pop("T5ADAPT_NUM_CPUS")
        yield {"env": client, "state": state, "token": token, "root": os.path.join(state, "runs")}
    finally:
        sid = int(open(os.path.join(state, "ray.pid")).read()) if os.path.exists(os.path.join(state, "ray.pid")) else None
        down = subprocess.run([os.path.join(REPO, "cluster", "local", "down.sh")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        left = subprocess.run(["pgrep", "-s", str(sid)], stdout=subprocess.PIPE, text=True).stdout if sid else ""
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0 and not left.strip(), (down.stdout, left)


def _job_id(output):
    found = re.search(r"as job (t5adapt-\S+)", output)
    assert found, output
    return found.group(1)


def test_submitted_run_succeeds_is_tracked_and_leaks_no_secret(local_cluster, tmp_path):
    env = local_cluster["env"]
    submitted = _cli(["submit", TINY] + SMALL, env)
    assert submitted.returncode == 0, submitted.stdout
    job = _job_id(submitted.stdout)
    assert f"{env['RAY_ADDRESS']}/#/jobs/{job}" in submitted.stdout
    assert env["MLFLOW_TRACKING_URI"] in submitted.stdout

    followed = _cli(["logs", job, "--follow"], env)
    assert followed.returncode == 0, followed.stdout[-3000:]
    assert f"job {job}: SUCCEEDED" in followed.stdout
    print(followed.stdout[-2500:])  # the run's summary: stage times, for the record
    assert "run tiny (run key" in followed.stdout and "exported model:" in followed.stdout, followed.stdout[-2000:]
    status = _cli(["status", job], env)
    assert status.stdout.startswith(f"{job}: SUCCEEDED"), status.stdout
    listed = _cli(["jobs"], env)
    assert job in listed.stdout and "SUCCEEDED" in listed.stdout and "tiny" in listed.stdout, listed.stdout

    # The run is in the MLflow server (the forwarded MLFLOW_TRACKING_URI), finished, stages nested.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("t5adapt")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == ["tiny"] and parents[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {f"tiny/{stage}" for stage in ("prepare", "adapt", "train", "evaluate", "export")}, children
    # The job ran the shipped package, with the run root the head's T5ADAPT_ROOT (set by up.sh).
    assert os.path.isdir(os.path.join(local_cluster["root"], "tiny"))

    # No secret anywhere: MLflow params and tags, the job's output, the submit output, the job's
    # record on the dashboard, every text file of the run root and of the MLflow artifacts.
    secrets = (AWS_KEY_ID, AWS_SECRET, local_cluster["token"])
    texts = [submitted.stdout, followed.stdout, status.stdout, listed.stdout]
    for run in runs:
        texts.append(json.dumps(run.data.params) + json.dumps(run.data.tags))
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {local_cluster['token']}"}
                               ).get_job_info(job)
    texts.append(json.dumps(info.runtime_env) + json.dumps(info.metadata) + info.entrypoint)
    assert "AWS_SECRET_ACCESS_KEY" not in texts[-1] and "RAY_AUTH_TOKEN" not in texts[-1]
    scanned = 0
    for path, _, names in os.walk(local_cluster["root"]):
        for name in names:
            if name.endswith((".json", ".yaml", ".txt", ".md", ".csv", ".log", ".jsonl")):
                with open(os.path.join(path, name), errors="replace") as f:
                    texts.append(f.read())
                scanned += 1
    assert scanned > 10
    # The runs' artifacts went through the server to S3, and hold no secret either.
    import boto3

    s3 = boto3.client("s3")
    artifacts = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts", Prefix="local-cluster/")["Contents"]]
    assert any(key.endswith("evaluation.md") for key in artifacts), artifacts
    for key in artifacts:
        if key.endswith((".json", ".yaml", ".txt", ".md", ".csv")):
            texts.append(s3.get_object(Bucket="mlflow-artifacts", Key=key)["Body"].read().decode(errors="replace"))
    for secret in secrets:
        assert not any(secret in text for text in texts), "a secret leaked"


def test_without_or_with_a_wrong_token_the_error_says_where_the_token_is_looked_for(local_cluster, tmp_path):
    env = dict(local_cluster["env"], HOME=str(tmp_path))  # no ~/.ray/auth_token there either
    env.pop("RAY_AUTH_TOKEN_PATH")
    env.pop("RAY_AUTH_TOKEN")
    missing = _cli(["submit", TINY] + SMALL, env)
    assert missing.returncode == 2, missing.stdout
    assert "401" in missing.stdout and "RAY_AUTH_TOKEN_PATH" in missing.stdout and "Traceback" not in missing.stdout
    assert len(missing.stdout.strip().splitlines()) == 1, missing.stdout
    wrong = _cli(["jobs"], dict(env, RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2 and "403" in wrong.stdout and "not-the-token" not in wrong.stdout, wrong.stdout
    # Nothing was submitted by the refused call.
    listed = _cli(["jobs"], local_cluster["env"])
    assert listed.stdout.count(" tiny") <= 1, listed.stdout


def _training_trial(root):
    """A sweep trial (run directory ROOT/sweep-tiny-*) whose training has started, or None."""
    from orchestrator import ledger

    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("sweep-tiny-") and os.path.exists(os.path.join(root, name, "ledger.json")):
            if (ledger.read(os.path.join(root, name))["stages"].get("train") or {}).get("state") == "running":
                return name
    return None


def test_a_submitted_sweep_runs_on_the_cluster_and_stop_stops_it(local_cluster):
    """`submit --sweep` ships the sweep and its run config: the sweep starts a trial on the cluster and
    trains; `stop` stops the job, and status says so."""
    env = local_cluster["env"]
    one_long_trial = ["depths.encoder_layers=[all]", "depths.decoder_layers=[all]", "search.train.lr=0.001",
                      "overrides.train.max_steps=100000", "overrides.train.checkpoint_every_steps=1000"]
    submitted = _cli(["submit", "--sweep", SWEEP_TINY] + one_long_trial, env)
    assert submitted.returncode == 0, submitted.stdout
    assert "submitted sweep `sweep-tiny`" in submitted.stdout
    job = _job_id(submitted.stdout)
    deadline = time.monotonic() + 600
    while not _training_trial(local_cluster["root"]):
        status = _cli(["status", job], env).stdout
        assert "FAILED" not in status and time.monotonic() < deadline, status + _cli(["logs", job], env).stdout[-3000:]
        time.sleep(3)
    assert _cli(["status", job], env).stdout.startswith(f"{job}: RUNNING")
    stopped = _cli(["stop", job], env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job}: STOPPED", stopped.stdout
    assert _cli(["status", job], env).stdout.startswith(f"{job}: STOPPED")
    assert _cli(["status"], env).stdout.startswith(f"{job}: STOPPED")  # the newest t5adapt job
    follow = _cli(["logs", job, "--follow"], env)
    assert follow.returncode == 1 and f"job {job}: STOPPED" in follow.stdout
    unknown = _cli(["logs", "t5adapt-nope-00000000"], env)
    assert unknown.returncode == 2 and "no job t5adapt-nope-00000000" in unknown.stdout, unknown.stdout


# The pieces, without a cluster.

def test_the_address_comes_from_the_flag_then_ray_address_then_the_config(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(submit.UserError, match="--address"):
        submit.resolve_address(None, None)
    assert submit.resolve_address(None, "head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265/")
    assert submit.resolve_address(None, "http://config:8265") == "http://env:8265"
    assert submit.resolve_address("https://flag:443", "http://config:8265") == "https://flag:443"
    with pytest.raises(submit.UserError, match="dashboard"):
        submit.resolve_address("ray://head:10001")


def test_the_token_comes_from_the_environment_then_its_file_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.read_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert submit.read_token() == "home-token"
    (tmp_path / "named").write_text("file-token\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "named"))
    assert submit.read_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert submit.read_token() == "env-token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.UserError, match="RAY_AUTH_TOKEN_PATH"):
        submit.read_token()


def test_the_package_holds_the_code_and_the_config_only(tmp_path):
    folder = submit.package({"job.yaml": "name: x\n"})
    try:
        top = sorted(os.listdir(folder))
        assert top == ["job.yaml", "jobs", "orchestrator"]
        names = [n for _, _, files in os.walk(folder) for n in files]
        assert "cli.py" in names and "submit.py" in names
        assert not [n for n in names if n.endswith(".pyc")]
        assert sum(os.path.getsize(os.path.join(d, n)) for d, _, fs in os.walk(folder) for n in fs) < 5 * 2**20
    finally:
        shutil.rmtree(folder)


def test_only_endpoints_and_regions_are_forwarded_never_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = submit.forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert AWS_KEY_ID not in json.dumps(env) and AWS_SECRET not in json.dumps(env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:hunter2@mlflow:5000")
    with pytest.raises(submit.UserError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        submit.forwarded_env()
    assert "hunter2" not in str(refused.value)


def test_a_shipped_sweep_is_the_same_sweep_on_the_cluster(tmp_path):
    """The package's job.yaml + run.yaml load (from the package dir, as the cluster does) into a
    sweep with the same key, hence the same ID, trials and stage keys as running it here."""
    from orchestrator.config import load_config, to_yaml
    from orchestrator.sweep_config import load_sweep, sweep_key

    overrides = ["overrides.train.max_steps=6", "max_concurrent_trials=1"]
    files, name, section, _ = submit.job_files("sweep", SWEEP_TINY, overrides)
    for file, text in files.items():
        (tmp_path / file).write_text(text)
    here = load_sweep(SWEEP_TINY, overrides)
    there = load_sweep(str(tmp_path / "job.yaml"))
    assert name == "sweep-tiny" and there.run == str(tmp_path / "run.yaml")
    assert sweep_key(there, to_yaml(load_config(there.run))) == sweep_key(here, to_yaml(load_config(here.run)))
    run_files, run_name, _, _ = submit.job_files("run", TINY, ["train.lr=0.01"])
    (tmp_path / "run-job.yaml").write_text(run_files["job.yaml"])
    assert load_config(str(tmp_path / "run-job.yaml")) == load_config(TINY, ["train.lr=0.01"])
    assert submit.entrypoint("run", None) == 'python -m orchestrator.cli run job.yaml --root "${T5ADAPT_ROOT:-$HOME/t5adapt-runs}"'
    assert submit.entrypoint("sweep", "/shared/my runs") == "python -m orchestrator.cli sweep job.yaml --root '/shared/my runs'"
