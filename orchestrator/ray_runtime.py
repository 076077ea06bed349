"""Starting or joining Ray: an embedded local cluster by default, a real one via RAY_ADDRESS."""

import os


def ensure_ray(address: str = None, min_cpus: int = 1) -> None:
    """Connect once per process: `address`, else $RAY_ADDRESS, else start a local cluster.

    A local cluster takes $T5ADAPT_NUM_CPUS CPUs (default: all of this machine's), but at least
    `min_cpus` logical CPUs: training workers plus Ray Data's readers must all fit, even where that
    oversubscribes a small machine (Ray's CPUs are scheduling slots, not pinned cores).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    num_cpus = max(min_cpus, int(os.environ.get("T5ADAPT_NUM_CPUS", os.cpu_count() or 1)))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
