"""Files that appear whole or not at all.

Why one helper: reports, status and PID files are read by other processes (a monitor, `node
status`, `stop`) while they are being rewritten, and an interrupted write must not leave a
half-written file or a stray temporary behind. The data goes to a temporary sibling (same
directory, so the final rename stays on one filesystem and is atomic), is flushed to disk,
and then takes the final name; on any failure the temporary is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int | None = None,
                 overwrite: bool = True, durable: bool = True) -> None:
    """Write `data` to `path` atomically. `mode`: the file's permissions from the first byte
    (key material is never readable by others, even briefly). `overwrite=False` raises
    FileExistsError instead of replacing a file that exists, including one that appears
    while writing (a hard link never clobbers). `durable=False` skips the fsync: for files
    rewritten at every tick (run progress), where whole matters and surviving a power cut
    does not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
