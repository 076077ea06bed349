"""Compute that ASHA spends against the full grid to find the same best trial, on the tiny sweep.

Both arms run configs/sweep_tiny.yaml (4 depth pairings x 2 learning rates = 8 trials, the tiny random
Gemma 3), longer so that ASHA has rungs to decide at: --steps training steps, a checkpoint (and a
held-out score) every 2 steps. One trial at a time in both arms, each arm in its own empty root, so
no trial reuses another arm's training.
  grid: every trial trains to the end (scheduler none)
  asha: ASHA on the held-out loss, grace period 2 steps, reduction factor 2 (rungs at 2, 4, 8, ...)
Trial-steps = the training steps each trial ran, summed. Best trial = the lowest evaluated held-out
loss among trials that ran to the end. Wall-clock is printed beside it (noisy on a shared machine:
compare the two columns of one run, not runs).

Run: .venv/bin/python bench/asha_compute.py [--steps 12] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "out", "asha")


def run_arm(name: str, scheduler: dict, steps: int, keep: bool) -> dict:
    values = yaml.safe_load(open(os.path.join(REPO, "configs", "sweep_tiny.yaml")))
    values["overrides"].update({"train.max_steps": steps, "train.checkpoint_every_steps": 2})
    values.update(name=f"asha-bench-{name}", run=os.path.join(REPO, "configs", "tiny.yaml"), scheduler=scheduler,
                  max_concurrent_trials=1)
    root = os.path.join(OUT, name)
    timing = os.path.join(root, "wall_seconds.json")
    if not (keep and os.path.isfile(timing)):  # --keep: an arm that finished earlier is read, not rerun
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(values, f)
        started = time.time()
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", f.name, "--root", root], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        json.dump({"seconds": time.time() - started}, open(timing, "w"))
    seconds = json.load(open(timing))["seconds"]
    folder = next(os.path.join(root, "sweeps", d) for d in os.listdir(os.path.join(root, "sweeps")))
    trials = json.load(open(os.path.join(folder, "trials.json")))
    # Trial names carry the sweep's key, which differs between the arms: compare by what a trial is.
    label = {n: f"{t['pairing']} lr={t['params']['train.lr']:g}" for n, t in trials.items()}
    finished = {n: t for n, t in trials.items() if t["state"] == "done"}
    best = min(finished, key=lambda n: finished[n]["metrics"]["heldout_loss"])
    return {"seconds": seconds, "trial_steps": sum(t["metrics"].get("step", 0) for t in trials.values()),
            "trials": len(trials), "stopped": sum(t["state"] == "stopped" for t in trials.values()),
            "best": label[best], "best_loss": finished[best]["metrics"]["heldout_loss"],
            "by_trial": {label[n]: (t["state"], t["metrics"].get("step")) for n, t in sorted(trials.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="read an arm that finished in an earlier run instead of rerunning it")
    args = parser.parse_args()
    grid = run_arm("grid", {"type": "none"}, args.steps, args.keep)
    asha = run_arm("asha", {"type": "asha", "grace_period": 2, "reduction_factor": 2}, args.steps, args.keep)
    print(f"tiny sweep, 8 trials x {args.steps} steps, one trial at a time (CPU, 2 cores)")
    print(f"{'':14}{'grid':>12}{'asha':>12}{'asha/grid':>12}")
    print(f"{'trial-steps':14}{grid['trial_steps']:>12}{asha['trial_steps']:>12}{asha['trial_steps'] / grid['trial_steps']:>12.2f}")
    print(f"{'wall s':14}{grid['seconds']:>12.0f}{asha['seconds']:>12.0f}{asha['seconds'] / grid['seconds']:>12.2f}")
    print(f"{'stopped':14}{grid['stopped']:>12}{asha['stopped']:>12}")
    print(f"best trial: grid {grid['best']} ({grid['best_loss']:.4f}), asha {asha['best']} ({asha['best_loss']:.4f}): "
          + ("the same" if grid["best"] == asha["best"] else "DIFFERENT"))
    print("asha per trial (state, steps):", json.dumps(asha["by_trial"]))


if __name__ == "__main__":
    main()
