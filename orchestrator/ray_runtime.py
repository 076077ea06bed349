"""Starting or joining Ray: an embedded local cluster by default, a real one via RAY_ADDRESS."""

import os


def ensure_ray(address: str = None) -> None:
    """Connect once per process: `address`, else $RAY_ADDRESS, else start a local cluster.

    A local cluster takes $T5ADAPT_NUM_CPUS CPUs (default: all of this machine's).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    num_cpus = int(os.environ.get("T5ADAPT_NUM_CPUS", os.cpu_count() or 1))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
