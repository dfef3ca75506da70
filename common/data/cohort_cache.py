"""A loaded cohort kept as one Arrow IPC file, so the second load of a large export is instant.

The file is uncompressed Arrow, memory-mapped when read: the table is usable without decoding
anything (measured on the 40k-stay bench: 0.6 ms to open 28 MB, against 0.13 s to decode the
same cohort from zstd Parquet, which was most of a cached load; writing takes 0.04 s against
0.14 s). The loaders hand it to `common.data.lazy`, which builds records only when read.

The key is the loader's settings plus, for every file of the export it reads, its size, its
modification time and a fast hash (BLAKE2b of the first and last 64 KiB). Hashing whole files
would cost as much as reading them (chartevents.csv.gz is about 3 GB): size + mtime + the
two ends catch re-downloads, truncations and edits by every ordinary tool, and a gzipped
table's last 8 bytes are the CRC-32 and length of its whole text, so any change to its content
changes its tail; a same-size edit in the middle of a plain CSV that also restores the mtime
would not be seen. Delete the cache directory (or pass `cache=off`) to force a fresh read.
(Edges of 1 MiB made the key cost 29 ms on the bench's ten files, a quarter of a cached load.)

Where: `cache=DIR` in the data spec, else `$FEDMERGE_CACHE_DIR`, else `<export>/.fedmerge-cache`
when the export directory is writable, else the user cache directory
(`$XDG_CACHE_HOME/fedmerge` or `~/.cache/fedmerge`). Files are written under a temporary name
and renamed, so a reader never sees half a cohort.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.ipc as ipc

from common.errors import FedmergeError
from common.records import PatientRecord, Section

if TYPE_CHECKING:
    from common.data.lazy import LazyRecords

CACHE_ENV = "FEDMERGE_CACHE_DIR"
EDGE_BYTES = 64 << 10
FORMAT_VERSION = 2  # 2: Arrow IPC instead of Parquet, 64 KiB edges
SUFFIX = ".arrow"


def _fingerprint(path: Path) -> dict[str, object]:
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if stat.st_size > 2 * EDGE_BYTES:
            handle.seek(-EDGE_BYTES, os.SEEK_END)
            digest.update(handle.read(EDGE_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges": digest.hexdigest()}


def cache_key(kind: str, files: Iterable[Path], settings: dict[str, object]) -> str:
    """A name that changes whenever an input file or a setting that shapes the output does."""
    described = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "settings": settings,
        "files": {str(p.resolve()): _fingerprint(p) for p in sorted(files)},
    }
    blob = json.dumps(described, sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.blake2b(blob, digest_size=16).hexdigest()}"


def _writable(directory: Path) -> bool:
    """Writable, and not marked read-only: as root `os.access` says yes to a folder whose
    owner took every write bit away (a shared, read-only data copy), which is a no."""
    try:
        marked = directory.stat().st_mode & 0o222
    except OSError:
        return False
    return directory.is_dir() and bool(marked) and os.access(directory, os.W_OK | os.X_OK)


def cache_dir(export: Path, option: str | None) -> Path | None:
    """The directory cohorts of `export` are kept in; None when caching is off."""
    if option is not None and option.strip().lower() in {"off", "0", "false", "no"}:
        return None
    if option:
        return Path(option).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if _writable(export):
        return export / ".fedmerge-cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedmerge"


def cached_path(directory: Path, key: str) -> Path:
    return directory / f"{key}{SUFFIX}"


def read_cached(directory: Path | None, key: str) -> pa.Table | None:
    """The cached table, memory-mapped (its buffers stay valid after the file is replaced)."""
    if directory is None:
        return None
    path = cached_path(directory, key)
    if not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as mapped:
            table = ipc.open_file(mapped).read_all()
        table.validate()
    except (OSError, pa.ArrowException):
        return None  # a damaged cache is only a slower load, never an error
    # Records are built when read (`common.data.lazy`), so what the node reads without
    # building any (the label column: fold counts, the policy's minimums) is checked here.
    if "label" in table.column_names and not _labels_are_binary(table.column("label")):
        return None
    return table


def _labels_are_binary(labels: pa.ChunkedArray) -> bool:
    """Without pyarrow.compute, whose import alone (~30 ms) would triple a cached load."""
    import numpy as np

    if labels.null_count:
        return False
    values = labels.to_numpy()
    return bool(np.isin(values, (0, 1)).all())


# What earlier versions or killed writers left: format-1 cohorts (zstd Parquet, never read
# again) and temporary files of a write that never finished (older than a day: no live writer).
_OLD_FORMAT = re.compile(r"^[a-z0-9]+-[0-9a-f]{32}\.parquet$")
_UNFINISHED = re.compile(r"^\.[a-z0-9]+-[0-9a-f]{32}\..*\.tmp$")
_UNFINISHED_AGE_S = 86_400.0


def remove_leftovers(directory: Path) -> list[Path]:
    """Remove this cache's own leftovers from `directory` (names only this module writes)."""
    removed = []
    now = time.time()
    for entry in directory.iterdir():
        stale = _OLD_FORMAT.match(entry.name) or (
            _UNFINISHED.match(entry.name) and now - entry.stat().st_mtime > _UNFINISHED_AGE_S)
        if stale and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_cached(directory: Path | None, key: str, table: pa.Table) -> Path | None:
    """Write atomically (temporary file, then rename), so no reader sees half a file; this
    cache's leftovers in the folder (`remove_leftovers`) go at the same time."""
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_leftovers(directory)
        handle, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            with pa.OSFile(temporary, "wb") as sink, ipc.new_file(sink, table.schema) as out:
                out.write_table(table)
            os.replace(temporary, cached_path(directory, key))
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as exc:
        raise FedmergeError(
            f"{directory}: cannot write the cohort cache ({exc}); pass cache=DIR with a "
            "writable directory or cache=off"
        ) from None
    return cached_path(directory, key)


def records_to_table(records: list[PatientRecord]) -> pa.Table:
    """Any loader's records as a cacheable table (sections as parallel lists)."""
    return pa.table({
        "stay_id": [r.stay_id for r in records],
        "site_id": pa.array([r.site_id for r in records], pa.string()),
        "label": pa.array([r.label for r in records], pa.int8()),
        "names": [[s.name for s in r.sections] for r in records],
        "texts": [[s.text for s in r.sections] for r in records],
        "numeric": [[s.numeric for s in r.sections] for r in records],
    })  # fmt: skip


def table_to_records(table: pa.Table) -> LazyRecords:
    """The records of a `records_to_table` table, built when read (`common.data.lazy`)."""
    from common.data.lazy import LazyRecords

    return LazyRecords(table, build_records)


def build_records(table: pa.Table) -> list[PatientRecord]:
    """PatientRecords from a `records_to_table` table (sections from the parallel lists)."""
    columns = [table.column(c).to_pylist()
               for c in ("stay_id", "site_id", "label", "names", "texts", "numeric")]  # fmt: skip
    records = []  # built under `common.data.lazy.paused_gc`, by `LazyRecords`
    for stay_id, site_id, label, names, texts, numeric in zip(*columns, strict=True):
        sections = tuple(Section(name=n, text=t, numeric=k)
                         for n, t, k in zip(names, texts, numeric, strict=True))  # fmt: skip
        records.append(PatientRecord(stay_id=stay_id, site_id=site_id, label=label,
                                     text=" ".join(t for t in texts), sections=sections))
    return records
