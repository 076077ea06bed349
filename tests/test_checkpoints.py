"""Checkpoint discovery without a training run: torn, damaged and pruned checkpoints."""

import json
import logging
import os

from jobs.train import checkpoints
from jobs.core import storage


def _fake_checkpoint(root, step, committed=True, payload=b"weights"):
    path = checkpoints.step_dir(root, step)
    os.makedirs(os.path.join(path, "ds"))
    with open(os.path.join(path, "ds", "shard.pt"), "wb") as f:
        f.write(payload + bytes([step]))
    files = {"ds/shard.pt": {"sha256": storage.file_sha256(os.path.join(path, "ds", "shard.pt")),
                             "bytes": len(payload) + 1}}
    with open(os.path.join(path, checkpoints.MANIFEST), "w") as f:
        json.dump({"step": step, "micro_batches": step, "config_hash": "h", "files": files}, f)
    if committed:
        open(os.path.join(path, "COMMITTED"), "w").close()


def test_torn_checkpoints_are_ignored_and_damaged_ones_skipped(tmp_path, caplog):
    root = str(tmp_path)
    assert checkpoints.committed_steps(root) == [] and checkpoints.newest_intact(root) is None
    _fake_checkpoint(root, 10)
    _fake_checkpoint(root, 20)
    _fake_checkpoint(root, 30, committed=False)  # torn: its save never finished
    assert checkpoints.committed_steps(root) == [20, 10]
    assert checkpoints.newest_intact(root) == 20
    with open(os.path.join(checkpoints.step_dir(root, 20), "ds", "shard.pt"), "r+b") as f:
        f.write(b"X")  # same size, other bytes
    with caplog.at_level(logging.WARNING, logger="t5adapt.train"):
        assert checkpoints.newest_intact(root) == 10
    assert "step-000020 is damaged (ds/shard.pt does not match its checksum)" in caplog.text
    os.remove(os.path.join(checkpoints.step_dir(root, 10), "ds", "shard.pt"))
    assert checkpoints.newest_intact(root) is None


def test_prune_keeps_the_newest_committed_and_drops_older_torn_ones(tmp_path):
    root = str(tmp_path)
    for step, committed in ((5, False), (10, True), (20, True), (30, True), (40, False)):
        _fake_checkpoint(root, step, committed=committed)
    checkpoints._prune(root, keep=2)
    # 10 is past the newest two; 5 is a torn leftover below them; 40 may be a save in progress.
    assert sorted(os.listdir(checkpoints.folder(root))) == ["step-000020", "step-000030", "step-000040"]


def test_ranks_sharing_the_check_cover_every_file_once(tmp_path):
    """On resume each of n ranks hashes every n-th file: together they see each file exactly once."""
    root = str(tmp_path)
    _fake_checkpoint(root, 10)
    path = checkpoints.step_dir(root, 10)
    manifest = json.load(open(os.path.join(path, checkpoints.MANIFEST)))
    for name in ("ds/a.pt", "ds/b.pt", "ds/c.pt", "trainer_state.json"):
        with open(os.path.join(path, name), "wb") as f:
            f.write(name.encode())
        manifest["files"][name] = {"sha256": storage.file_sha256(os.path.join(path, name)), "bytes": len(name)}
    with open(os.path.join(path, checkpoints.MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert all(checkpoints.damage(root, 10, (rank, 3)) is None for rank in range(3))
    for name in manifest["files"]:
        with open(os.path.join(path, name), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
        problems = [checkpoints.damage(root, 10, (rank, 3)) for rank in range(3)]
        assert [p for p in problems if p] == [f"{name} does not match its checksum"], problems
        with open(os.path.join(path, name), "r+b") as f:
            f.write(first)
