"""The data directory: made readable by its owner only, since it holds the store (documents, the audit trail),
the vector index, traces and the master key file."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("keel.server")


def prepare_data_dir(path: Path) -> None:
    """Create `path` (and its parents) with mode 0700; an existing one that others may read is left as its
    owner set it, with a warning that says how to close it."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        path.chmod(0o700)  # the mode argument passes through the umask; this does not
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("data directory readable by other users", extra={
            "path": str(path), "mode": f"{mode:o}", "fix": f"chmod 700 {path}"})
