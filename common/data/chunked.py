"""A gzipped CSV handed to the query engine as a stream of uncompressed chunk files.

Why: a `.csv.gz` is one DEFLATE stream, so DuckDB inflates and parses it on one core however
many the machine has (chartevents: about 3 GB gzipped, 30 GB of text, 313 M rows). Here a
thread inflates with ISA-L (`isal`, about three times zlib's speed; the standard `gzip` module
if it is missing) into chunk files of about `chunk_bytes`, each starting with the CSV header,
while the caller has DuckDB parse the previous chunk on all its threads. The caller deletes
a chunk once read, and the queue between them holds one, so at most three chunks exist at
once: the disk used is bounded, never the whole uncompressed table.

A chunk always ends after a line break outside a quoted field, so no row is split, even one
whose quoted text spans lines. Each chunk records the line number its first row has in the
whole file, so an error found in a chunk names the original file and line.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from common.errors import FedmergeError

try:  # ISA-L's inflater releases the GIL like zlib's, and is about three times faster
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency; gzip keeps the loader working
    import gzip as _gzip

CHUNK_BYTES = 16 << 20  # a few per second: parsing starts soon, three on disk are 48 MiB
_DONE = object()

# Memory-backed scratch space (Linux tmpfs) for the chunk files, used when it has this much
# room: at most three chunks exist at once, each at most MAX_PENDING_CHUNKS chunks long, so
# 512 MiB leaves a wide margin while a container's default 64 MiB /dev/shm is never used.
RAM_DIR = Path("/dev/shm")
RAM_ROOM = 512 << 20


class Chunk(NamedTuple):
    """An uncompressed piece of the table: its file, and the line its first row has."""

    path: Path
    first_line: int


def is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


# A quoted field may span lines, but not this far: past it, the quote is taken as never closed
# (a damaged export) and reported, rather than read on to the end of a 30 GB file.
MAX_PENDING_CHUNKS = 4


def _cut(data: bytes) -> int:
    """Index just past the last line break of `data` outside quotes; 0 when there is none.

    `data` starts outside quotes (every chunk does), so a line break is outside a quoted
    field exactly when an even number of quote characters precede it (an escaped quote is
    written doubled, which keeps the parity). One pass: the quotes before the last break are
    counted once, then those of each line are taken off while walking back.
    """
    end = data.rfind(b"\n")
    if end < 0:
        return 0
    if data.find(b'"', 0, end) < 0:  # no quote at all, as in most chartevents chunks: a
        return end + 1  # memchr, ten times faster than counting (0.25 s of 463 MB on the bench)
    quotes = data.count(b'"', 0, end)
    while quotes % 2:
        previous = data.rfind(b"\n", 0, end)
        if previous < 0:
            return 0
        quotes -= data.count(b'"', previous, end)
        end = previous
    return end + 1


class _Inflater(threading.Thread):
    """Inflates `source` into chunk files under `workdir`, queueing each as it is complete."""

    def __init__(self, source: Path, workdir: Path, chunk_bytes: int) -> None:
        super().__init__(name=f"inflate-{source.name}", daemon=True)
        self.source, self.workdir, self.chunk_bytes = source, workdir, chunk_bytes
        self.ready: queue.Queue[object] = queue.Queue(maxsize=1)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._inflate()
            self._put(_DONE)
        except BaseException as exc:  # handed to the reader, which raises it
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _inflate(self) -> None:
        with _gzip.open(self.source, "rb") as stream:
            header = stream.readline()
            line, pending, count = 2, b"", 0
            while not self.stop.is_set():
                block = stream.read(self.chunk_bytes)
                data = pending + block if pending else block
                cut = _cut(data) if block else len(data)
                if cut == 0 and block:
                    if len(data) > MAX_PENDING_CHUNKS * self.chunk_bytes:
                        raise FedmergeError(
                            f"{self.source}: line {line}: a quoted field does not close within "
                            f"{len(data) >> 20} MiB; expected every '\"' to be closed (a "
                            "damaged or truncated export?)"
                        )
                    pending = data  # one row longer than a chunk: read on
                    continue
                if cut:
                    self._put(Chunk(self._write(count, header, data, cut), line))
                    line, count = line + data.count(b"\n", 0, cut), count + 1
                pending = data[cut:]
                if not block:
                    return

    def _write(self, count: int, header: bytes, data: bytes, cut: int) -> Path:
        path = self.workdir / f"{count:06d}.csv"
        with open(path, "wb") as out:
            out.write(header)
            out.write(memoryview(data)[:cut])
        return path


def scratch_dir(fallback: Path | None) -> Path | None:
    """Where the chunk files go: `RAM_DIR` when it is a writable directory with `RAM_ROOM`
    free, else `fallback` (None: the system's temporary directory).

    Why: each chunk is written once and read once at once, so it never needs a disk. Measured
    on the 40k-stay bench, writing its 463 MB of text took 0.58 s of the inflater's CPU into
    the page cache of an ext4 disk against 0.17 s into tmpfs, and both cores are busy then.
    """
    try:
        if (RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK | os.X_OK)
                and shutil.disk_usage(RAM_DIR).free >= RAM_ROOM):  # fmt: skip
            return RAM_DIR
    except OSError:
        pass
    return fallback


def chunks(source: Path, temp_dir: Path | None = None,
           chunk_bytes: int | None = None) -> Iterator[Chunk]:  # fmt: skip
    """The chunks of the gzipped CSV `source`, each deleted when the next one is asked for.

    Leaving the loop early (an error while reading a chunk) stops the inflater and removes
    every chunk file with the temporary directory.
    """
    if temp_dir is not None:
        temp_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="inflate-", dir=temp_dir))
    inflater = _Inflater(source, workdir, chunk_bytes or CHUNK_BYTES)
    inflater.start()
    try:
        while True:
            item = inflater.ready.get()
            if item is _DONE:
                return
            if isinstance(item, FedmergeError):  # the inflater's own finding, already one line
                raise item
            if isinstance(item, Exception):  # not gzip, truncated, disk full: one line
                raise FedmergeError(f"{source}: cannot inflate ({item})") from None
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Chunk)
            try:
                yield item
            finally:
                os.unlink(item.path)
    finally:
        inflater.stop.set()
        inflater.join()
        shutil.rmtree(workdir, ignore_errors=True)
