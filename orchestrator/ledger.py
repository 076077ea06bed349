"""A run directory, ROOT/NAME/: the resolved config (config.yaml) and the ledger (ledger.json).

The ledger says, per stage: its key, its output location, its state (pending, running, done,
reused, failed, interrupted), start and end times, and its MLflow run id; plus the run's key and
its MLflow parent run. It is a record for people and for `t5adapt ls/show`; what is finished is
decided by the outputs' commit markers, never by the ledger.
"""

import contextlib
import fcntl
import json
import os
import time
from typing import Dict, Iterator, Optional

LEDGER = "ledger.json"
CONFIG = "config.yaml"


class Ledger:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LEDGER)

    @classmethod
    def open(cls, run_dir: str, config_yaml: str, run_key: str, stages: Dict[str, object]) -> "Ledger":
        """Record this run's config and stage plan; a stage whose key changed starts over as pending."""
        os.makedirs(run_dir, exist_ok=True)
        _write_atomic(os.path.join(run_dir, CONFIG), config_yaml)
        ledger = cls(run_dir)
        with ledger._update() as data:
            if data.get("run_key") != run_key:
                data["previous_run_keys"] = (data.get("previous_run_keys", []) + [data["run_key"]])[-10:] \
                    if data.get("run_key") else []
                data["mlflow_run_id"] = None
            data.update(name=os.path.basename(run_dir), run_key=run_key, created=data.get("created", time.time()))
            old = data.get("stages", {})
            data["stages"] = {}
            for name, stage in stages.items():
                entry = old.get(name, {})
                if entry.get("key") != stage.key:
                    entry = {"state": "pending"}
                entry.update(key=stage.key, output=stage.output)
                data["stages"][name] = entry
        return ledger

    def read(self) -> dict:
        return read(self.run_dir)

    def mark(self, stage: str, **fields) -> None:
        with self._update() as data:
            data["stages"].setdefault(stage, {}).update(fields)

    def set(self, **fields) -> None:
        with self._update() as data:
            data.update(fields)

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict]:
        """Read-modify-write under a file lock: two controllers of one run never lose each other's marks."""
        os.makedirs(self.run_dir, exist_ok=True)
        with open(self.path + ".mutex", "w") as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            data = read(self.run_dir)
            yield data
            data["updated"] = time.time()
            _write_atomic(self.path, json.dumps(data, indent=1))


def read(run_dir: str) -> dict:
    """A run directory's ledger ({} when there is none)."""
    path = os.path.join(run_dir, LEDGER)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def runs(root: str) -> Dict[str, dict]:
    """Every run directory under `root` that holds a ledger: name -> ledger."""
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in sorted(os.listdir(root)):
        data = read(os.path.join(root, name))
        if data:
            found[name] = data
    return found


def _write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` whole; an unchanged file is left as it is (a re-run rewrites nothing)."""
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def stage_seconds(entry: dict) -> Optional[float]:
    if entry.get("started") and entry.get("ended"):
        return entry["ended"] - entry["started"]
    return None
