"""MLflow tracking: one run per stage, through the MLflow client (explicit runs, no global state).

Default store: a SQLite file in the run root (`sqlite:///<root>/mlflow.db`) with artifacts beside it
in `<root>/mlartifacts`; `mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db` browses it. Any
tracking URI (an MLflow server on a cluster) via `tracking.uri` or $MLFLOW_TRACKING_URI.
"""

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

from jobs.core.errors import UserError

_SECRET_WORDS = ("secret", "password", "token", "credential", "access_key")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    experiment: str = "t5adapt"


def tracking_uri(cfg: TrackingConfig, root: str) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(root)}/mlflow.db"


def flatten(prefix: str, value) -> Dict[str, str]:
    """Nested config -> {"data.encoder_length": "512", ...}; keys that look like secrets are dropped."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    if any(word in prefix.lower() for word in _SECRET_WORDS):
        return {}
    return {prefix: str(value)[:6000]}  # MLflow's parameter value limit


def client(cfg: TrackingConfig, root: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg, root))


@contextlib.contextmanager
def _creating(uri: str):
    """One process at a time creates a local SQLite store: two controllers starting together on a new
    root would both run MLflow's schema migrations, and the second fails on a table that exists."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".create-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_store(cfg: TrackingConfig, root: str) -> None:
    """Fail before any work when the tracking store cannot be used (a typo'd URI, a server that is
    down), naming the URI and the fix: finding out after hours of training helps nobody."""
    if not cfg.enabled:
        return
    uri = tracking_uri(cfg, root)
    scheme = uri.split(":", 1)[0] if ":" in uri else "file"
    known = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
    if not any(scheme.startswith(k) for k in known):
        raise UserError(f"tracking.uri={uri} has an unknown scheme {scheme!r}: use sqlite:///PATH/mlflow.db, "
                        "http(s)://SERVER, or tracking.enabled=false")
    try:
        with _creating(uri):
            experiment_id(cfg, root)
    except Exception as e:  # any store failure: say which store and what it answered
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot use the MLflow store {uri}: {reason[:300]} (check tracking.uri / "
                        "$MLFLOW_TRACKING_URI, or set tracking.enabled=false)") from None


def experiment_id(cfg: TrackingConfig, root: str) -> str:
    """The experiment's id, created on first use (a local store keeps artifacts in <root>/mlartifacts).

    It is tagged as a model-development experiment (MLflow's own marker for training runs). MLflow
    3.17's UI still opens an experiment on the view its sidebar switch last chose (GenAI by default):
    `t5adapt ui` prints the runs-table URL (?workflowType=machine_learning)."""
    uri = tracking_uri(cfg, root)
    mlflow = client(cfg, root)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            mlflow.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///") and not cfg.uri:
        location = "file://" + os.path.join(os.path.abspath(root), "mlartifacts")
    return mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def find_run(cfg: TrackingConfig, root: str, tags: Dict[str, str]) -> Optional[str]:
    """The id of the newest run carrying all these tags, or None (a re-run reuses, never duplicates)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(cfg, root).search_runs([experiment_id(cfg, root)], filter_string=query, max_results=1,
                                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def start_run(cfg: TrackingConfig, root: str, run_name: str, tags: Dict[str, str], parent_id: Optional[str] = None,
              params: Optional[Dict[str, str]] = None) -> str:
    """Create a run (nested under `parent_id` when given) with its tags and params; returns its id."""
    from mlflow.entities import Param, RunTag

    mlflow = client(cfg, root)
    tags = dict(tags, **({"mlflow.parentRunId": parent_id} if parent_id else {}))
    run_id = mlflow.create_run(experiment_id(cfg, root), run_name=run_name, tags=tags).info.run_id
    items = [Param(k, v) for k, v in sorted((params or {}).items())]
    for start in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
        mlflow.log_batch(run_id, params=items[start:start + 90])
    mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id


def finish_run(cfg: TrackingConfig, root: str, run_id: str, status: str, metrics: Optional[Dict[str, float]] = None,
               tags: Optional[Dict[str, str]] = None, artifacts: Iterable[str] = ()) -> None:
    """Log a run's final metrics, tags and artifact files, and set its status (FINISHED, FAILED, KILLED)."""
    from mlflow.entities import Metric, RunTag

    mlflow = client(cfg, root)
    now = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()])
    for path in artifacts:
        mlflow.log_artifact(run_id, path)
    mlflow.set_terminated(run_id, status)
