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

from orchestrator.cli import main
from tests.helpers import free_port_range, free_ports, ray_node_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SMALL = ["train.zero_stage=2", "train.max_steps=2", "train.checkpoint_every_steps=2", "train.cpus_per_worker=1",
         "evaluate.max_examples=8", "evaluate.probe_passages=2", "evaluate.cost_repeats=1", "evaluate.num_samples=1",
         "evaluate.probe_prefix_tokens=16", "evaluate.probe_target_tokens=8", "evaluate.cost_input_tokens=16",
         "evaluate.cost_output_tokens=4", "evaluate.sample_new_tokens=4"]


def _session_processes(sid):
    return subprocess.run(["pgrep", "-s", str(sid)], stdout=subprocess.PIPE, text=True).stdout.split()


@pytest.fixture(scope="module")
def two_nodes(s3_endpoint):
    import ray

    if shutil.which("unshare") is None:
        pytest.fail("the multi-node test needs util-linux's unshare (and root) for the second node's own mounts")
    assert not ray.is_initialized()
    state = tempfile.mkdtemp(prefix="t5n-", dir="/tmp")  # short: Ray's socket paths are limited
    hidden = os.path.join(state, "node-local")
    os.makedirs(hidden)
    token = os.path.join(state, "auth_token")
    with open(token, "w") as f:
        f.write("multinode-test-token\n")
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    gcs, dashboard = free_ports(2)
    head_base = free_port_range()
    node_base = free_port_range(start=head_base + 1000)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--block"]
    head = subprocess.Popen(["setsid", "ray", "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), "--temp-dir", os.path.join(state, "ray")]
                            + common + ray_node_ports(head_base),
                            env=env, stdout=open(os.path.join(state, "head.log"), "w"), stderr=subprocess.STDOUT)
    node = None
    try:
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False) if _wait_gcs(gcs, head, state) else None
        joined = " ".join(["ray", "start", "--address", f"127.0.0.1:{gcs}"] + common + ray_node_ports(node_base))
        node = subprocess.Popen(["setsid", "unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 f"mount -t tmpfs none {hidden} && exec {joined}"],
                                env=env, stdout=open(os.path.join(state, "node.log"), "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert node.poll() is None and time.monotonic() < deadline, open(os.path.join(state, "node.log")).read()
            time.sleep(1)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        yield {"state": state, "hidden": hidden, "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        ray.shutdown()
        for process in (node, head):
            if process is not None:
                subprocess.run(["pkill", "-TERM", "-s", str(process.pid)])
        for process in (node, head):
            if process is not None:
                for _ in range(30):
                    if not _session_processes(process.pid):
                        break
                    time.sleep(1)
                subprocess.run(["pkill", "-KILL", "-s", str(process.pid)])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(state, ignore_errors=True)


def _wait_gcs(port, head, state):
    import socket

    deadline = time.monotonic() + 120
    while True:
        assert head.poll() is None and time.monotonic() < deadline, open(os.path.join(state, "head.log")).read()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(3)  # the GCS answers before the head's raylet has registered
                return True
        time.sleep(1)


def test_a_local_store_the_other_node_cannot_see_is_refused_before_any_stage(two_nodes, tmp_path, capsys):
    store = two_nodes["hidden"]
    code = main(["run", TINY, "--root", str(tmp_path / "root"), f"store={store}", "train.num_workers=2"] + SMALL)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"store {store} is a local directory that 1 of the cluster's 2 nodes do not see" in err
    assert "s3://" in err and "Traceback" not in err
    assert os.listdir(store) == []  # no stage started, the marker is gone


def test_a_run_on_s3_trains_with_a_rank_on_each_node(two_nodes, tmp_path):
    import boto3
    from ray.util.state import list_actors

    boto3.client("s3").create_bucket(Bucket="multinode")
    root = str(tmp_path / "root")
    code = main(["run", TINY, "--root", root, "store=s3://multinode/stages", "train.num_workers=2",
                 "train.placement_strategy=STRICT_SPREAD"] + SMALL)
    assert code == 0
    workers = list_actors(address=two_nodes["dashboard"], filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, limit=100)
    assert len({w.node_id for w in workers}) == 2, [(w.node_id, w.state) for w in workers]
    from orchestrator import ledger

    stages = ledger.read(os.path.join(root, "tiny"))["stages"]
    assert {name: entry["state"] for name, entry in stages.items()} == {
        name: "done" for name in ("prepare", "adapt", "train", "evaluate", "export")}
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="multinode", Prefix="stages/")["Contents"]]
    train = stages["train"]["output"][len("s3://multinode/"):]
    shards = {k.rsplit("/", 1)[-1] for k in keys if k.startswith(train + "/checkpoints/") and "rank" in k}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards, shards
