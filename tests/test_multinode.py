"""Two Ray nodes on this machine: a head, and a second node joined with `ray start --address` in its
own mount namespace, where a directory the head writes to is hidden under an empty tmpfs (the way
two machines' local disks differ). A tiny run with its stages on S3 (moto on 127.0.0.1) trains with
one rank on each node; a run whose store is a local directory the second node cannot see is
refused before any stage runs."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import SMALL_EVALUATE, free_port_range, free_ports, ray_node_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SMALL = ["train.zero_stage=2", "train.max_steps=2", "train.checkpoint_every_steps=2", "train.cpus_per_worker=1",
         *SMALL_EVALUATE]


def _session_processes(sid):
    return subprocess.run(["pgrep", "-s", str(sid)], stdout=subprocess.PIPE, text=True).stdout.split()


def _state(cluster, resource, filters=()):
    """Ray's state API (nodes, actors) over the dashboard's HTTP API, with the token header."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=cluster["dashboard"], headers={"Authorization": f"Bearer {cluster['token']}"})
    return client.list(StateResource(resource), options=ListApiOptions(filters=list(filters), detail=True, limit=1000),
                       raise_on_missing_output=False)


@pytest.fixture(scope="module")
def two_nodes(s3_endpoint):
    """The head (2 CPUs) and the second node (2 CPUs, `hidden` not shared), token auth on. The runs
    are `t5adapt run` subprocesses with RAY_ADDRESS set, as on a cluster's head."""
    if shutil.which("unshare") is None:
        pytest.fail("the multi-node test needs util-linux's unshare (and root) for the second node's own mounts")
    state = tempfile.mkdtemp(prefix="t5n-", dir="/tmp")  # short: Ray's socket paths are limited
    hidden = os.path.join(state, "node-local")
    os.makedirs(hidden)
    token_path = os.path.join(state, "auth_token")
    with open(token_path, "w") as f:
        f.write("multinode-test-token\n")
    gcs, dashboard = free_ports(2)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=token_path)
    env.pop("RAY_ADDRESS", None)
    cluster = {"state": state, "hidden": hidden, "dashboard": f"http://127.0.0.1:{dashboard}",
               "token": "multinode-test-token", "env": dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}")}
    head_base = free_port_range()
    node_base = free_port_range(start=head_base + 1000)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--block"]
    head = subprocess.Popen(["setsid", "ray", "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), "--temp-dir", os.path.join(state, "ray")]
                            + common + ray_node_ports(head_base),
                            env=env, stdout=open(os.path.join(state, "head.log"), "w"), stderr=subprocess.STDOUT)
    node = None
    try:
        _wait(lambda: _alive(cluster) >= 1, head, os.path.join(state, "head.log"))
        joined = " ".join(["ray", "start", "--address", f"127.0.0.1:{gcs}"] + common + ray_node_ports(node_base))
        node = subprocess.Popen(["setsid", "unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 f"mount -t tmpfs none {hidden} && exec {joined}"],
                                env=env, stdout=open(os.path.join(state, "node.log"), "w"), stderr=subprocess.STDOUT)
        _wait(lambda: _alive(cluster) == 2, node, os.path.join(state, "node.log"))
        yield cluster
    finally:
        for process in (node, head):
            if process is not None:
                subprocess.run(["pkill", "-TERM", "-s", str(process.pid)])
        for process in (node, head):
            if process is not None:
                for _ in range(15):
                    if not _session_processes(process.pid):
                        break
                    time.sleep(1)
                subprocess.run(["pkill", "-KILL", "-s", str(process.pid)])
        shutil.rmtree(state, ignore_errors=True)


def _alive(cluster):
    try:
        return sum(n.state == "ALIVE" for n in _state(cluster, "nodes"))
    except Exception:  # the dashboard is not up yet
        return 0


def _wait(predicate, process, log, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert process.poll() is None and time.monotonic() < deadline, open(log).read()[-3000:]
        time.sleep(2)


def _run(cluster, root, *overrides):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", TINY, "--root", root, *overrides, *SMALL],
                          cwd=REPO, env=cluster["env"], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=900)


def test_a_local_store_the_other_node_cannot_see_is_refused_before_any_stage(two_nodes, tmp_path):
    store = two_nodes["hidden"]
    run = _run(two_nodes, str(tmp_path / "root"), f"store={store}", "train.num_workers=2")
    assert run.returncode == 2, run.stdout[-3000:]
    assert f"store {store} is a local directory that 1 of the cluster's 2 nodes do not see" in run.stdout
    assert "s3://" in run.stdout and "Traceback" not in run.stdout
    assert os.listdir(store) == []  # no stage started, the marker is gone


def test_a_run_on_s3_trains_with_a_rank_on_each_node(two_nodes, tmp_path):
    import boto3

    from orchestrator import ledger

    boto3.client("s3").create_bucket(Bucket="multinode")
    root = str(tmp_path / "root")
    run = _run(two_nodes, root, "store=s3://multinode/stages", "train.num_workers=2",
               "train.placement_strategy=STRICT_SPREAD")
    assert run.returncode == 0, run.stdout[-3000:]
    workers = _state(two_nodes, "actors", [("class_name", "=", "RayTrainWorker")])
    assert len({w.node_id for w in workers}) == 2, [(w.node_id, w.state) for w in workers]
    stages = ledger.read(os.path.join(root, "tiny"))["stages"]
    assert {name: entry["state"] for name, entry in stages.items()} == {
        name: "done" for name in ("prepare", "adapt", "train", "evaluate", "export")}
    train = stages["train"]["output"][len("s3://multinode/"):]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="multinode", Prefix=train + "/")["Contents"]]
    shards = {k.rsplit("/", 1)[-1] for k in keys if "/checkpoints/" in k}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards, shards
