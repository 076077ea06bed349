"""Browser checks for tests: `t5adapt ui` on a run root, a page rendered by headless Chromium, a screenshot.

What MLflow 3.17's UI puts in the DOM (found by dumping it; test_mlflow_browser.py relies on it):
- The experiment page opens on the view picked by the sidebar's "GenAI | Model training" switch, kept in
  localStorage `mlflow.workflowType` and GenAI by default. A fresh browser profile therefore lands on the
  GenAI overview (traces, no runs) whatever the experiment's `mlflow.experimentKind` tag says;
  `?workflowType=machine_learning` on the route selects the runs table.
- The runs table (ag-grid) nests child runs (tag `mlflow.parentRunId`) under their parent only while it is
  sorted by start time with no search filter, and nested children start collapsed: the parent's row has an
  expander button (no aria-label; data-component-id ends in `runnamecellrenderer.tsx_46`) and the children's
  rows are not in the DOM at all. Which parents are expanded is UI state (localStorage or a saved view), not
  a URL parameter, so a plain page load cannot open it. Sorting by anything else lists every run flat:
  `orderByKey=tags.`mlflow.runName`` does that, and is what `experiment_url(..., flat=True)` asks for.
- Each row shows the run name as a link to `#/experiments/<experiment_id>/runs/<run_id>`, and the footer says
  "<N> matching runs", counting collapsed children too. 61 flat rows were all in the DOM at 1600x1000.
- Search params must follow `/runs`: `#/experiments/<id>?...` redirects to `/runs` and drops the sort.
"""

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import List, Optional, Tuple

from .conftest import REPO

_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--no-proxy-server", "--hide-scrollbars"]


def chromium_path() -> str:
    """The Chromium binary (/usr/bin/chromium, else `chromium` on PATH); RuntimeError with the fix if none."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    found = shutil.which("chromium")
    if found:
        return found
    raise RuntimeError("chromium not found (needed for the MLflow UI browser checks): install it with "
                       "`apt-get install -y chromium` (`make test` does this on Debian)")


def artifact_dir() -> str:
    """Where tests keep artifacts such as screenshots: $T5ADAPT_TEST_ARTIFACTS, else REPO/test-artifacts."""
    path = os.environ.get("T5ADAPT_TEST_ARTIFACTS") or os.path.join(REPO, "test-artifacts")
    os.makedirs(path, exist_ok=True)
    return path


def experiment_url(base_url: str, experiment_id: str, flat: bool = True) -> str:
    """The experiment's runs table; flat=True lists nested runs as rows of their own (see module docstring)."""
    params = {"workflowType": "machine_learning"}
    if flat:
        params.update(orderByKey="tags.`mlflow.runName`", orderByAsc="true")
    return f"{base_url}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(params)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(process: subprocess.Popen, num_chars: int = 3000) -> str:
    with open(process.log_path, errors="replace") as f:
        return f.read()[-num_chars:]


def start_mlflow_ui(root: str, port: int = 0, timeout_s: float = 120) -> Tuple[subprocess.Popen, str]:
    """Start `t5adapt ui --root ROOT` (port 0: a free one) and wait until it answers HTTP.

    Returns (process, base URL like http://127.0.0.1:PORT), the URL read from what the command prints.
    The process leads its own session: `stop(process)` ends it and the server processes it started.
    """
    port = port or _free_port()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the UI must browse ROOT's store, not an ambient one
    # One web worker and no job runners: the defaults (4 workers, 7 huey consumers) double the start-up
    # time on 2 cores and a page view needs neither. Telemetry off: tests reach nothing outside.
    env.update(MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    log_fd, log_path = tempfile.mkstemp(prefix="t5adapt-ui-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log:
        command = [sys.executable, "-m", "orchestrator.cli", "ui", "--root", root, "--port", str(port)]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.log_path = log_path
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever $http_proxy says
    deadline = time.monotonic() + timeout_s
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = _log_tail(process)
            stop(process)
            raise RuntimeError(f"t5adapt ui --root {root} exited with {process.returncode}:\n{tail}")
        if url is None:
            printed = re.search(r"MLflow UI for \S+: (http://\S+)", _log_tail(process, 100_000))
            url = printed.group(1) if printed else None
        if url is not None:
            try:
                with no_proxy.open(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return process, url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.5)
    tail = _log_tail(process)
    stop(process)
    raise RuntimeError(f"t5adapt ui --root {root} did not answer on port {port} within {timeout_s:.0f} s:\n{tail}")


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap our own child, or it stays in the group as a zombie
    try:
        os.killpg(process.pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """End a process started by start_mlflow_ui and everything in its session (SIGTERM, then SIGKILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(process):
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(process):
            time.sleep(0.2)
    process.wait(timeout=5)
    log_path = getattr(process, "log_path", None)
    if log_path and os.path.exists(log_path):
        os.remove(log_path)


def visible_text(dom: str) -> str:
    """A serialized DOM's text: scripts and styles dropped, tags removed, entities decoded, spaces collapsed."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return re.sub(r"\s+", " ", text).strip()


def _chromium_once(url: str, screenshot: str, window: Tuple[int, int], budget_ms: int,
                   timeout_s: float) -> Optional[str]:
    """One headless load: the DOM as serialized HTML (None if it took over timeout_s), the PNG in `screenshot`."""
    with tempfile.TemporaryDirectory(prefix="t5adapt-chromium-") as profile:  # fresh: no stored UI state
        command = [chromium_path(), *_CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={budget_ms}",
                   f"--screenshot={screenshot}", "--dump-dom", url]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return None
        if process.returncode != 0:
            tail = err.decode(errors="replace")[-2000:]
            raise RuntimeError(f"chromium exited with {process.returncode} on {url}:\n{tail}")
        return out.decode(errors="replace")


def render(url: str, screenshot: str, expect: List[str], timeout_s: float = 120,
           window: Tuple[int, int] = (1600, 1000)) -> str:
    """Load `url` in headless Chromium until every string in `expect` is in the page's visible text.

    Each try is a fresh load with a fresh profile, at most 60 s of wall time (a starved server can stall
    a load for minutes; the next one is fast), with a growing virtual-time budget (10, 20, 40 s) for the
    single-page app to fetch and render. Returns the DOM as serialized HTML (hrefs, ids included).
    `screenshot` (a .png path) holds the last load, also when the check fails: then AssertionError lists
    the missing strings with an excerpt of the page's text.
    """
    os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
    deadline = time.monotonic() + timeout_s
    budget_ms = 10_000
    while True:
        attempt_s = max(min(deadline - time.monotonic(), 60), 30)
        dom = _chromium_once(url, screenshot, window, budget_ms, attempt_s)
        text = visible_text(dom or "")
        missing = [item for item in expect if item not in text]
        if not missing:
            return dom
        if time.monotonic() >= deadline:
            seen = f"page text: {text[:1500]!r}" if dom is not None else f"chromium timed out after {attempt_s:.0f} s"
            raise AssertionError(f"{url} does not show {missing} after {timeout_s:.0f} s "
                                 f"(screenshot: {screenshot}); {seen}")
        budget_ms = min(2 * budget_ms, 40_000)
        time.sleep(1)
