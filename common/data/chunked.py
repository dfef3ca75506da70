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
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from common.errors import FedmergeError
from common.service import process_running

try:  # ISA-L's inflater releases the GIL like zlib's, and is about three times faster
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency; gzip keeps the loader working
    import gzip as _gzip

# DuckDB reads each chunk in one query, at a cost per query: measured on the 40k-stay bench
# (463 MB of text), 28 chunks of 16 MiB took about 1 CPU-s more to read than 4 of 128 MiB,
# which still let parsing start after a quarter of the text. Three on disk are 384 MiB.
CHUNK_BYTES = 128 << 20
BLOCK_BYTES = 4 << 20  # read and written at a time: the inflater's memory, whatever the chunk
_DONE = object()

# Memory-backed scratch space (Linux tmpfs) for the chunk files, used when it has this much
# room: at most three chunks exist at once (384 MiB; more only for a row longer than a chunk),
# so 2 GiB leaves a wide margin, and a container's default 64 MiB /dev/shm is never used.
RAM_DIR = Path("/dev/shm")
RAM_ROOM = 2 << 30


class Chunk(NamedTuple):
    """An uncompressed piece of the table: its file, and the line its first row has."""

    path: Path
    first_line: int


def is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


# A quoted field may span lines, but not this far: past it, the quote is taken as never closed
# (a damaged export) and reported, rather than read on to the end of a 30 GB file.
MAX_PENDING_CHUNKS = 4


def _quotes(data: bytes, start: int = 0, end: int | None = None) -> int:
    """How many quote characters `data[start:end]` holds (a memchr first: most have none)."""
    end = len(data) if end is None else end
    return data.count(b'"', start, end) if data.find(b'"', start, end) >= 0 else 0


def _cut(data: bytes, quoted: bool = False) -> int:
    """Index just past the last line break of `data` outside quotes; 0 when there is none.

    `quoted`: whether `data` starts inside a quoted field (the text before it held an odd
    number of quote characters). A line break is outside a quoted field exactly when the
    quotes before it, those before `data` included, are even in number (an escaped quote is
    written doubled, which keeps the parity). One pass: the quotes before the last break are
    counted once, then those of each line are taken off while walking back. A block without
    any quote (most chartevents text) costs one memchr, ten times less than counting.
    """
    end = data.rfind(b"\n")
    if end < 0:
        return 0
    quotes = _quotes(data, 0, end) + quoted
    while quotes % 2:
        previous = data.rfind(b"\n", 0, end)
        if previous < 0:
            return 0
        quotes -= _quotes(data, previous, end)
        end = previous
    return end + 1


class _Inflater(threading.Thread):
    """Inflates `source` into chunk files under `workdir`, queueing each as it is complete.

    The text is read in blocks of at most `BLOCK_BYTES` and each is written to the open chunk
    file at once, so the memory held is one block whatever the chunk size (chunks are large:
    see `CHUNK_BYTES`). Once a chunk holds `chunk_bytes`, it ends at the last line break
    outside quotes of the block that reached the size; the rest of that block starts the
    next chunk.
    """

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
        block_bytes = min(BLOCK_BYTES, self.chunk_bytes)
        with _gzip.open(self.source, "rb") as stream:
            header = stream.readline()
            line, count = 2, 0  # the first line of the open chunk; chunks queued so far
            out, size, lines, quoted = None, 0, 0, False  # the open chunk file and its text
            try:
                while not self.stop.is_set():
                    block = stream.read(block_bytes)
                    if out is None:  # the file spans blocks: closed below, or in `finally`
                        out = open(self.workdir / f"{count:06d}.csv", "wb")  # noqa: SIM115
                        out.write(header)
                    cut = 0  # where the open chunk ends in `block` (0: it goes on)
                    if block and size + len(block) >= self.chunk_bytes:
                        cut = _cut(block, quoted)
                    if block and not cut:  # all of the block belongs to the open chunk
                        if size + len(block) > (MAX_PENDING_CHUNKS + 1) * self.chunk_bytes:
                            raise FedmergeError(
                                f"{self.source}: line {line}: a quoted field does not close "
                                f"within {size >> 20} MiB; expected every '\"' to be closed "
                                "(a damaged or truncated export?)"
                            )
                        out.write(block)
                        size, lines = size + len(block), lines + block.count(b"\n")
                        quoted ^= _quotes(block) % 2 == 1
                        continue
                    out.write(memoryview(block)[:cut])  # the chunk ends here, or the text does
                    out.close()
                    out = None
                    size, lines = size + cut, lines + block.count(b"\n", 0, cut)
                    if size:
                        self._put(Chunk(self.workdir / f"{count:06d}.csv", line))
                        line, count = line + lines, count + 1
                    if not block:
                        return
                    rest = memoryview(block)[cut:]  # starts outside quotes: a clean break
                    out = open(self.workdir / f"{count:06d}.csv", "wb")  # noqa: SIM115
                    out.write(header)
                    out.write(rest)
                    size, lines = len(rest), block.count(b"\n", cut)
                    quoted = _quotes(block, cut) % 2 == 1
            finally:
                if out is not None:
                    out.close()


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


SCRATCH_PREFIX = "fedmerge-inflate-"


def remove_stale(directory: Path) -> list[Path]:
    """Remove chunk folders left by loads that were killed (SIGKILL, out of memory): their
    process is gone, so nothing else will. Why it matters: in /dev/shm they hold up to 384 MiB
    of RAM until removed. A folder is named after its process id; one whose process still runs
    is left alone (its pid may have been reused, which only delays the removal)."""
    removed = []
    try:
        entries = list(directory.glob(f"{SCRATCH_PREFIX}*-*"))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or process_running(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _workdir(directory: Path | None) -> Path:
    """A fresh chunk folder in `directory` (None: the system's temporary directory), named
    after this process; the leftovers of killed loads there go first (`remove_stale`)."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    remove_stale(Path(directory or tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=directory))


@contextmanager
def inflated(source: Path, temp_dir: Path | None = None) -> Iterator[Path]:
    """`source` as a plain file: itself if not gzipped, else inflated (ISA-L, a block at a
    time) into a scratch folder (`scratch_dir`: /dev/shm when it has room) that is removed
    on exit. Why: DuckDB inflates a .gz on one core and parses it on that core too; a plain
    file it parses on all, and a table read twice is inflated once."""
    if not is_gzip(source):
        yield source
        return
    workdir = _workdir(scratch_dir(temp_dir))
    try:
        plain = workdir / source.name.removesuffix(".gz")
        with _gzip.open(source, "rb") as stream, open(plain, "wb") as out:
            while block := stream.read(BLOCK_BYTES):
                out.write(block)
        yield plain
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def chunks(source: Path, temp_dir: Path | None = None,
           chunk_bytes: int | None = None) -> Iterator[Chunk]:  # fmt: skip
    """The chunks of the gzipped CSV `source`, each deleted when the next one is asked for.

    Leaving the loop early (an error while reading a chunk) stops the inflater and removes
    every chunk file with the temporary directory.
    """
    workdir = _workdir(temp_dir)
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
