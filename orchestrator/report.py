"""What the command line prints about runs: the end-of-run summary, `t5adapt ls` and `t5adapt show`.

Everything here reads the run directories' ledgers (orchestrator/ledger.py) and the stage outputs'
own records; nothing is recomputed.
"""

import os
import time
from typing import List

from jobs.core import storage
from orchestrator import ledger as ledgers
from orchestrator.keys import STAGES

_SHORT = {"done": "built", "reused": "reused", "running": "running", "failed": "FAILED", "interrupted": "stopped",
          "pending": "-", "skipped": "skipped"}


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _age(seconds_since: float) -> str:
    seconds = time.time() - seconds_since
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _duration(entry: dict) -> str:
    seconds = ledgers.stage_seconds(entry)
    return f"{seconds:.0f} s" if seconds is not None else ""


def summary(current, tracking_uri: str = None) -> str:
    """The end of `t5adapt run`: what ran or was reused and how long it took, the evaluation table,
    where the export is, and how to open the UI."""
    data = current.ledger.read()
    rows = [["stage", "state", "time", "key", "output"]]
    for name in STAGES:
        entry = data["stages"].get(name, {})
        if name in current.results or entry.get("state") in ("failed", "interrupted", "skipped"):
            built = entry.get("state") != "reused"
            rows.append([name, _SHORT.get(entry.get("state"), entry.get("state", "")), _duration(entry) if built else "",
                         entry.get("key", ""), entry.get("output", "")])
    lines = [f"run {current.job.name} (run key {current.run_key})", _table(rows)]
    if current.results.get("evaluate"):
        from jobs.evaluate.report import evaluation_table

        evaluation = current.stages["evaluate"].output
        lines += ["", evaluation_table(current.results["evaluate"]),
                  f"(full report: {storage.join(evaluation, 'evaluation.md')})"]
    if "export" in current.results:
        lines += ["", f"exported model: {current.stages['export'].output}"]
        if current.job.export.out:
            lines.append(f"copied to: {current.job.export.out}")
    if tracking_uri:
        browse = tracking_uri if tracking_uri.startswith(("http://", "https://")) else f"t5adapt ui --root {current.root}"
        lines += ["", f"MLflow run {current.parent_run_id} in {tracking_uri}", f"browse it: {browse}"]
    return "\n".join(lines)


def ls(root: str) -> str:
    """One line per run under `root`: name, pairing, each stage's state, held-out loss, age."""
    found = ledgers.runs(root)
    if not found:
        return f"no runs under {root} (start one: t5adapt run configs/tiny.yaml --root {root})"
    rows = [["run", "pairing", *STAGES, "heldout_loss", "updated"]]
    for name, data in found.items():
        stages = data.get("stages", {})
        loss = stages.get("evaluate", {}).get("heldout_loss")
        rows.append([name, data.get("pairing", ""), *[_SHORT.get(stages.get(s, {}).get("state"), "-") for s in STAGES],
                     f"{loss:.3f}" if isinstance(loss, (int, float)) else "-", _age(data.get("updated", time.time()))])
    return _table(rows)


def show(root: str, run: str) -> str:
    """One run in full: its key, MLflow run, and per stage its key, state, timing, numbers and output."""
    run_dir = os.path.join(root, run)
    data = ledgers.read(run_dir)
    if not data:
        names = ", ".join(ledgers.runs(root)) or "none"
        from jobs.core.errors import UserError

        raise UserError(f"no run {run!r} under {root} (runs there: {names}); see t5adapt ls --root {root}")
    lines = [f"run {run}", f"  run key: {data.get('run_key')}", f"  pairing: {data.get('pairing', '?')}",
             f"  config: {os.path.join(run_dir, ledgers.CONFIG)}", f"  MLflow run: {data.get('mlflow_run_id') or '-'}"]
    for name in STAGES:
        entry = data.get("stages", {}).get(name)
        if not entry:
            continue
        lines.append(f"{name}: {_SHORT.get(entry.get('state'), entry.get('state'))}")
        lines.append(f"  key {entry.get('key')}  output {entry.get('output')}")
        if entry.get("started"):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["started"]))
            lines.append(f"  started {started}" + (f", took {_duration(entry)}" if _duration(entry) else ""))
        extras = {k: entry[k] for k in ("step", "heldout_loss", "mlflow_run_id", "error") if entry.get(k) is not None}
        if extras:
            lines.append("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extras.items()))
    return "\n".join(lines)
