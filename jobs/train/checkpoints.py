"""Training checkpoints as commits, in the run's storage (a local directory or an s3:// prefix).

  STORAGE/checkpoints/step-000040/
      ds/...                     DeepSpeed's files: every rank writes its own (ZeRO shards)
      trainer_state.json         step, data position (micro-batches consumed), counters
      probe.pt                   final checkpoint only: one example and the logits the engine gave it
      manifest.json              step, data position, config hash, world size, each rank's files,
                                 sha256 and size of every file
      COMMITTED                  written last; discovery ignores a directory without it

Each rank saves into its own local scratch directory and copies its files to storage; the ranks'
checksums are gathered, and rank 0 writes the manifest and then the marker. On resume, the ranks
walk the committed checkpoints newest first and take the first one that every rank found intact
and could load; a damaged one is skipped with a warning naming it. Locally each rank re-hashes its
share of the files; on s3:// each rank downloads only the files it loads (its own ZeRO shards and
the shared ones) and hashes those. After each commit only the newest train.keep_checkpoints stay.
"""

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

from jobs.core import storage
from jobs.core.commits import COMMIT_MARKER
from jobs.core.errors import UserError

log = logging.getLogger("t5adapt.train")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
PROBE = "probe.pt"
DS_TAG = "ds"
_NAME = re.compile(r"^step-(\d{6,})$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files (ZeRO shards, optimizer partitions)


class DamagedCheckpoint(UserError):
    """A committed checkpoint whose files do not match its manifest."""


def folder(storage_root: str) -> str:
    return storage.join(storage_root, "checkpoints")


def step_dir(storage_root: str, step: int) -> str:
    return storage.join(folder(storage_root), f"step-{step:06d}")


def committed_steps(storage_root: str) -> List[int]:
    """Steps of checkpoints that carry the marker, newest first (nothing is verified here)."""
    steps = []
    for name in storage.list_children(folder(storage_root)):
        match = _NAME.match(name)
        if match and storage.exists(storage.join(storage.join(folder(storage_root), name), COMMIT_MARKER)):
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def read_manifest(storage_root: str, step: int) -> dict:
    return json.loads(storage.read_text(storage.join(step_dir(storage_root, step), MANIFEST)))


def save(engine, storage_root: str, step: int, state: dict, config_hash: str, keep: int,
         probe: Optional[dict] = None) -> str:
    """Every rank calls this at the same step (DeepSpeed's save is collective). Returns the checkpoint URI."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    target = step_dir(storage_root, step)
    scratch = tempfile.mkdtemp(prefix=f"t5adapt-ckpt-rank{rank}-")
    try:
        engine.save_checkpoint(scratch, tag=DS_TAG, save_latest=False)
        if rank == 0:
            with open(os.path.join(scratch, STATE), "w") as f:
                json.dump(state, f, indent=1)
            if probe is not None:
                torch.save(probe, os.path.join(scratch, PROBE))
            # A leftover of the same step (a crashed attempt, a damaged checkpoint being redone) goes
            # first, marker before anything else, so no reader ever sees old and new files mixed.
            _uncommit(target)
            storage.delete_tree(target)
        dist.barrier()
        mine = {}  # rank 0 also writes the shared files (DeepSpeed's module file, trainer state, probe)
        for path in _files(scratch):
            rel = os.path.relpath(path, scratch).replace(os.sep, "/")
            storage.put_file(path, storage.join(target, rel))
            mine[rel] = {"sha256": storage.file_sha256(path), "bytes": os.path.getsize(path)}
        gathered: List[Dict] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            files = {}
            for part in gathered:
                files.update(part)
            manifest = {"step": step, "micro_batches": state["micro_batches"], "config_hash": config_hash,
                        "world_size": dist.get_world_size(), "ranks": [sorted(part) for part in gathered],
                        "files": dict(sorted(files.items()))}
            storage.write_text(storage.join(target, MANIFEST), json.dumps(manifest, indent=1))
            storage.write_text(storage.join(target, COMMIT_MARKER), "")
            _prune(storage_root, keep)
        dist.barrier()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _files(root: str) -> List[str]:
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)


def _prune(storage_root: str, keep: int) -> None:
    """Keep the newest `keep` committed checkpoints; drop older ones and torn leftovers below them."""
    steps = committed_steps(storage_root)
    if not steps:
        return
    kept = set(steps[:keep])
    oldest_kept = min(kept)
    for name in storage.list_children(folder(storage_root)):
        match = _NAME.match(name)
        if not match:
            continue
        step = int(match.group(1))
        if step not in kept and (step < oldest_kept or step in steps):
            path = storage.join(folder(storage_root), name)
            _uncommit(path)
            storage.delete_tree(path)


def _uncommit(path: str) -> None:
    """Marker first, so a crash halfway through deleting leaves a torn directory that discovery ignores."""
    marker = storage.join(path, COMMIT_MARKER)
    if storage.exists(marker):
        storage.delete_file(marker)


def verify(storage_root: str, step: int, local: str, part: Tuple[int, int] = (0, 1)) -> Optional[str]:
    """Check checkpoint `step` against its manifest, with its files under `local` (a local path).
    part=(i, n): only every n-th manifest file from the i-th (n ranks share the work).
    Returns None when intact, else what is wrong."""
    try:
        manifest = read_manifest(storage_root, step)
    except (OSError, ValueError, KeyError) as e:
        return f"manifest unreadable ({e})"
    problem = missing_ranks(manifest)
    if problem:
        return problem
    for rel, expected in _share(manifest["files"].items(), part):
        path = os.path.join(local, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != expected["bytes"] or storage.file_sha256(path) != expected["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def missing_ranks(manifest: dict) -> Optional[str]:
    """Whether every rank of the recorded world size contributed its files (None: all did)."""
    world = manifest.get("world_size")
    ranks = manifest.get("ranks")
    if not isinstance(world, int) or world < 1 or not isinstance(ranks, list) or len(ranks) != world:
        return f"its manifest does not list the files of each of its {world} ranks"
    for rank, names in enumerate(ranks):
        if not names or any(name not in manifest["files"] for name in names):
            return f"rank {rank} of {world} did not contribute its files"
        owners = {int(m.group(1)) for m in map(_RANK_FILE.search, names) if m}
        if owners - {rank}:
            return f"rank {rank}'s files carry another rank's number ({sorted(owners)})"
    return None


def needed_by(rel: str, rank: int) -> bool:
    """Whether rank `rank` loads manifest file `rel` on resume: the trainer state, DeepSpeed's shared
    files and its own ZeRO files (not other ranks' shards, not the probe)."""
    if rel == STATE:
        return True
    if not rel.startswith(DS_TAG + "/"):
        return False
    match = _RANK_FILE.search(rel)
    return match is None or int(match.group(1)) == rank


def fetch_for_resume(storage_root: str, step: int, rank: int, world: int) -> Tuple[str, Optional[str]]:
    """(local directory, problem) for rank `rank` resuming from checkpoint `step`: locally the
    directory itself with this rank's share of the files verified; on s3:// a fresh download of only
    the files this rank loads, verified as they land. problem is None when intact; the caller
    removes a downloaded directory (it is not step_dir)."""
    uri = step_dir(storage_root, step)
    if not storage.is_s3(uri):
        return uri, verify(storage_root, step, uri, (rank, world))
    try:
        manifest = read_manifest(storage_root, step)
    except Exception as e:
        return uri, f"manifest unreadable ({e})"
    problem = missing_ranks(manifest)
    if problem:
        return uri, problem
    local = tempfile.mkdtemp(prefix=f"t5adapt-ckpt-{step}-rank{rank}-")
    for rel, expected in sorted(manifest["files"].items()):
        if not needed_by(rel, rank):
            continue
        path = os.path.join(local, rel)
        try:
            storage.download_file(storage.join(uri, rel), path)
        except Exception as e:  # a listed object that cannot be read is damage too
            return local, f"cannot read {rel} ({e})"
        if os.path.getsize(path) != expected["bytes"] or storage.file_sha256(path) != expected["sha256"]:
            return local, f"{rel} does not match its checksum"
    return local, None


def _share(files, part: Tuple[int, int]) -> list:
    """Part (i, n) of a manifest's files: every n-th in sorted order from the i-th (fetch and verify
    must pick the same ones)."""
    return sorted(files)[part[0]::part[1]]


def fetch(storage_root: str, step: int, part: Tuple[int, int] = (0, 1)) -> str:
    """A local directory with checkpoint `step`'s files: the directory itself, or for s3:// a fresh
    download of the files its manifest lists (never a cache: a redone step reuses the same names);
    part as in verify."""
    uri = step_dir(storage_root, step)
    if not storage.is_s3(uri):
        return uri
    local = tempfile.mkdtemp(prefix=f"t5adapt-ckpt-{step}-")
    for rel in _share(read_manifest(storage_root, step)["files"], part):
        storage.download_file(storage.join(uri, rel), os.path.join(local, rel))
    return local


def damage(storage_root: str, step: int, part: Tuple[int, int] = (0, 1)) -> Optional[str]:
    """What is wrong with (part of) committed checkpoint `step`, or None when it is intact."""
    try:
        local = fetch(storage_root, step, part)
    except Exception as e:  # a listed object that cannot be read is damage too
        return f"cannot read it ({e})"
    try:
        return verify(storage_root, step, local, part)
    finally:
        if local != step_dir(storage_root, step):
            shutil.rmtree(local, ignore_errors=True)


def newest_intact(storage_root: str, steps: Optional[List[int]] = None,
                  check: Callable[[int], Optional[str]] = None) -> Optional[int]:
    """The newest of `steps` (default: the committed ones) that `check` (default: damage) finds
    intact; damaged ones are skipped with a warning. None when there is none."""
    check = check or (lambda step: damage(storage_root, step))
    steps = committed_steps(storage_root) if steps is None else steps
    for index, step in enumerate(steps):
        problem = check(step)
        if problem is None:
            return step
        warn_skipped(storage_root, step, problem, has_previous=index + 1 < len(steps))
    return None


def warn_skipped(storage_root: str, step: int, problem: str, has_previous: bool) -> None:
    """Say that checkpoint `step` cannot be used, and what happens instead."""
    instead = "falling back to the previous committed one" if has_previous else \
        "no intact checkpoint is left: starting from step 0"
    log.warning("checkpoint %s cannot be used (%s); %s", step_dir(storage_root, step), problem, instead)
