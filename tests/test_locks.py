"""Stage locks across real processes, on a local directory and on a real S3 server on loopback."""

import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

from jobs.core import commits, storage
from jobs.core.errors import RunFailed, UserError
from jobs.core.locks import StageLock, default_lease_s, hold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "t5adapt-locks"


def _child(mode: str, output: str, builds_log: str = "", go_file: str = "") -> None:
    """Runs in a subprocess. build: wait for go_file, then build `output` under hold(), logging the
    build to builds_log. hold-forever: take the lock and sleep until killed."""
    if mode == "hold-forever":
        lock = StageLock(output)
        assert lock.try_acquire() is None, "the lock should have been free"
        print("ACQUIRED", flush=True)
        time.sleep(600)
        return
    done, waited = storage.join(output, "DONE"), go_file + ".waited"

    def say(text):
        print("SAY", text, flush=True)
        open(waited, "w").close()

    print("READY", flush=True)
    while not os.path.exists(go_file):  # both children try at the same moment
        time.sleep(0.01)
    with hold(output, "test stage", lambda: storage.exists(done), poll_s=0.1, say=say) as mine:
        if mine:
            with open(builds_log, "a") as f:
                f.write(f"{os.getpid()}\n")
            deadline = time.time() + 10
            while not os.path.exists(waited) and time.time() < deadline:  # keep the other one waiting
                time.sleep(0.02)
            if not storage.is_s3(output):
                os.makedirs(output, exist_ok=True)
            storage.write_text(done, "")
    print("RESULT", mine, flush=True)


def _spawn(env: dict, *args: str) -> subprocess.Popen:
    code = f"from tests.test_locks import _child; _child(*{list(args)!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def _expect_line(proc: subprocess.Popen, wanted: str) -> None:
    line = proc.stdout.readline()
    assert line.strip() == wanted, f"child said {line!r} (exit code {proc.poll()}), expected {wanted!r}"


def _overwrite(uri: str, record: dict) -> None:
    """Put another controller's record in place whole (as the lock itself writes it), so the heartbeat
    that reads it back never sees a half-written file."""
    if storage.is_s3(uri):
        storage.write_text(uri, json.dumps(record))
        return
    with open(uri + ".intruder", "w") as f:
        json.dump(record, f)
    os.replace(uri + ".intruder", uri)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """A fresh stage output location: a local directory path or an s3:// prefix on moto."""
    if request.param == "local":
        return str(tmp_path / "stage-0123456789abcdef")
    request.getfixturevalue("s3_endpoint")
    import boto3

    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/stages/{uuid.uuid4().hex[:16]}"


def test_two_processes_race_and_exactly_one_builds(output, tmp_path):
    builds_log, go_file = str(tmp_path / "builds.log"), str(tmp_path / "go")
    env = dict(os.environ, T5ADAPT_LOCK_LEASE_S="10")
    children = [_spawn(env, "build", output, builds_log, go_file) for _ in range(2)]
    for child in children:
        _expect_line(child, "READY")
    open(go_file, "w").close()
    said = [child.communicate(timeout=30)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], said

    builders = open(builds_log).read().split()
    assert len(builders) == 1, f"built {len(builders)} times: {said}"
    results = [re.findall(r"^RESULT (\w+)$", text, re.M) for text in said]
    assert sorted(results) == [["False"], ["True"]], said
    waiter = said[results.index(["False"])]
    wait_line = rf"SAY waiting for test stage: {re.escape(output)} is being built by \S+:{builders[0]} "
    assert re.search(wait_line, waiter), waiter
    assert not storage.exists(output + ".lock"), "the builder's release should delete the record"


def test_of_many_simultaneous_tries_exactly_one_wins(output):
    # Threads rather than processes: many tries land inside each other's read-then-write window,
    # which a broken compare-and-swap would let several win.
    for round_index in range(3):
        locks = [StageLock(f"{output}-{round_index}", lease_s=10) for _ in range(8)]
        start, results = threading.Barrier(len(locks)), [None] * len(locks)

        def attempt(i):
            start.wait()
            results[i] = locks[i].try_acquire()

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(locks))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [i for i, holder in enumerate(results) if holder is None]
        try:
            assert len(winners) == 1, f"round {round_index}: {len(winners)} tries won the lock"
            token = json.loads(storage.read_text(locks[0].uri))["token"]
            assert {holder["token"] for holder in results if holder is not None} == {token}
        finally:
            for lock in locks:
                lock.release()


def test_local_swap_waits_for_the_mutex_and_rereads(tmp_path):
    # Another controller is inside its critical section (holds the flock) and writes its record
    # there: our try must wait for it, then see that record instead of overwriting it.
    lock = StageLock(str(tmp_path / "stage"), lease_s=10)
    other = {"owner": "other-host:77", "host": "other-host", "pid": 77, "token": "other",
             "started": time.time(), "heartbeat": time.time(), "expires": time.time() + 60}
    result = []
    with open(lock.uri + ".mutex", "a") as mutex:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: result.append(lock.try_acquire()))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "try_acquire wrote the record without taking the mutex"
        with open(lock.uri, "w") as f:
            json.dump(other, f)
        fcntl.flock(mutex, fcntl.LOCK_UN)
    thread.join(10)
    lock.release()
    assert result and result[0] is not None and result[0]["token"] == "other"


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host-dead-pid", "other-host-expired"])
def test_killed_holder_is_taken_over(output, same_host, caplog):
    # Same host: a long lease, so only the dead pid can explain a takeover at once.
    env = dict(os.environ, T5ADAPT_LOCK_LEASE_S="60" if same_host else "2")
    env.pop("T5ADAPT_LOCK_HOST", None)
    if not same_host:
        env["T5ADAPT_LOCK_HOST"] = "another-host"
    child = _spawn(env, "hold-forever", output)
    try:
        _expect_line(child, "ACQUIRED")
        lock = StageLock(output, lease_s=2)
        holder = lock.try_acquire()
        assert holder is not None and holder["pid"] == child.pid, "a live holder must be respected"
    finally:
        child.kill()  # SIGKILL: no release, the record stays behind
        child.wait()  # reaped, so its pid no longer exists

    with caplog.at_level(logging.WARNING, logger="t5adapt"):
        if same_host:
            assert lock.try_acquire() is None, "a dead pid on this host should be taken over at once"
        else:
            deadline = time.time() + 10
            while (seen := lock.try_acquire()) is not None:
                assert seen["owner"] == f"another-host:{child.pid}"
                assert time.time() < deadline, "the expired lease was never taken over"
                holder = seen
                time.sleep(0.1)
            assert time.time() >= holder["expires"], "taken over before the other host's lease ran out"
    try:
        assert json.loads(storage.read_text(lock.uri))["pid"] == os.getpid()
        assert f"took over the lock on {output} from {holder['owner']}" in caplog.text
    finally:
        lock.release()
    assert not storage.exists(lock.uri)


def test_heartbeat_renews_and_a_lost_lock_is_noticed(output):
    lock = StageLock(output, lease_s=3, heartbeat_s=0.2, info="prepare for run 7")
    assert lock.try_acquire() is None
    try:
        first = renewed = json.loads(storage.read_text(lock.uri))
        deadline = time.time() + 5
        while renewed["expires"] == first["expires"] and time.time() < deadline:
            time.sleep(0.1)
            renewed = json.loads(storage.read_text(lock.uri))
        assert renewed["token"] == first["token"] and renewed["info"] == "prepare for run 7"
        assert renewed["expires"] > first["expires"], "no heartbeat extended the lease"
        lock.check()

        # Another controller took it over (say its clock ran ahead): our next heartbeat must notice.
        intruder = dict(renewed, owner="intruder-host:4242", host="intruder-host", pid=4242, token="intruder")
        _overwrite(lock.uri, intruder)
        assert lock.lost.wait(timeout=10), "no heartbeat noticed the record changed"
        lost = rf"lost the lock on {re.escape(output)}: it is now held by intruder-host:4242"
        with pytest.raises(RunFailed, match=lost):
            lock.check()
    finally:
        lock.release()
    assert json.loads(storage.read_text(lock.uri))["token"] == "intruder", "release must leave a new owner's record"

    # A commit made while the lost lock was held is refused before its marker is written.
    lock = StageLock(output + "-commit", lease_s=3, heartbeat_s=0.2)
    assert lock.try_acquire() is None
    try:
        staging = commits.local_staging(output + "-commit")
        storage.write_text(storage.join(staging, "payload.txt"), "half of a build")
        _overwrite(lock.uri, intruder)
        assert lock.lost.wait(timeout=10), "no heartbeat noticed the record changed"
        with pytest.raises(RunFailed, match="lost the lock on .*-commit"):
            commits.finish(staging, output + "-commit")
        assert not commits.is_committed(output + "-commit")
    finally:
        lock.release()

    # hold() yields only a bool, so it makes the same check itself when its block ends.
    with pytest.raises(RunFailed, match=r"lost the lock on .*-hold: it is now held by intruder-host:4242"):
        with hold(output + "-hold", "test stage", lambda: False, lease_s=3, heartbeat_s=0.2) as mine:
            assert mine
            _overwrite(output + "-hold.lock", intruder)
            time.sleep(1.0)


def test_lease_from_the_environment_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("T5ADAPT_LOCK_LEASE_S", "7.5")
    assert default_lease_s() == 7.5 and StageLock(str(tmp_path / "out")).heartbeat_s == 2.5
    monkeypatch.setenv("T5ADAPT_LOCK_LEASE_S", "soon")
    with pytest.raises(UserError, match="T5ADAPT_LOCK_LEASE_S='soon' must be a positive number of seconds"):
        default_lease_s()
