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
        json.dump({"step": step, "micro_batches": step, "config_hash": "h", "world_size": 1, "ranks": [["ds/shard.pt"]],
                   "files": files}, f)
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
    assert ("step-000020 cannot be used (ds/shard.pt does not match its checksum); falling back to the previous "
            "committed one") in caplog.text
    caplog.clear()
    os.remove(os.path.join(checkpoints.step_dir(root, 10), "ds", "shard.pt"))
    with caplog.at_level(logging.WARNING, logger="t5adapt.train"):
        assert checkpoints.newest_intact(root) is None
    assert "step-000010 cannot be used (ds/shard.pt is missing); no intact checkpoint is left: starting from step 0" \
        in caplog.text


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


def test_a_checkpoint_missing_a_ranks_files_is_damaged(tmp_path):
    """The manifest records each rank's files: a checkpoint that lacks a rank (or lists a file as
    another rank's) is not intact, even when every listed file matches its checksum."""
    root = str(tmp_path)
    _fake_checkpoint(root, 10)
    path = os.path.join(checkpoints.step_dir(root, 10), checkpoints.MANIFEST)
    manifest = json.load(open(path))
    assert checkpoints.damage(root, 10) is None
    for world, ranks, problem in ((2, [["ds/shard.pt"]], "does not list the files of each of its 2 ranks"),
                                  (2, [["ds/shard.pt"], []], "rank 1 of 2 did not contribute its files"),
                                  (1, [["ds/zero_pp_rank_1_optim.pt"]], "rank 0 of 1 did not contribute")):
        json.dump(dict(manifest, world_size=world, ranks=ranks), open(path, "w"))
        assert problem in checkpoints.damage(root, 10)
    manifest["files"]["ds/zero_pp_rank_1_optim.pt"] = manifest["files"]["ds/shard.pt"]
    json.dump(dict(manifest, ranks=[["ds/shard.pt", "ds/zero_pp_rank_1_optim.pt"]]), open(path, "w"))
    assert "carry another rank's number" in checkpoints.damage(root, 10)


def test_each_rank_fetches_only_the_files_it_loads_from_s3(s3_endpoint, tmp_path):
    """On s3://, resuming rank r downloads the trainer state, DeepSpeed's shared files and its own
    ZeRO files, never the other ranks' shards or the probe, and checks what it downloaded."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="resume-files")
    root = "s3://resume-files/train"
    names = ["trainer_state.json", "probe.pt", "ds/mp_rank_00_model_states.pt",
             "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    files = {}
    for name in names:
        local = tmp_path / name.replace("/", "_")
        local.write_bytes(name.encode() * 3)
        storage.put_file(str(local), storage.join(checkpoints.step_dir(root, 4), name))
        files[name] = {"sha256": storage.file_sha256(str(local)), "bytes": local.stat().st_size}
    manifest = {"step": 4, "micro_batches": 4, "config_hash": "h", "world_size": 2, "files": files,
                "ranks": [[n for n in names if "rank_1" not in n], ["ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]]}
    storage.write_text(storage.join(checkpoints.step_dir(root, 4), checkpoints.MANIFEST), json.dumps(manifest))
    for rank in (0, 1):
        local, problem = checkpoints.fetch_for_resume(root, 4, rank, 2)
        got = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
        assert problem is None
        assert got == sorted(["trainer_state.json", "ds/mp_rank_00_model_states.pt",
                              f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"])
    storage.write_text(storage.join(checkpoints.step_dir(root, 4), "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"), "x")
    assert checkpoints.fetch_for_resume(root, 4, 0, 2)[1] is None  # rank 0 never reads rank 1's shard
    assert "does not match its checksum" in checkpoints.fetch_for_resume(root, 4, 1, 2)[1]
