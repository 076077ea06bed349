"""Small helpers the end-to-end tests share: file snapshots and a root's MLflow runs."""

import os


def files(folder):
    """{relative path: (size, mtime_ns)} of every file under `folder`."""
    found = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(directory, name))
            found[os.path.relpath(os.path.join(directory, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


def mlflow_runs(root):
    """(client, experiment, every run) of the t5adapt experiment in ROOT/mlflow.db."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{os.path.abspath(root)}/mlflow.db")
    experiment = client.get_experiment_by_name("t5adapt")
    return client, experiment, client.search_runs([experiment.experiment_id], max_results=1000)
