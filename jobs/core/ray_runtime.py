"""Starting or joining Ray: an embedded local cluster by default, a real one via RAY_ADDRESS."""

import os

from jobs.core.errors import UserError

# Logical CPUs the embedded cluster must offer, set by the controller before any job starts Ray
# (training workers plus a slot for Ray Data's readers); the first job to need Ray starts it.
_LOCAL_MIN_CPUS = [1]


def machine_cpus() -> int:
    """CPUs the embedded cluster may use: $T5ADAPT_NUM_CPUS, else all of this machine's."""
    return int(os.environ.get("T5ADAPT_NUM_CPUS", os.cpu_count() or 1))


def reserve_local_cpus(num_cpus: int) -> None:
    """Make an embedded cluster started later in this process offer at least `num_cpus` logical CPUs."""
    _LOCAL_MIN_CPUS[0] = max(_LOCAL_MIN_CPUS[0], num_cpus)


def ensure_ray(address: str = None, min_cpus: int = 1, dashboard: bool = False) -> None:
    """Connect once per process: `address`, else $RAY_ADDRESS, else start a local cluster.

    A local cluster takes machine_cpus() CPUs, but at least `min_cpus` (and what was reserved)
    logical CPUs: the data readers' slot may oversubscribe a small machine by one (Ray's CPUs are
    scheduling slots, not pinned cores); the controller refuses anything beyond that up front.
    dashboard: start the dashboard (on 127.0.0.1), whose state API Ray Train's placement-group
    cleaner needs to free the workers of a run whose driver was killed (a sweep's stopped trial).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    num_cpus = max(min_cpus, _LOCAL_MIN_CPUS[0], machine_cpus())
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False)


def _sees(path: str, nonce: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == nonce
    except OSError:
        return False


def check_shared_storage(path: str, what: str) -> None:
    """On a cluster of several nodes, a local directory that stage outputs and checkpoints go to must
    be one every node sees (NFS, a shared volume): a marker written here is read back on every alive
    node. Else a UserError before any stage runs: ranks on other nodes would find each other's
    checkpoint files missing and take the checkpoint for damaged."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    nonce = uuid.uuid4().hex
    marker = os.path.join(os.path.abspath(path), f".t5adapt-shared-{nonce}")
    with open(marker, "w") as f:
        f.write(nonce)
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(marker, nonce) for n in nodes], timeout=300)
    finally:
        os.remove(marker)
    blind = [n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise UserError(f"{what} {path} is a local directory that {len(blind)} of the cluster's {len(nodes)} nodes "
                        f"do not see ({', '.join(blind)}): ranks there could not read the checkpoints. Put it on "
                        "s3:// (store=s3://BUCKET/PREFIX) or on a directory every node mounts (NFS, a shared volume)")
