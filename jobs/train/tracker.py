"""Rank 0's MLflow logging for a training run (the driver opens and closes the run; see stage.py).

Metrics go to the run the driver created, keyed by optimizer step. A restarted worker group logs
the replayed steps again; MLflow keeps every value, and the latest per step is the one that counts.
"""

import logging
import math
import time

import torch

log = logging.getLogger("t5adapt.train")


class RankZeroTracker:
    def __init__(self, spec, ctx, peak: dict, flops_per_example: float):
        from mlflow.tracking import MlflowClient

        self.spec, self.ctx = spec, ctx
        self.peak_flops = peak["flops"]
        self.flops_per_example = flops_per_example
        self.client = MlflowClient(tracking_uri=spec.tracking_uri) if spec.mlflow_run_id else None
        self.run_id = spec.mlflow_run_id
        self._tags({"t5adapt.device_peak_source": peak["source"],
                    "t5adapt.device_peak_tflops": f"{self.peak_flops / 1e12:.3f}",
                    "t5adapt.flops_per_example": f"{flops_per_example:.4g}"})

    def _metrics(self, step: int, values: dict) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]
        for start in range(0, len(finite), 900):  # MLflow takes at most 1000 metrics per batch
            self._send(metrics=finite[start:start + 900])

    def _send(self, **batch) -> None:
        """A tracking store that is down must not kill training (Ray would restart it for nothing)."""
        try:
            self.client.log_batch(self.run_id, **batch)
        except Exception as e:
            log.warning("MLflow logging failed (%s); training goes on", e)

    def _tags(self, tags: dict) -> None:
        if not self.client:
            return
        from mlflow.entities import RunTag

        self._send(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def started(self, state: dict, counts: dict) -> None:
        self._metrics(state["step"], {"params_trainable": counts["trainable"], "params_frozen": counts["frozen"]})
        if state["resumed_from"] is not None:
            # One value per (re)start: how many times the run resumed and from where.
            self._metrics(state["step"], {"resumed_from_step": state["resumed_from"]})
            self._tags({"t5adapt.resumed_from_step": state["resumed_from"]})

    def phase_change(self, step: int, counts: dict) -> None:
        """The cross-attention warm-up ended: everything trains from here."""
        self._metrics(step, {"params_trainable": counts["trainable"], "params_frozen": counts["frozen"]})

    def log(self, step: int, metrics: dict, by_denoiser: torch.Tensor) -> dict:
        """Log one window's metrics (already reduced across ranks); returns the derived ones."""
        extra = {}
        for name, (loss_sum, count) in zip(self.spec.denoiser_names, by_denoiser.tolist()):
            if count:
                extra[f"loss_by_denoiser/{name}"] = loss_sum / count
        achieved = self.flops_per_example * metrics["examples_per_s"]
        extra["mfu"] = achieved / (self.peak_flops * self.ctx.world_size)
        extra["model_tflops_per_s"] = achieved / 1e12
        self._metrics(step, {**metrics, **extra})
        return extra

    def evaluated(self, step: int, heldout_loss: float) -> None:
        self._metrics(step, {"heldout_loss": heldout_loss})

    def checkpointed(self, step: int, uri: str) -> None:
        self._tags({"t5adapt.last_checkpoint": uri, "t5adapt.last_checkpoint_step": step})
        self._metrics(step, {"checkpoint_step": step})

    def finished(self, state: dict) -> None:
        self._tags({"t5adapt.final_step": state["step"], "t5adapt.skipped_steps": state["skipped_steps"]})
