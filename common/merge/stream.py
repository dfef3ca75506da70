"""The kernels of the in-place switch: θ = α·a + β·b written chunk by chunk, converting on the fly.

Parents stay in their own dtype (bf16 for most released LLMs) wherever they are kept: the
memory-mapped files on CPU, device memory on a GPU that has room, or the files again when it
has not, streamed to the device through pinned staging buffers. Converting a whole parent to
the compute dtype up front would double or triple memory (18 GB resident for a 1.1 B pair on
CPU); converting a chunk at a time costs two bounded buffers and keeps the arithmetic exactly
that of `fedmerge merge` (upcast to float32, multiply, fused add-scaled, cast to the output).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.merge.methods.linear import weighted_sum

# Elements per conversion chunk on CPU: ATen's GRAIN_SIZE. An op on fewer elements runs in the
# calling thread without starting an OpenMP team, so a few Python threads (the ops release the
# GIL) split the work with no barrier per op: on shared cores, where a team waits for its
# slowest thread at every op, 1M-element chunks ran 10x slower (measured). 128 KB of float32
# also stays in cache between the four ops that touch it, so DRAM sees each byte once.
CPU_CHUNK = 1 << 15
# Threads of the CPU path: each op holds the GIL for a few µs of a ~50 µs chunk, so more than
# about eight threads would queue on the GIL rather than on memory.
MAX_CPU_WORKERS = 8
# Bytes per staging slot when streaming to a GPU (4 slots pinned on the host, 4 on the device,
# plus two float32 work buffers): bounded at a few hundred MB whatever the model size.
STAGING_BYTES = 32 << 20
# Device memory that must stay free after parents are placed on the GPU: activations of the
# forward passes, allocator fragmentation, the CUDA context's own growth.
MIN_DEVICE_MARGIN = 2 << 30
DEVICE_MARGIN_FRACTION = 0.10


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the writer computes in: float64 if anything is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@dataclass
class WorkBuffers:
    """Two flat buffers in the work dtype, reused for every chunk of every tensor."""

    acc: torch.Tensor
    other: torch.Tensor

    @classmethod
    def allocate(cls, elems: int, dtype: torch.dtype, device) -> WorkBuffers:
        return cls(torch.empty(elems, dtype=dtype, device=device),
                   torch.empty(elems, dtype=dtype, device=device))


def mix_chunk(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float,
              work: WorkBuffers | None) -> None:
    """target = α·a + β·b for flat tensors of one length and device, any float dtypes.

    The writer's arithmetic (`weighted_sum` on float32 copies): upcasting copies (exact), one
    multiply by α, one add of β·b, then one cast into the target when it is narrower.
    """
    wd = work.acc.dtype if work is not None else target.dtype
    if a.dtype == b.dtype == target.dtype == wd:
        weighted_sum([a, b], [alpha, beta], out=target)
        return
    n = target.numel()
    acc = target if target.dtype == wd else work.acc[:n]
    acc.copy_(a)
    acc.mul_(alpha)
    if b.dtype == wd:
        acc.add_(b, alpha=beta)
    else:
        other = work.other[:n]
        other.copy_(b)
        acc.add_(other, alpha=beta)
    if acc is not target:
        target.copy_(acc)


def mix_tensor(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
               beta: float, work: WorkBuffers | None, chunk: int) -> None:
    """`mix_chunk` over a whole flat tensor, `chunk` elements at a time."""
    n = target.numel()
    if work is None or (a.dtype == b.dtype == target.dtype == work.acc.dtype):
        mix_chunk(target, a, b, alpha, beta, work)
        return
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        mix_chunk(target[i:j], a[i:j], b[i:j], alpha, beta, work)


class CpuMixer:
    """The CPU conversion path: the tensors' elements dealt to `workers` threads in contiguous
    runs of about equal size, each thread with its own two work buffers, each run processed
    `CPU_CHUNK` elements at a time. `run(coeffs)` writes α·a + β·b into every target.

    Runs are (tensor, start, stop) and views are cut as they are used: a view per chunk kept
    for a 1.1 B model would be ~100k tensor objects, tens of MB."""

    def __init__(self, tensors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 workers: int, dtype: torch.dtype):
        self.tensors = list(tensors)
        total = sum(t.numel() for t, _, _ in self.tensors)
        workers = max(1, min(workers, MAX_CPU_WORKERS, -(-total // CPU_CHUNK)))
        share = -(-total // workers)
        self.plans: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
        done = 0  # elements dealt so far; worker w takes [w·share, (w+1)·share)
        for k, (t, _, _) in enumerate(self.tensors):
            i, n = 0, t.numel()
            while i < n:
                w = min(workers - 1, done // share)
                j = n if w == workers - 1 else min(n, i + (w + 1) * share - done)
                self.plans[w].append((k, i, j))
                done += j - i
                i = j
        self.work = [WorkBuffers.allocate(CPU_CHUNK, dtype, "cpu") for _ in range(workers)]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    @property
    def nbytes(self) -> int:
        return sum(w.acc.nbytes + w.other.nbytes for w in self.work)

    def _run_one(self, w: int, coeffs: Sequence[tuple[float, float]]) -> None:
        work, chunk = self.work[w], CPU_CHUNK
        with torch.no_grad():
            for k, start, stop in self.plans[w]:
                t, a, b = self.tensors[k]
                alpha, beta = coeffs[k]
                for i in range(start, stop, chunk):
                    j = min(stop, i + chunk)
                    mix_chunk(t[i:j], a[i:j], b[i:j], alpha, beta, work)

    def _threads(self) -> ThreadPoolExecutor | None:
        """The helper threads, started in this process (a forked child has none of them)."""
        if len(self.plans) > 1 and self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(len(self.plans) - 1, thread_name_prefix="mix")
            self._pool_pid = os.getpid()
        return self._pool

    def run(self, coeffs: Sequence[tuple[float, float]]) -> None:
        pool = self._threads()
        futures = [pool.submit(self._run_one, w, coeffs)
                   for w in range(1, len(self.plans))] if pool else []
        try:
            self._run_one(0, coeffs)
        finally:
            for f in futures:
                f.result()

    def close(self) -> None:
        self.tensors, self.plans = [], []  # the views keep the parents' mappings alive
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown()
        self._pool = None


@dataclass(frozen=True)
class Piece:
    """One chunk of one tensor pair on the host: `slot` indexes the switch's tensor list."""

    slot: int
    start: int
    stop: int
    a: torch.Tensor
    b: torch.Tensor


def pieces(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], chunk: int) -> Iterator[Piece]:
    """Cut flat (a, b) host tensor pairs into chunks of at most `chunk` elements, in order."""
    for k, (a, b) in enumerate(pairs):
        n = a.numel()
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            yield Piece(k, i, j, a[i:j], b[i:j])


class HostToDevice:
    """Streams chunk pairs from host memory (memory-mapped parents) to a CUDA device.

    Two slots, each a pinned host buffer and a device buffer per parent. While the device
    computes on one slot, the host copies the next chunk from the mapped file into the other
    slot's pinned buffer and a side stream moves it to the device; events order the reuse of
    each buffer, so host copies, transfers and kernels overlap and memory stays at the slots.
    """

    def __init__(self, device: torch.device, slot_bytes: int = STAGING_BYTES):
        self.device = device
        self.slot_bytes = slot_bytes
        self.copy_stream = torch.cuda.Stream(device=device)
        self.host = [[torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True)
                      for _ in range(2)] for _ in range(2)]
        self.dev = [[torch.empty(slot_bytes, dtype=torch.uint8, device=device)
                     for _ in range(2)] for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.consumed = [torch.cuda.Event() for _ in range(2)]
        for e in self.consumed:
            e.record(torch.cuda.current_stream(device))

    @property
    def nbytes(self) -> int:
        return 4 * self.slot_bytes

    def _stage(self, k: int, piece: Piece) -> tuple[Piece, torch.Tensor, torch.Tensor]:
        self.copied[k].synchronize()  # the pinned buffers of slot k are free again
        views = []
        for p, src in enumerate((piece.a, piece.b)):
            nbytes = src.numel() * src.element_size()
            if nbytes > self.slot_bytes:
                raise ValueError(f"chunk of {nbytes} bytes exceeds the {self.slot_bytes} slot")
            host = self.host[p][k][:nbytes].view(src.dtype)
            host.copy_(src)
            views.append((host, self.dev[p][k][:nbytes].view(src.dtype)))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.consumed[k])  # the device buffers are free again
            for host, dev in views:
                dev.copy_(host, non_blocking=True)
            self.copied[k].record(self.copy_stream)
        return piece, views[0][1], views[1][1]

    def stream(self, chunks: Iterable[Piece]) -> Iterator[tuple[Piece, torch.Tensor, torch.Tensor]]:
        """Yield (piece, a on device, b on device); the caller's kernels on the current stream
        must be queued before it asks for the next piece (they are, when it just loops)."""
        compute = torch.cuda.current_stream(self.device)
        it = iter(chunks)
        staged: deque = deque()
        for k in range(2):
            piece = next(it, None)
            if piece is None:
                break
            staged.append((k, self._stage(k, piece)))
        while staged:
            k, item = staged.popleft()
            compute.wait_event(self.copied[k])
            yield item
            self.consumed[k].record(compute)
            piece = next(it, None)
            if piece is not None:
                staged.append((k, self._stage(k, piece)))


def device_margin(total_bytes: int) -> int:
    return max(MIN_DEVICE_MARGIN, int(DEVICE_MARGIN_FRACTION * total_bytes))


def choose_placement(requested: str, device_type: str, parent_bytes: int,
                     free_bytes: int | None, total_bytes: int | None) -> tuple[str, str]:
    """Where the parents live during switches, and why: `mapped` (CPU: the files' pages),
    `device` (copied to the GPU in their own dtype) or `streamed` (files → pinned → GPU).

    `requested` is auto, device or host; auto keeps them on the GPU only when they fit in the
    free memory with a margin of max(2 GiB, 10 % of the device).
    """
    if device_type == "cpu":
        return "mapped", "CPU: parents are read from their memory-mapped files"
    if device_type != "cuda":
        return "device", f"{device_type}: parents copied to the device (no free-memory query)"
    if requested == "device":
        return "device", "requested: parents on the device"
    if requested == "host":
        return "streamed", "requested: parents streamed from host memory"
    margin = device_margin(total_bytes or 0)
    gib = 1 << 30
    if free_bytes is not None and parent_bytes + margin <= free_bytes:
        return "device", (f"auto: parents {parent_bytes / gib:.1f} GiB + margin "
                          f"{margin / gib:.1f} GiB fit in {free_bytes / gib:.1f} GiB free")
    return "streamed", (f"auto: parents {parent_bytes / gib:.1f} GiB + margin "
                        f"{margin / gib:.1f} GiB exceed {(free_bytes or 0) / gib:.1f} GiB free")
