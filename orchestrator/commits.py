"""Stage outputs as commits: built in `<out>.partial`, a COMMITTED marker written last, then renamed.

An output with the marker is finished work: reused when it was made from the same config, never
overwritten silently otherwise. An output without it is an interrupted attempt and is redone.
"""

import json
import logging
import os
import shutil
from typing import Optional

from orchestrator.errors import UserError

COMMIT_MARKER = "COMMITTED"
log = logging.getLogger("t5adapt")


def is_committed(out: str) -> bool:
    return os.path.isfile(os.path.join(out, COMMIT_MARKER))


def reusable(out: str, info_file: str, digest: str, force: bool) -> Optional[dict]:
    """The info dict of a committed output of this config (reuse it), or None (build it).

    Raises UserError when `out` holds committed work from another config and force is off.
    """
    if force or not os.path.exists(out):
        return None
    if not is_committed(out):
        log.warning("%s has no %s marker (an interrupted run); building it again", out, COMMIT_MARKER)
        return None
    info_path = os.path.join(out, info_file)
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    if info.get("config_hash") == digest:
        log.info("%s already holds this output (config hash %s); reusing it", out, digest)
        return info
    raise UserError(f"{out} holds finished output made from another config: choose another --out, "
                    "or pass --force to replace it")


def staging_dir(out: str) -> str:
    """A fresh `<out>.partial` to build in."""
    staging = out.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def commit(staging: str, out: str) -> None:
    """Marker last, then the finished directory takes `out`'s place."""
    open(os.path.join(staging, COMMIT_MARKER), "w").close()
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staging, out)
