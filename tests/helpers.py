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


def free_ports(count):
    """`count` distinct TCP ports free on 127.0.0.1 now."""
    import socket

    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port_range(size=220, start=20000, avoid=()):
    """BASE such that BASE .. BASE+size-1 are free on 127.0.0.1 now (a Ray node's own ports: see
    cluster/local/up.sh's T5ADAPT_RAY_PORTS_BASE); ranges starting in `avoid` are skipped."""
    import socket

    for base in range(start, 32000, 1000):  # below the ephemeral ports the OS hands out
        if base in avoid:
            continue
        held = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free range of ports")


def ray_node_ports(base):
    """`ray start` options putting a node's own ports at BASE, BASE+1, ... (as up.sh does)."""
    return ["--ray-client-server-port", str(base), "--node-manager-port", str(base + 1), "--object-manager-port",
            str(base + 2), "--dashboard-agent-listen-port", str(base + 3), "--dashboard-agent-grpc-port", str(base + 4),
            "--metrics-export-port", str(base + 5), "--runtime-env-agent-port", str(base + 6),
            "--min-worker-port", str(base + 10), "--max-worker-port", str(base + 200)]


# A small evaluation for end-to-end runs of configs/tiny.yaml: a few examples, passages and tokens.
SMALL_EVALUATE = ["evaluate.max_examples=8", "evaluate.probe_passages=2", "evaluate.cost_repeats=1",
                  "evaluate.num_samples=1", "evaluate.probe_prefix_tokens=16", "evaluate.probe_target_tokens=8",
                  "evaluate.cost_input_tokens=16", "evaluate.cost_output_tokens=4", "evaluate.sample_new_tokens=4"]
