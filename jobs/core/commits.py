"""Stage outputs as commits: built in `<out>.partial`, a COMMITTED marker written last, then renamed.

An output with the marker is finished work: reused when it was made from the same config, never
overwritten silently otherwise. An output without it is an interrupted attempt and is redone.
"""

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

from jobs.core import locks, storage
from jobs.core.errors import UserError

COMMIT_MARKER = "COMMITTED"
log = logging.getLogger("t5adapt")


def stage_key(stage: str, fields: dict, inputs: Optional[dict] = None) -> str:
    """16 hex digits naming a stage's output: a hash of the stage name, the config fields that change
    its output bytes (plain JSON values, including the identity of files it reads) and the keys of
    the stage outputs it reads. Equal keys mean interchangeable outputs."""
    text = json.dumps({"stage": stage, "fields": fields, "inputs": inputs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_digest(*parts) -> str:
    """16 hex digits identifying what an output was made from: config dataclasses (as resolved YAML)
    and plain strings, in order; None parts are skipped."""
    from omegaconf import OmegaConf

    text = "".join(p if isinstance(p, str) else OmegaConf.to_yaml(OmegaConf.structured(p)) for p in parts if p is not None)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_committed(out: str) -> bool:
    return storage.exists(storage.join(out, COMMIT_MARKER))


def reusable(out: str, info_file: str, digest: str, force: bool) -> Optional[dict]:
    """The info dict of a committed output of this config (reuse it), or None (build it).

    `out` is a local directory or an s3:// prefix. Raises UserError when it holds committed work
    from another config and force is off.
    """
    if force:
        return None
    if not is_committed(out):
        # An s3:// prefix without its marker is emptied quietly by staging_dir; a local leftover is named.
        if not storage.is_s3(out) and os.path.exists(out):
            log.warning("%s has no %s marker (an interrupted run); building it again", out, COMMIT_MARKER)
        return None
    info_path = storage.join(out, info_file)
    info = json.loads(storage.read_text(info_path)) if storage.exists(info_path) else {}
    if info.get("config_hash") == digest:
        log.info("%s already holds this output (config hash %s); reusing it", out, digest)
        return info
    raise UserError(f"{out} holds finished output made from another config: choose another --out, "
                    "or pass --force to replace it")


def staging_dir(out: str) -> str:
    """Where to build: a fresh `<out>.partial` directory; for an s3:// prefix, the prefix itself,
    emptied (objects cannot be renamed, so there the marker alone says the output is whole)."""
    if storage.is_s3(out):
        storage.delete_prefix(out)
        return out
    staging = out.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def commit(staging: str, out: str) -> None:
    """Marker last; a local build then takes `out`'s place."""
    locks.check_before_commit(out)
    storage.write_text(storage.join(staging, COMMIT_MARKER), "")
    if storage.is_s3(out):
        return
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staging, out)


def publish(local: str, out: str) -> None:
    """Copy a finished local output directory to an s3:// prefix as a commit: the prefix is emptied
    (its marker first, so no reader takes the old files for whole), every file but the marker is
    uploaded, and the marker is written last."""
    marker = storage.join(out, COMMIT_MARKER)
    if storage.exists(marker):
        storage.delete_file(marker)
    storage.delete_prefix(out)
    storage.upload_dir(local, out, skip=(COMMIT_MARKER,))
    locks.check_before_commit(out)
    storage.write_text(marker, "")


def local_staging(out: str) -> str:
    """Where to build an output locally: `staging_dir(out)` for a local output, a fresh temporary
    directory for an s3:// one (published by finish(), then removed by the caller)."""
    import tempfile

    return tempfile.mkdtemp(prefix="t5adapt-staging-") if storage.is_s3(out) else staging_dir(out)


def finish(local: str, out: str) -> None:
    """Make a built local directory the committed output `out`: committed in place and renamed for a
    local output, published (marker last) for an s3:// one."""
    if storage.is_s3(out):
        publish(local, out)
    else:
        commit(local, out)
