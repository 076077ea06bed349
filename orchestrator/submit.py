"""A run or a sweep as a Ray job on a cluster, through the Ray Jobs API (the dashboard's HTTP API).

The job's working directory is a small package built here: the project's code (orchestrator/ and
jobs/, nothing else of the working tree) and the resolved config, so the cluster runs exactly what
was validated here. Its entrypoint is `python -m orchestrator.cli run job.yaml` (or `sweep`).
The cluster must have the project's dependencies installed (cluster/: the node setup and image).

Ray token authentication: the token comes from $RAY_AUTH_TOKEN, else the file named by
$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; it is sent as an `Authorization: Bearer` header
(Ray's client only attaches it by itself when RAY_AUTH_MODE=token is set). It is never read from a
config, printed or logged. The address: --address, else $RAY_ADDRESS, else the config's
submit.address.
"""

import asyncio
import os
import shlex
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from jobs.core.errors import UserError

TOKEN_SOURCES = "$RAY_AUTH_TOKEN, the file named by $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token"
# Environment forwarded to the job: where to track and which S3 endpoint/region; never credentials
# (the cluster's nodes get those from their own AWS chain: instance profile, IRSA, a Secret).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
PACKAGES = ("orchestrator", "jobs")
# Ray refuses a local working_dir above about 100 MiB; ours is a few hundred KiB.
_MAX_PACKAGE_BYTES = 100 * 2**20
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitConfig:
    # The Ray dashboard of the cluster, e.g. http://127.0.0.1:8265 (a port-forward to the head).
    # `--address` and $RAY_ADDRESS take precedence.
    address: Optional[str] = None
    # The run root on the cluster (a path every node sees, or s3:// for the stage store: see
    # `store`). Default: $T5ADAPT_ROOT on the head, else ~/t5adapt-runs there. `--root` wins.
    root: Optional[str] = None


def read_token() -> Optional[str]:
    """The Ray auth token from the environment or its file, or None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named and not os.path.isfile(named):
        raise UserError(f"RAY_AUTH_TOKEN_PATH={named} is not a file (it should hold the cluster's token)")
    path = named or os.path.expanduser("~/.ray/auth_token")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() or None
    return None


def resolve_address(flag: Optional[str], config_address: Optional[str] = None) -> str:
    address = flag or os.environ.get("RAY_ADDRESS") or config_address
    if not address:
        raise UserError("no Ray cluster to talk to: pass --address http://HEAD:8265, set RAY_ADDRESS, or set "
                        "submit.address in the config (cluster/local/up.sh starts a cluster on this machine)")
    if address.startswith("ray://"):
        raise UserError(f"{address} is a Ray Client address; job submission talks to the dashboard: "
                        "use http://HEAD:8265 (the dashboard port)")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


class Cluster:
    """The Jobs API of one cluster; every failure to reach it or to be let in is a UserError."""

    def __init__(self, address: str):
        self.address = address
        self._client = self._call(self._connect)

    def _connect(self):
        from ray.job_submission import JobSubmissionClient

        token = read_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return JobSubmissionClient(self.address, headers=headers)

    def _call(self, fn: Callable, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            refused = "has no valid token (HTTP 403)" if "403" in str(e) or "Invalid" in str(e) else \
                "needs a token and none was sent (HTTP 401)"
            raise UserError(f"the Ray cluster at {self.address} refused the request: it {refused}. "
                            f"t5adapt reads the token from {TOKEN_SOURCES}") from None
        except ConnectionError:
            raise UserError(f"cannot reach the Ray dashboard at {self.address}: is the cluster up, and is "
                            "this the dashboard's address (port 8265, or a port-forward to it)?") from None

    def submit(self, entrypoint: str, working_dir: str, env: Dict[str, str], metadata: Dict[str, str],
               submission_id: str) -> str:
        runtime_env = {"working_dir": working_dir, "env_vars": env}
        return self._call(self._client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env,
                          metadata=metadata, submission_id=submission_id, entrypoint_num_cpus=0)

    def info(self, job_id: str):
        try:
            return self._call(self._client.get_job_info, job_id)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                raise UserError(f"no job {job_id} on {self.address} (list them: t5adapt jobs)") from None
            raise

    def jobs(self) -> list:
        """The t5adapt jobs (those submit tagged), oldest first."""
        found = [j for j in self._call(self._client.list_jobs) if (j.metadata or {}).get("t5adapt.kind")]
        return sorted(found, key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        self.info(job_id)
        return self._call(self._client.get_job_logs, job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Write the job's log as it comes until the job ends; its final status."""
        self.info(job_id)

        async def tail():
            async for lines in self._client.tail_job_logs(job_id):
                write(lines)

        self._call(asyncio.run, tail())
        return self.wait(job_id, timeout_s=30)

    def stop(self, job_id: str, timeout_s: float = 60) -> str:
        status = self.info(job_id).status.value
        if status in _TERMINAL:
            return status
        self._call(self._client.stop_job, job_id)
        return self.wait(job_id, timeout_s)

    def wait(self, job_id: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.info(job_id).status.value
            if status in _TERMINAL or time.monotonic() > deadline:
                return status
            time.sleep(1)


def package(files: Dict[str, str]) -> str:
    """A temporary directory holding the project's code and `files` (name -> text): the job's
    working_dir. Nothing else of the working tree (.venv, run roots, data) goes to the cluster."""
    import orchestrator

    project = os.path.dirname(os.path.dirname(os.path.abspath(orchestrator.__file__)))
    folder = tempfile.mkdtemp(prefix="t5adapt-submit-")
    for name in PACKAGES:
        shutil.copytree(os.path.join(project, name), os.path.join(folder, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".*"))
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)
    if size > _MAX_PACKAGE_BYTES:
        shutil.rmtree(folder)
        raise UserError(f"the job package is {size / 2**20:.0f} MiB (orchestrator/ and jobs/ under {project}); "
                        "Ray ships at most about 100 MiB: remove large files from those folders")
    return folder


def forwarded_env() -> Dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    for name in FORWARDED_ENV:
        value = os.environ.get(name)
        if not value:
            continue
        if name == "MLFLOW_TRACKING_URI" and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise UserError("MLFLOW_TRACKING_URI holds a user name or password: submit would ship it to the cluster. "
                            "Give the cluster MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD as secrets instead")
        env[name] = value
    return env


def job_files(kind: str, config: str, overrides: List[str]):
    """(files for the package, the job's name, its submit section, the tracking URI it will use)."""
    from orchestrator.config import load_config, to_yaml

    if kind == "run":
        job = load_config(config, overrides)
        return {"job.yaml": to_yaml(job)}, job.name, job.submit, job.tracking.uri
    from omegaconf import OmegaConf

    from orchestrator.sweep_config import load_sweep

    sweep = load_sweep(config, overrides)
    base = load_config(sweep.run, [])
    shipped = OmegaConf.structured(sweep)
    shipped.run = "run.yaml"
    return {"job.yaml": OmegaConf.to_yaml(shipped), "run.yaml": to_yaml(base)}, sweep.name, sweep.submit, base.tracking.uri


def entrypoint(kind: str, root: Optional[str]) -> str:
    root_arg = shlex.quote(root) if root else '"${T5ADAPT_ROOT:-$HOME/t5adapt-runs}"'
    return f"python -m orchestrator.cli {kind} job.yaml --root {root_arg}"


def submit(kind: str, config: str, overrides: List[str], address: Optional[str], root: Optional[str],
           say: Callable[[str], None] = print) -> str:
    """Validate the config here, then send it as a Ray job; the job's submission id."""
    files, name, section, tracking = job_files(kind, config, overrides)
    cluster = Cluster(resolve_address(address, section.address))
    env = forwarded_env()
    root = root or section.root
    job_id = f"t5adapt-{name}-{uuid.uuid4().hex[:8]}"
    folder = package(files)
    try:
        cluster.submit(entrypoint(kind, root), folder, env,
                       {"t5adapt.kind": kind, "t5adapt.name": name, "t5adapt.config": os.path.basename(config)}, job_id)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tracking = tracking or env.get("MLFLOW_TRACKING_URI")
    say(f"submitted {kind} `{name}` as job {job_id}")
    say(f"  Ray dashboard: {cluster.address}/#/jobs/{job_id}")
    say(f"  MLflow: {tracking}" if tracking else
        f"  MLflow: the SQLite store in the run root on the cluster ({root or '$T5ADAPT_ROOT or ~/t5adapt-runs'}/"
        "mlflow.db); set MLFLOW_TRACKING_URI to a server to browse it from here")
    say(f"  follow it: t5adapt logs {job_id} --follow   stop it: t5adapt stop {job_id}")
    return job_id


def jobs_table(cluster: Cluster) -> str:
    rows = cluster.jobs()
    if not rows:
        return f"no t5adapt jobs on {cluster.address} (submit one: t5adapt submit CONFIG)"
    lines = [f"{'JOB':<40} {'KIND':<6} {'STATUS':<10} {'STARTED':<20} NAME"]
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        lines.append(f"{j.submission_id or j.job_id:<40} {j.metadata['t5adapt.kind']:<6} {j.status.value:<10} "
                     f"{started:<20} {j.metadata.get('t5adapt.name', '')}")
    return "\n".join(lines)


def status_text(cluster: Cluster, job_id: Optional[str]) -> str:
    if job_id is None:
        rows = cluster.jobs()
        if not rows:
            return f"cluster {cluster.address}: reachable; no t5adapt jobs yet"
        job_id = rows[-1].submission_id
    info = cluster.info(job_id)
    text = f"{job_id}: {info.status.value}"
    if info.message:
        text += f" ({info.message.strip()})"
    return text
