"""Run a function on W real torch.distributed ranks (gloo, DeepSpeed's CPU accelerator) without Ray.

For tests of what the training loop and DeepSpeed do across ranks (loss normalisation, exports of
sharded optimizers), where starting Ray Train would only add a minute. Each rank is a fresh spawned
process, so DeepSpeed's module-level state never leaks between calls.
"""

import multiprocessing
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 600) -> List[Any]:
    """[fn(rank, world_size, *args) for every rank], each rank in its own process inside one gloo
    process group. `fn` must be importable (a module-level function). Raises RuntimeError with the
    failing rank's traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected, failures = {}, []
    try:
        deadline = time.monotonic() + timeout_s
        for _ in range(world_size):  # every rank's outcome: the first failure is often only the echo of another
            rank, ok, value = _next_result(results, processes, deadline)
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
        if failures:
            raise RuntimeError("\n".join(failures))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world_size)]


def _next_result(results, processes, deadline: float):
    """The next rank's (rank, ok, value); a rank that died without reporting (a crash in native
    code) fails at once instead of after the whole timeout."""
    while True:
        try:
            return results.get(timeout=2)
        except queue.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"ranks died without a result (rank, exit code): {dead}" if dead else
                                   "no result before the timeout") from None


def _rank_main(fn, rank, world_size, port, args, results):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    sys.path.insert(0, REPO)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        dist.barrier()
        # Plain pickle bytes: the queue's own pickler would pass tensors as shared memory, which is
        # gone once this process exits.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: B902 - the parent must hear about any failure, not time out
        results.put((rank, False, traceback.format_exc()))
