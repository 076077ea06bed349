"""The S3 endpoint dies in the middle of a checkpoint upload and comes back: the run retries (botocore's
standard retry mode), and no checkpoint missing a file is ever marked committed. Then the controller
is killed and resumes, everything on S3.

The endpoint the run talks to is a TCP proxy in front of moto's server. At the first PUT of a
checkpoint file it resets every open connection without forwarding that request, closes its
listening socket (connections are refused) for OUTAGE_S seconds, then listens again on the same port.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.helpers import SMALL_EVALUATE, free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
OUTAGE_S = 8
SMALL = ["train.num_workers=1", "train.zero_stage=0", "train.max_steps=8", "train.checkpoint_every_steps=2",
         *SMALL_EVALUATE]


class DyingEndpoint:
    """A TCP proxy to `backend` that dies once, at the first request whose bytes contain `trigger`."""

    def __init__(self, backend: str, trigger: bytes):
        host, port = backend.rsplit("//", 1)[-1].split(":")
        self.backend = (host, int(port))
        self.trigger = trigger
        self.port = free_ports(1)[0]
        self.fired_at = None
        self.dropped = None  # the request line that was never forwarded
        self.after = []  # request lines seen after coming back
        self._connections = []
        self._lock = threading.Lock()
        self._listen()

    def _listen(self):
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(64)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed: the endpoint is down
            upstream = socket.create_connection(self.backend)
            with self._lock:
                self._connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, sink, from_client):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_client and self.fired_at is None and self.trigger in data and data.startswith(b"PUT "):
                    self.dropped = data.split(b"\r\n", 1)[0].decode()
                    self._die()
                    return
                if from_client and self.fired_at is not None and data[:4] in (b"PUT ", b"GET ", b"HEAD"):
                    self.after.append(data.split(b"\r\n", 1)[0].decode())
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def _die(self):
        self.fired_at = time.monotonic()
        self._server.close()
        with self._lock:
            for s in self._connections:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                    s.close()
                except OSError:
                    pass
            self._connections = []
        threading.Timer(OUTAGE_S, self._listen).start()


def _objects(prefix):
    """{key: ETag} of every object under s3://faults/PREFIX (read from moto directly)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="faults", Prefix=prefix + "/")
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_s3_outage_mid_checkpoint_then_a_killed_controller_resumes_and_no_partial_checkpoint_is_committed(
        s3_endpoint, tmp_path):
    """Every stage on S3. The endpoint dies during the first checkpoint's upload and comes back: the
    upload is retried and the checkpoint committed whole. The controller is then SIGKILLed (with its
    Ray cluster) and the same command run again: prepare and adapt are reused untouched, training
    resumes from a checkpoint in its own MLflow run, and every committed checkpoint is complete."""
    import boto3

    from jobs.train import checkpoints
    from orchestrator import ledger
    from tests.helpers import mlflow_runs

    boto3.client("s3").create_bucket(Bucket="faults")
    endpoint = DyingEndpoint(s3_endpoint, trigger=b"/checkpoints/step-000002/")
    root = str(tmp_path / "root")
    # A short lock lease: the killed controller's S3 stage lock is taken over after 10 s, not 60.
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{endpoint.port}", T5ADAPT_NUM_CPUS="2",
               T5ADAPT_LOCK_LEASE_S="10")
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "orchestrator.cli", "run", TINY, "--root", root, "store=s3://faults/stages"] + SMALL
    log = open(tmp_path / "first.log", "w+")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def train_output():
        path = os.path.join(root, "tiny", "ledger.json")
        return (ledger.read(os.path.join(root, "tiny"))["stages"].get("train") or {}).get("output") \
            if os.path.exists(path) else None

    try:
        deadline = time.monotonic() + 600
        while not (endpoint.fired_at and train_output() and checkpoints.committed_steps(train_output())):
            assert process.poll() is None and time.monotonic() < deadline, open(tmp_path / "first.log").read()[-3000:]
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    # The request that died with the endpoint was sent again once it was back.
    path = endpoint.dropped.split(" ")[1].split("?")[0]
    assert any(line.split(" ")[1].split("?")[0] == path for line in endpoint.after if line.startswith("PUT ")), \
        (endpoint.dropped, endpoint.after[:10])
    stages = ledger.read(os.path.join(root, "tiny"))["stages"]
    assert stages["train"]["state"] == "running"  # killed mid-stage
    kept = {name: _objects(stages[name]["output"][len("s3://faults/"):]) for name in ("prepare", "adapt")}
    assert all(kept.values())

    again = subprocess.run(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-4000:]
    stages = ledger.read(os.path.join(root, "tiny"))["stages"]
    assert {name: entry["state"] for name, entry in stages.items()} == {
        "prepare": "reused", "adapt": "reused", "train": "done", "evaluate": "done", "export": "done"}
    assert {name: _objects(stages[name]["output"][len("s3://faults/"):]) for name in ("prepare", "adapt")} == kept
    client, _, runs = mlflow_runs(root)
    train_runs = [r for r in runs if r.info.run_name == "tiny/train"]
    assert len(train_runs) == 1  # the resumed training continued its own MLflow run
    resumed = [m.value for m in client.get_metric_history(train_runs[0].info.run_id, "resumed_from_step")]
    assert resumed and resumed[-1] >= 2, resumed  # from a checkpoint, not from step 0
    train = stages["train"]["output"]
    steps = checkpoints.committed_steps(train)
    assert steps and steps[0] == 8, steps
    for step in steps:  # every committed checkpoint has every file its manifest lists, intact
        assert checkpoints.damage(train, step) is None, step
