"""MLflow tracking: one run per stage, through the MLflow client (explicit runs, no global state).

Default store: a SQLite file in the run root (`sqlite:///<root>/mlflow.db`) with artifacts beside it
in `<root>/mlartifacts`; `mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db` browses it. Any
tracking URI (an MLflow server on a cluster) via `tracking.uri` or $MLFLOW_TRACKING_URI.
"""

import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

_SECRET_WORDS = ("secret", "password", "token", "credential", "access_key")


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


def experiment_id(cfg: TrackingConfig, root: str) -> str:
    """The experiment's id, created on first use (a local store keeps artifacts in <root>/mlartifacts)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, root)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///") and not cfg.uri:
        location = "file://" + os.path.join(os.path.abspath(root), "mlartifacts")
    return client.create_experiment(cfg.experiment, artifact_location=location)


def log_stage_run(cfg: TrackingConfig, root: str, run_name: str, params: Dict[str, str], metrics: Dict[str, float],
                  artifacts: Iterable[str] = (), tags: Optional[Dict[str, str]] = None) -> str:
    """Record one finished stage as an MLflow run; returns its run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg, root))
    run = client.create_run(experiment_id(cfg, root), run_name=run_name, tags=tags or {})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    for path in artifacts:
        client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
