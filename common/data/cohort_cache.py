"""A loaded cohort kept as one Parquet file, so the second load of a large export takes seconds.

The key is the loader's settings plus, for every file of the export it reads, its size, its
modification time and a fast hash (BLAKE2b of the first and last MiB). Hashing whole files
would cost as much as reading them (chartevents.csv.gz is about 3 GB): size + mtime + the
two ends catch re-downloads, truncations and edits by every ordinary tool; a same-size edit in
the middle that also restores the mtime would not be seen. Delete the cache directory (or pass
`cache=off`) to force a fresh read.

Where: `cache=DIR` in the data spec, else `$FEDMERGE_CACHE_DIR`, else `<export>/.fedmerge-cache`
when the export directory is writable, else the user cache directory
(`$XDG_CACHE_HOME/fedmerge` or `~/.cache/fedmerge`). Files are written under a temporary name
and renamed, so a reader never sees half a cohort.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import FedmergeError
from common.records import PatientRecord, Section

CACHE_ENV = "FEDMERGE_CACHE_DIR"
EDGE_BYTES = 1 << 20
FORMAT_VERSION = 1


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
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


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


def read_cached(directory: Path | None, key: str) -> pa.Table | None:
    if directory is None:
        return None
    path = directory / f"{key}.parquet"
    if not path.is_file():
        return None
    try:
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose first
        # import alone (about 0.15 s) was a sixth of a 40k-stay cached load.
        with pq.ParquetFile(path) as parquet:
            return parquet.read()
    except (OSError, pa.ArrowException):
        return None  # a damaged cache is only a slower load, never an error


def write_cached(directory: Path | None, key: str, table: pa.Table) -> Path | None:
    """Write atomically (temporary file, then rename), so no reader sees half a file."""
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            pq.write_table(table, temporary, compression="zstd")
            os.replace(temporary, directory / f"{key}.parquet")
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as exc:
        raise FedmergeError(
            f"{directory}: cannot write the cohort cache ({exc}); pass cache=DIR with a "
            "writable directory or cache=off"
        ) from None
    return directory / f"{key}.parquet"


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


@contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off while a cohort's records are built.

    A 40,000-stay cohort is about 200,000 small pydantic objects. Each allocation burst past
    CPython's generation-0 threshold starts a collection that walks the young objects, and
    the older generations get walked again and again as the list grows: measured, that made
    building the records two to three times slower than the work itself. The records hold no
    reference cycles, so nothing is left to collect; the collector resumes on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def table_to_records(table: pa.Table) -> list[PatientRecord]:
    columns = [table.column(c).to_pylist()
               for c in ("stay_id", "site_id", "label", "names", "texts", "numeric")]  # fmt: skip
    records = []
    with paused_gc():
        for stay_id, site_id, label, names, texts, numeric in zip(*columns, strict=True):
            sections = tuple(Section(name=n, text=t, numeric=k)
                             for n, t, k in zip(names, texts, numeric, strict=True))  # fmt: skip
            records.append(PatientRecord(stay_id=stay_id, site_id=site_id, label=label,
                                         text=" ".join(t for t in texts), sections=sections))
    return records
