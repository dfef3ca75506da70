"""What every Flower process fedmerge starts shares: the pin, the offline environment, argv text.

Why one module: the coordinator's SuperLink, a hospital's SuperNode and worker, the local
simulation and the tests each start Flower. If each kept its own copy of the environment, one
of them would eventually forget a variable and call out from a hospital, or accept a Flower
release whose internals fedmerge patches (the SecAgg+ masks, the node's poll, the worker's
Runtime API) without having been checked against it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import FedmergeError

# The Flower release whose internals fedmerge's patches were checked against.
PINNED_FLWR_VERSION = "1.41.0"

# Nothing may call out: no hub downloads, no telemetry, no update check, no runtime installs.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def check_flwr_version(what: str = "fedmerge's Flower patches") -> None:
    """Refuse to run on a Flower release the patches were not checked against."""
    import flwr

    version = getattr(flwr, "__version__", None)
    if version is None:  # pragma: no cover - every release sets it
        from importlib.metadata import version as dist_version

        version = dist_version("flwr")
    if version != PINNED_FLWR_VERSION:
        raise FedmergeError(
            f"flwr {version} is installed; {what} were checked against "
            f"flwr=={PINNED_FLWR_VERSION} only (expected that version; reinstall it)"
        )


def set_offline_defaults(environ: dict[str, str] | None = None) -> None:
    """Put the offline settings into `environ` (default: this process) unless already set."""
    target = os.environ if environ is None else environ
    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)


def flower_env(
    flwr_home: Path | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a Flower child process: offline, FLWR_HOME, this environment's bin
    first on PATH (the SuperLink and SuperNode spawn their helpers by bare name)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OFFLINE_ENV)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_exe(name: str) -> str:
    """The Flower executable of THIS environment (the one fedmerge runs in), else PATH's."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def check_host_port(value: str, field: str) -> str:
    m = HOST_PORT_RE.match(value)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"{field}: expected HOST:PORT (e.g. 127.0.0.1:9093), got {value!r}")
    return value


def format_flower_config(values: Mapping[str, Any], *, what: str) -> str:
    """`k='v' n=3 b=true`, the key=value syntax of `--node-config` and `--run-config`.

    Strings become TOML literal strings (single quotes: no escape processing, so Windows
    paths and backslashes survive); Flower's parser cannot carry a single quote or a
    newline inside a value, so those are refused here rather than mangled there.
    """
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise FedmergeError(f"{what} key {key!r}: expected letters, digits, '_' or '-'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str | Path):
            s = str(value)
            if "'" in s or "\n" in s:
                raise FedmergeError(
                    f"{what} {key}={s!r}: Flower cannot pass a single quote or newline here"
                )
            text = f"'{s}'"
        else:
            raise FedmergeError(
                f"{what} {key}: expected a string, number or bool, got {type(value).__name__}"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


def shell_line(argv: list[str]) -> str:
    """The command as an operator would paste it into a shell."""
    return shlex.join(argv)
