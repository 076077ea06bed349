"""The MLflow UI, as a person sees it: `t5adapt ui` on a real store, the runs table in headless Chromium."""

import os

import pytest

from jobs.core.tracking import TrackingConfig, experiment_id, finish_run, start_run
from .browser import artifact_dir, experiment_url, render, start_mlflow_ui, stop

TRIALS = {"trial-lr-1e-3": 1e-3, "trial-lr-3e-4": 3e-4, "trial-lr-1e-4": 1e-4}  # no name inside another


def _sweep_store(root: str):
    """A sweep as the UI will see it: a parent run with one nested run per trial. -> (experiment, run ids)"""
    cfg = TrackingConfig()
    parent = start_run(cfg, root, "sweep-demo", {"t5adapt.sweep": "demo"})
    trial_ids = {}
    for num, (name, lr) in enumerate(TRIALS.items()):
        trial_ids[name] = start_run(cfg, root, name, {"t5adapt.sweep": "demo"}, parent_id=parent,
                                    params={"train.lr": str(lr)})
        finish_run(cfg, root, trial_ids[name], "FINISHED", metrics={"eval.heldout_loss": 3.0 - num})
    finish_run(cfg, root, parent, "FINISHED", metrics={"best.heldout_loss": 1.0})
    return experiment_id(cfg, root), parent, trial_ids


def test_mlflow_ui_lists_sweep_and_trial_runs(tmp_path):
    root = str(tmp_path / "runs")
    experiment, parent, trial_ids = _sweep_store(root)
    screenshot = os.path.join(artifact_dir(), "mlflow-ui-sweep-runs.png")
    if os.path.exists(screenshot):
        os.remove(screenshot)  # a stale one from an earlier session must not pass the checks below
    process, base_url = start_mlflow_ui(root)
    try:
        url = experiment_url(base_url, experiment)
        dom = render(url, screenshot, ["sweep-demo", *TRIALS, f"{1 + len(TRIALS)} matching runs"])
        # The helper's wait must end in a failure naming what is missing, not pass on a partial page.
        with pytest.raises(AssertionError, match="trial-lr-9e-9"):
            render(url, str(tmp_path / "missing.png"), ["sweep-demo", "trial-lr-9e-9"], timeout_s=5)
    finally:
        stop(process)

    # Each name is a row linking to its own run, not only text somewhere on the page.
    for run_id in [parent, *trial_ids.values()]:
        assert f'href="#/experiments/{experiment}/runs/{run_id}"' in dom, run_id
    with open(screenshot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", screenshot
    assert os.path.getsize(screenshot) > 20_000, f"{screenshot} is too small to show a runs table"
