"""Rank 0's MLflow logging for a training run (the driver opens and closes the run; see stage.py).

Metrics go to the run the driver created, keyed by optimizer step, from a background thread: a slow
or unreachable tracking server delays the records, never the step (the other ranks would wait for
rank 0 in the next collective). A restarted worker group replays steps an earlier attempt already
logged; those are not logged again (a resumed run replays them exactly). The tag t5adapt.step is
where this attempt is, which the driver's progress bar follows.
"""

import logging
import math
import queue
import threading
import time

import torch

log = logging.getLogger("t5adapt.train")
FLUSH_TIMEOUT_S = 120.0  # at the end, how long to wait for queued records before giving up on them


class RankZeroTracker:
    def __init__(self, spec, ctx, peak: dict, padded_flops_per_example: float):
        self.spec, self.ctx = spec, ctx
        self.peak_flops = peak["flops"]
        self.padded_flops = padded_flops_per_example
        self.client = None  # no MLflow run: metrics are only derived and returned (bench/gpu_train.py)
        if spec.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        self.run_id = spec.mlflow_run_id
        self.logged_through = self._logged_through()
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="t5adapt-mlflow")
        if self.client:
            self._thread.start()
        self.tag({"t5adapt.device_peak_source": peak["source"],
                    "t5adapt.device_peak_tflops": f"{self.peak_flops / 1e12:.3f}",
                    "t5adapt.flops_per_example": f"{padded_flops_per_example:.4g}"})

    def _logged_through(self) -> int:
        """The last step an earlier attempt logged a loss for (-1: no earlier attempt did)."""
        if not self.client:
            return -1
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=-1)
        except Exception as e:
            log.warning("cannot read the MLflow run's history (%s): replayed steps may be logged twice", e)
            return -1

    def _metrics(self, step: int, values: dict) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]
        for start in range(0, len(finite), 900):  # MLflow takes at most 1000 metrics per batch
            self._queue.put({"metrics": finite[start:start + 900]})

    def tag(self, tags: dict) -> None:
        """Set run tags (values become strings)."""
        if not self.client:
            return
        from mlflow.entities import RunTag

        self._queue.put({"tags": [RunTag(k, str(v)) for k, v in tags.items()]})

    def _drain(self) -> None:
        """The logging thread: send each batch in order. A tracking store that is down must not kill
        training (Ray would restart it for nothing): failures are logged and dropped."""
        while True:
            batch = self._queue.get()
            try:
                if batch is not None:
                    self.client.log_batch(self.run_id, **batch)
            except Exception as e:
                log.warning("MLflow logging failed (%s); training goes on", e)
            finally:
                self._queue.task_done()
            if batch is None:
                return

    def close(self) -> None:
        """Send what is queued (up to FLUSH_TIMEOUT_S), then stop the thread."""
        if not self.client or not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(FLUSH_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("MLflow did not take the last %d record batches within %.0f s; they are dropped",
                        self._queue.qsize(), FLUSH_TIMEOUT_S)

    def started(self, state: dict, counts: dict) -> None:
        """Once per attempt: where it starts, and (after a restart) from which checkpoint."""
        self.tag({"t5adapt.step": state["step"]})
        if state["step"] > self.logged_through:
            self._metrics(state["step"], {"params_trainable": counts["trainable"], "params_frozen": counts["frozen"]})
        if state["resumed_from"] is not None or self.logged_through >= 0:
            # One value per restart: where it resumed from (0: no intact checkpoint was left).
            resumed = state["resumed_from"] or 0
            self._metrics(state["step"], {"resumed_from_step": resumed})
            self.tag({"t5adapt.resumed_from_step": resumed})

    def phase_change(self, step: int, counts: dict) -> None:
        """The cross-attention warm-up ended: everything trains from here."""
        if step > self.logged_through:
            self._metrics(step, {"params_trainable": counts["trainable"], "params_frozen": counts["frozen"]})

    def log(self, step: int, metrics: dict, by_denoiser: torch.Tensor) -> dict:
        """Log one window's metrics (already reduced across ranks); returns the derived ones."""
        extra = {}
        for name, (loss_sum, count) in zip(self.spec.denoiser_names, by_denoiser.tolist()):
            if count:
                extra[f"loss_by_denoiser/{name}"] = loss_sum / count
        padded = self.padded_flops * metrics["examples_per_s"]
        devices = self.peak_flops * self.ctx.world_size
        extra["model_tflops_per_s"] = padded / 1e12
        extra["mfu"] = padded / devices
        extra["mfu_real"] = metrics["model_tflops_per_s_real"] * 1e12 / devices
        if step > self.logged_through:
            self._metrics(step, {**metrics, **extra})
        self.tag({"t5adapt.step": step})
        return extra

    def evaluated(self, step: int, heldout_loss: float) -> None:
        if step > self.logged_through:
            self._metrics(step, {"heldout_loss": heldout_loss})

    def checkpointed(self, step: int, uri: str) -> None:
        self.tag({"t5adapt.last_checkpoint": uri, "t5adapt.last_checkpoint_step": step})
        if step > self.logged_through:
            self._metrics(step, {"checkpoint_step": step})

    def finished(self, state: dict) -> None:
        self.tag({"t5adapt.final_step": state["step"], "t5adapt.skipped_steps": state["skipped_steps"]})
