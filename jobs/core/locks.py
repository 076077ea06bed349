"""A stage lock with a heartbeat lease: two controllers never build the same stage output at once.

The lock is a small JSON record beside the output (`<output>.lock`, a sibling file or s3:// key).
Every change to it is a compare-and-swap, so of two controllers racing for it exactly one wins:
- s3://: conditional writes. Create with IfNoneMatch="*"; renew, take over and delete with
  IfMatch=<the ETag we read>. 412 PreconditionFailed / 409 ConditionalRequestConflict means someone
  else changed it first. This needs an S3 with conditional writes and deletes (AWS has both, deletes
  on general purpose buckets since 2025-09; moto has both); a store that ignores the conditions gives
  no exclusion at all.
- local: a short fcntl.flock critical section on `<output>.lock.mutex` around read-compare-write;
  the kernel drops a flock when its process dies, so a crash never leaves the mutex held. The
  record itself is written under a side name and os.replace'd, so readers see it whole.

The holder renews `expires` every heartbeat_s (lease_s / 3). A record whose lease ran out is taken
over, as is one held by a process on this host that no longer exists. Expiry compares
time.time() across hosts: their clocks must agree to well within the lease (NTP does).

A lease is not a fence: a holder that stalls past its lease (a long GC pause, a frozen VM) can be
taken over and keep writing. Every commit (jobs/core/commits, and the controller's in-place train
output) calls check_before_commit() before writing its marker, so the loser of such a race stops
instead of marking an output finished that the winner is building.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator, Optional, Tuple

from jobs.core import storage
from jobs.core.errors import RunFailed, UserError

log = logging.getLogger("t5adapt")

SAY_EVERY_S = 30.0
MAX_CAS_TRIES = 100  # each failed try means another controller changed the record meanwhile


def default_lease_s() -> float:
    """Seconds a lock stays ours without a heartbeat: $T5ADAPT_LOCK_LEASE_S (default 60), read at
    each call so tests and runs can set it after import."""
    text = os.environ.get("T5ADAPT_LOCK_LEASE_S", "60")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"T5ADAPT_LOCK_LEASE_S={text!r} must be a positive number of seconds, e.g. 60")
    return value


def __getattr__(name: str):
    # `locks.LEASE_S` reads the environment at each use, not once at import (PEP 562).
    if name == "LEASE_S":
        return default_lease_s()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lock_host() -> str:
    """This machine's name in lock records: $T5ADAPT_LOCK_HOST (tests pose as another host), else the
    hostname. Same-host records with a dead pid are taken over at once, so hosts that share a name
    but not a pid namespace (containers with a fixed hostname) must set distinct names."""
    return os.environ.get("T5ADAPT_LOCK_HOST") or socket.gethostname()


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe_holder(record: dict) -> str:
    """One line about a lock record: who holds it, since when, and until when its lease runs."""
    left_s = record.get("expires", 0) - time.time()
    text = (f"{record.get('owner', '?')} (host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
            f"since {_clock(record.get('started', 0))}, lease until {_clock(record.get('expires', 0))}, "
            f"{'in %.0f s' % left_s if left_s >= 0 else '%.0f s ago' % -left_s})")
    return text + (f" [{record['info']}]" if record.get("info") else "")


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _why_dead(record: dict, now: float) -> Optional[str]:
    """Why a record's holder can be taken over, or None while it may still be alive."""
    if not isinstance(record.get("expires"), (int, float)):
        return "its record is unreadable"
    if record["expires"] < now:
        return f"its lease ran out {now - record['expires']:.1f} s ago"
    pid = record.get("pid")
    if record.get("host") == lock_host() and isinstance(pid, int) and pid > 0 and not _pid_exists(pid):
        return f"pid {record['pid']} no longer exists on this host"
    return None


def _parse(body: bytes) -> dict:
    try:
        record = json.loads(body)
    except ValueError:
        record = None
    if isinstance(record, dict):
        return record
    return {"owner": "unreadable record", "raw": body[:200].decode(errors="replace")}


class _LocalRecord:
    """Compare-and-swap on a local JSON file; the version is the sha256 of its bytes."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> Tuple[Optional[dict], Optional[str]]:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None, None
        return _parse(body), hashlib.sha256(body).hexdigest()

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        # The mutex file is never deleted: unlinking a flocked file lets a third process lock a new
        # inode while a second still holds the old one.
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".mutex", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def swap(self, record: Optional[dict], expected: Optional[str]) -> Optional[str]:
        """Write `record` (None: delete) if the file's version is still `expected` (None: absent).
        Returns the new version ("" after a delete), or None when the file had changed."""
        with self._mutex():
            _, current = self.read()
            if current != expected:
                return None
            if record is None:
                os.remove(self.path)
                return ""
            body = json.dumps(record, sort_keys=True).encode()
            with open(self.path + ".part", "wb") as f:
                f.write(body)
            os.replace(self.path + ".part", self.path)
            return hashlib.sha256(body).hexdigest()


class _S3Record:
    """Compare-and-swap on an S3 object with conditional writes; the version is its ETag."""

    LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")

    def __init__(self, uri: str):
        import boto3

        self.uri = uri
        self.bucket, self.key = storage.split_s3(uri)
        # One client for both threads (clients are thread-safe; creating them is not). Same
        # endpoint settings as storage: AWS_ENDPOINT_URL, profiles, instance roles.
        self.client = boto3.client("s3")

    def _fail(self, e: Exception):
        return UserError(f"cannot use the lock record {self.uri}: {e} (check the bucket name, credentials "
                         "and AWS_ENDPOINT_URL)")

    def read(self) -> Tuple[Optional[dict], Optional[str]]:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise self._fail(e) from None
        return _parse(got["Body"].read()), got["ETag"]

    def swap(self, record: Optional[dict], expected: Optional[str]) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            if record is None:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=expected)
                return ""
            body = json.dumps(record, sort_keys=True).encode()
            condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in self.LOST_RACE:
                return None
            raise self._fail(e) from None


class StageLock:
    """The lock on one stage output (a local directory or an s3:// prefix).

    lease_s: seconds the lock stays ours without a heartbeat (default $T5ADAPT_LOCK_LEASE_S or 60).
    heartbeat_s: seconds between renewals (default lease_s / 3). info: a free string for the record.
    """

    def __init__(self, output: str, lease_s: float = None, heartbeat_s: float = None, info: str = ""):
        self.output = output
        self.lease_s = float(lease_s) if lease_s is not None else default_lease_s()
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else self.lease_s / 3
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ValueError(f"heartbeat_s must be in (0, lease_s): got heartbeat_s={self.heartbeat_s}, "
                             f"lease_s={self.lease_s}")
        self.info = info
        self.uri = output.rstrip("/") + ".lock"
        self._store = _S3Record(self.uri) if storage.is_s3(self.uri) else _LocalRecord(self.uri)
        self.lost = threading.Event()
        self._lost_why = ""
        self._record: Optional[dict] = None  # ours, while held
        self._version: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _new_record(self) -> dict:
        now = time.time()
        host, pid = lock_host(), os.getpid()
        record = {"owner": f"{host}:{pid}", "host": host, "pid": pid, "token": uuid.uuid4().hex,
                  "started": now, "heartbeat": now, "expires": now + self.lease_s}
        if self.info:
            record["info"] = self.info
        return record

    def try_acquire(self) -> Optional[dict]:
        """None: the lock is now ours and a heartbeat thread keeps it; else the live holder's record."""
        if self._record is not None:
            raise RuntimeError(f"the lock on {self.output} is already held by this StageLock")
        for _ in range(MAX_CAS_TRIES):
            current, version = self._store.read()
            if current is not None:
                why = _why_dead(current, time.time())
                if why is None:
                    return current
            mine = self._new_record()
            new_version = self._store.swap(mine, version)
            if new_version is None:
                continue  # someone else changed the record between our read and write: look again
            if current is not None:
                log.warning("took over the lock on %s from %s: %s", self.output, current.get("owner", "?"), why)
            self._record, self._version = mine, new_version
            self.lost.clear()
            with _HELD_MUTEX:
                _HELD[_norm(self.output)] = self
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat {self.uri}", daemon=True)
            self._thread.start()
            return None
        raise RunFailed(f"the lock record {self.uri} changed under us {MAX_CAS_TRIES} times in a row: is "
                        "something rewriting it in a loop?")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            now = time.time()
            renewed = dict(self._record, heartbeat=now, expires=now + self.lease_s)
            try:
                new_version = self._store.swap(renewed, self._version)
            except Exception as e:  # a network blip: retry next beat while the lease lasts
                if time.time() < self._record["expires"]:
                    log.warning("could not renew the lock on %s (will retry): %s", self.output, e)
                    continue
                self._lose(f"its lease ran out while renewing failed ({e})")
                return
            if new_version is None:
                try:
                    current, _ = self._store.read()
                except Exception:  # only for the message
                    current = None
                self._lose(f"it is now held by {describe_holder(current)}" if current else "its record was deleted")
                return
            self._record, self._version = renewed, new_version

    def _lose(self, why: str) -> None:
        self._lost_why = why
        log.warning("lost the lock on %s: %s", self.output, why)
        self.lost.set()

    def check(self) -> None:
        """Raise RunFailed if a heartbeat found the lock is no longer ours. Call it before committing."""
        if self.lost.is_set():
            raise RunFailed(f"lost the lock on {self.output}: {self._lost_why}. Stopping so that two controllers "
                            "do not write the same output; if heartbeats were too slow, raise T5ADAPT_LOCK_LEASE_S")

    def release(self) -> None:
        """Stop the heartbeat and delete the record if it is still ours. Safe to call more than once."""
        with _HELD_MUTEX:
            if _HELD.get(_norm(self.output)) is self:
                del _HELD[_norm(self.output)]
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._record is not None and not self.lost.is_set():
            if self._store.swap(None, self._version) is None:
                log.warning("the lock record %s changed before release; left it to its new owner", self.uri)
        self._record = self._version = None


_HELD: dict = {}  # output -> the StageLock this process holds on it
_HELD_MUTEX = threading.Lock()


def _norm(output: str) -> str:
    return output.rstrip("/")


def check_before_commit(output: str) -> None:
    """Raise RunFailed if this process held a lock on `output` and lost it (another controller took it
    over). Every commit calls it before writing its marker, so a build whose lock was taken over never
    marks the output finished, even when the stage code does not know about locks."""
    with _HELD_MUTEX:
        lock = _HELD.get(_norm(output))
    if lock is not None:
        lock.check()


@contextlib.contextmanager
def hold(output: str, describe: str, is_done: Callable[[], bool], poll_s: float = 2.0, say=print,
         info: str = "", lease_s: float = None, heartbeat_s: float = None) -> Iterator[bool]:
    """Yields True when this process holds the lock and must build the output; False when another
    process finished it meanwhile (is_done() became true) - then nothing is held. While another live
    process holds it, waits, saying every ~30 s (and once at the start) what it waits for: `describe`,
    the output, the holder (host, pid, since when, lease until). is_done() is re-checked after
    acquiring. Releases on exit (also on exceptions/KeyboardInterrupt). A block that ends normally
    after its lock was lost (another controller took it over) raises RunFailed, so that build is
    never reported as done; for a check before committing, use StageLock and its check()."""
    lock = StageLock(output, lease_s=lease_s, heartbeat_s=heartbeat_s, info=info)
    said_at = None
    try:
        while True:
            holder = lock.try_acquire()
            if holder is None:
                break
            if is_done():
                yield False
                return
            if said_at is None or time.time() - said_at >= SAY_EVERY_S:
                say(f"waiting for {describe}: {output} is being built by {describe_holder(holder)}")
                said_at = time.time()
            time.sleep(poll_s)
        if is_done():  # finished by the holder we waited for, just before it released
            lock.release()
            yield False
            return
        yield True
        lock.check()  # reached only when the block ended without an exception
    finally:
        lock.release()
