"""The S3 endpoint dies in the middle of a checkpoint upload and comes back: the run retries (botocore's
standard retry mode) and finishes, and no checkpoint missing a file is ever marked committed.

The endpoint the run talks to is a TCP proxy in front of moto's server. At the first PUT of a
checkpoint file it resets every open connection without forwarding that request, closes its
listening socket (connections are refused) for OUTAGE_S seconds, then listens again on the same port.
"""

import os
import socket
import subprocess
import sys
import threading
import time

from tests.helpers import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
OUTAGE_S = 8
SMALL = ["train.num_workers=1", "train.zero_stage=0", "train.max_steps=4", "train.checkpoint_every_steps=2",
         "evaluate.max_examples=8", "evaluate.probe_passages=2", "evaluate.cost_repeats=1", "evaluate.num_samples=1",
         "evaluate.probe_prefix_tokens=16", "evaluate.probe_target_tokens=8", "evaluate.cost_input_tokens=16",
         "evaluate.cost_output_tokens=4", "evaluate.sample_new_tokens=4"]


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


def test_an_s3_outage_mid_checkpoint_is_retried_and_no_partial_checkpoint_is_committed(s3_endpoint, tmp_path):
    import boto3

    from jobs.train import checkpoints
    from orchestrator import ledger

    boto3.client("s3").create_bucket(Bucket="faults")
    endpoint = DyingEndpoint(s3_endpoint, trigger=b"/checkpoints/step-000002/")
    root = str(tmp_path / "root")
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{endpoint.port}", T5ADAPT_NUM_CPUS="2")
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", TINY, "--root", root,
                          "store=s3://faults/stages"] + SMALL, cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert endpoint.fired_at is not None, "the run never uploaded a checkpoint file"
    assert run.returncode == 0, run.stdout[-4000:]
    # The request that died with the endpoint was sent again once it was back.
    path = endpoint.dropped.split(" ")[1].split("?")[0]
    assert any(line.split(" ")[1].split("?")[0] == path for line in endpoint.after if line.startswith("PUT ")), \
        (endpoint.dropped, endpoint.after[:10])

    train = ledger.read(os.path.join(root, "tiny"))["stages"]["train"]
    assert train["state"] == "done" and train["step"] == 4
    steps = checkpoints.committed_steps(train["output"])
    assert 4 in steps, steps
    for step in steps:  # every committed checkpoint has every file its manifest lists, intact
        assert checkpoints.damage(train["output"], step) is None, step
