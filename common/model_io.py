"""Reading Hugging Face model directories lazily, and writing safetensors one tensor at a time.

Merging 7B+ checkpoints must not need two whole models in RAM, and a broken parent must be
refused before minutes of work are spent. So a checkpoint is opened by parsing the safetensors
headers only (names, shapes, dtypes, byte ranges: enough to validate everything), and tensors
are handed out memory-mapped, one at a time, on request. The writer streams tensors straight
into a file whose header is computed up front, so the output is never held in memory either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedmergeError

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Files a tokenizer may consist of; copied from the donor so the output loads with AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# safetensors dtype codes -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
CODE_OF = {torch_name: code for code, (torch_name, _) in DTYPES.items()}

_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "F32"
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; a truncated or corrupt file is one clear error.

    Validating here (byte ranges against the file size) catches a half-copied download before
    any merge work starts, instead of a crash deep inside a memory-mapped read.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FedmergeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FedmergeError(
                    f"{path}: corrupt or truncated safetensors file: header length {n} "
                    f"does not fit in {size} bytes"
                )
            raw = fh.read(n)
    except FileNotFoundError:
        raise FedmergeError(f"{path}: missing weights file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise FedmergeError(f"{path}: corrupt safetensors header ({exc})") from None
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            code = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FedmergeError(
                f"{path}: corrupt safetensors header entry for tensor {name}: "
                "expected dtype, shape and data_offsets"
            ) from None
        if code not in DTYPES:
            raise FedmergeError(
                f"{path}: tensor {name} has unsupported dtype {code} "
                f"(supported: {', '.join(DTYPES)})"
            )
        info = TensorInfo(name, shape, code, path)
        if end - begin != info.nbytes or begin < 0:
            raise FedmergeError(
                f"{path}: corrupt safetensors header: tensor {name} {list(shape)} {code} "
                f"needs {info.nbytes} bytes but data_offsets span {end - begin}"
            )
        end_max = max(end_max, end)
        infos[name] = info
    if end_max > data_len:
        raise FedmergeError(
            f"{path}: truncated safetensors file: header needs {end_max} bytes of tensor data, "
            f"the file holds {data_len}"
        )
    return infos


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedmergeError(f"{path}: missing {what}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FedmergeError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FedmergeError(f"{path}: {what} must be a JSON object")
    return data


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or the shards of the index)."""
    index = model_dir / INDEX_NAME
    if index.exists():
        data = read_json(index, "safetensors index")
        wmap = data.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise FedmergeError(f"{index}: field weight_map: expected a mapping tensor -> file")
        return [model_dir / f for f in sorted(set(wmap.values()))]
    single = model_dir / SINGLE_WEIGHTS
    if single.exists():
        return [single]
    raise FedmergeError(
        f"{model_dir}: missing weights: expected {SINGLE_WEIGHTS} or {INDEX_NAME} "
        "(only safetensors checkpoints are read)"
    )


class Checkpoint:
    """A model directory opened lazily: config and headers parsed, tensors mapped on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FedmergeError(f"{self.path}: missing model directory (nothing is downloaded)")
        self.config = read_json(self.path / CONFIG_NAME, "config.json")
        self.files = weight_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in read_safetensors_header(file).items():
                if name in self.tensors:
                    raise FedmergeError(f"{file}: tensor {name} also appears in another shard")
                self.tensors[name] = info
        index = self.path / INDEX_NAME
        if index.exists():
            wmap = read_json(index, "safetensors index")["weight_map"]
            for name, fname in wmap.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise FedmergeError(
                        f"{index}: weight_map says tensor {name} is in {fname}, "
                        "but that shard does not hold it"
                    )
        self._handles: dict[Path, object] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str):
        """The tensor `name` as a memory-mapped torch tensor (no copy until written or cast)."""
        from safetensors import SafetensorError, safe_open

        info = self.tensors[name]
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = safe_open(str(info.file), framework="pt")
                self._handles[info.file] = handle
            return handle.get_tensor(name)
        except SafetensorError as exc:
            raise FedmergeError(f"{info.file}: cannot read tensor {name} ({exc})") from None

    def close(self) -> None:
        self._handles.clear()


def require_checkpoint(path: str | os.PathLike[str], what: str) -> Path:
    """`path` as a checkpoint directory (one holding config.json), or one error naming `what`.

    Every side checks its parents before any work: the coordinator before it announces
    fingerprints, a hospital before it hashes or loads them, `fedmerge score` before loading.
    """
    root = Path(path)
    if not (root / CONFIG_NAME).is_file():
        raise FedmergeError(
            f"{what} {root}: config.json not found; expected a local checkpoint directory"
        )
    return root


def fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """SHA-256 identifying a checkpoint by content: config.json, the weight files and the
    tokenizer's files (vocabulary, tokenizer config with its chat template), sorted by name.

    Each file contributes its name, its length and its bytes, so the digest is the same on every
    machine (no paths, times or permissions) and changes if any weight, config or tokenizer byte
    does: two sites that agree on it score the same prompts with the same model.
    """
    root = Path(model_dir)
    files = [root / CONFIG_NAME, *weight_files(root), *tokenizer_files(root)]
    index = root / INDEX_NAME
    if index.exists():
        files.append(index)
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        try:
            size = file.stat().st_size
            digest.update(file.name.encode() + b"\0" + str(size).encode() + b"\0")
            with file.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        except FileNotFoundError:
            raise FedmergeError(f"{file}: missing file") from None
    return digest.hexdigest()


def tokenizer_files(model_dir: Path) -> list[Path]:
    return [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will emit: its header entry is known before any data is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def plan_shards(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `shard_size` bytes (a lone big tensor
    gets a shard of its own), like `save_pretrained(max_shard_size=...)`."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_WEIGHTS]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_safetensors_stream(
    path: Path, planned: list[PlannedTensor], tensors: Iterable, metadata: dict[str, str]
) -> None:
    """Write a safetensors file whose tensors arrive one at a time from `tensors`.

    The header (names, shapes, byte ranges) is fixed by `planned`, so each tensor can be written
    and dropped immediately; every arriving tensor is checked against its planned entry.
    """
    import torch

    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in planned:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment keeps tensor data aligned when mapped
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        it: Iterator = iter(tensors)
        for t in planned:
            value = next(it)
            expected = getattr(torch, DTYPES[t.dtype][0])
            if tuple(value.shape) != t.shape or value.dtype != expected:
                raise RuntimeError(f"writer got {t.name} as {tuple(value.shape)} {value.dtype}")
            data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            fh.write(memoryview(data.numpy()))
        fh.flush()
        os.fsync(fh.fileno())
