"""Rank 0's MLflow logging never holds up a training step: records go out from a background thread,
in order, and a tracking server that stalls delays only them. The server here speaks the two MLflow
REST calls the tracker makes and holds every log-batch request until the test lets it answer."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import torch

from jobs.train.tracker import RankZeroTracker


class _StallingMlflow(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, history_steps=()):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()
        self.arrived = threading.Event()
        self.batches = []
        self.history_steps = list(history_steps)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # metrics/get-history: what an earlier attempt logged
        metrics = [{"key": "loss", "value": 1.0, "timestamp": 0, "step": s} for s in self.server.history_steps]
        self._reply({"metrics": metrics})

    def do_POST(self):  # runs/log-batch: held until the test releases the server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.arrived.set()
        self.server.release.wait(60)
        self.server.batches.append(body)
        self._reply({})


def _tracker(server):
    spec = SimpleNamespace(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}", mlflow_run_id="run1",
                           denoiser_names=["R", "S"])
    ctx = SimpleNamespace(world_size=2)
    return RankZeroTracker(spec, ctx, {"flops": 1e12, "source": "test"}, padded_flops_per_example=1e9)


def _metrics(loss):
    return {"loss": loss, "examples_per_s": 10.0, "model_tflops_per_s_real": 0.004}


def test_logging_returns_while_the_server_stalls_and_sends_everything_in_order():
    server = _StallingMlflow()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracker = _tracker(server)
        assert server.arrived.wait(30)  # the first record (the tags) is stuck in the server
        for step in range(1, 51):
            extra = tracker.log(step, _metrics(5.0 - step / 100), torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
        # Fifty steps logged while the server has answered nothing: the caller never waited on it.
        assert server.batches == []
        assert extra["mfu"] == 10.0 * 1e9 / 2e12 and extra["mfu_real"] == 0.004e12 / 2e12
        server.release.set()
        tracker.close()
    finally:
        server.shutdown()
    logged = [(m["step"], m["value"]) for b in server.batches for m in b.get("metrics", []) if m["key"] == "loss"]
    assert logged == [(step, 5.0 - step / 100) for step in range(1, 51)]
    steps = [int(t["value"]) for b in server.batches for t in b.get("tags", []) if t["key"] == "t5adapt.step"]
    assert steps == list(range(1, 51))


def test_a_restarted_attempt_logs_replayed_steps_once_and_says_where_it_resumed():
    server = _StallingMlflow(history_steps=[1, 2, 3, 4, 5, 6])  # an earlier attempt logged steps 1-6
    server.release.set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracker = _tracker(server)
        tracker.started({"step": 0, "resumed_from": None}, {"trainable": 10, "frozen": 0})  # no checkpoint left
        for step in range(1, 9):
            tracker.log(step, _metrics(1.0), torch.zeros(2, 2))
        tracker.close()
    finally:
        server.shutdown()
    logged = sorted(m["step"] for b in server.batches for m in b.get("metrics", []) if m["key"] == "loss")
    assert logged == [7, 8]
    tags = {t["key"]: t["value"] for b in server.batches for t in b.get("tags", [])}
    assert tags["t5adapt.resumed_from_step"] == "0" and tags["t5adapt.step"] == "8"
