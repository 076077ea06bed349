"""Starting or joining Ray: an embedded local cluster by default, a real one via RAY_ADDRESS."""

import os

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
