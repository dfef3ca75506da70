"""The coordinator's Flower commands, built from a few validated choices.

Why: the SuperLink's security rests on flags that are easy to drop (`--enable-supernode-auth`
without TLS is refused, TLS without the CA file silently means something else, the
Control API's connection must name the CA). These builders always emit TLS and node
authentication, and `fedmerge coordinator ...` prints the exact command before running it.

The `flwr` CLI addresses a SuperLink through a named connection in
`$FLWR_HOME/config.toml` (`[superlink.NAME] address, root-certificates`), checked in the
installed flwr 1.41 (`flwr.cli.flower_config`); `write_connection` maintains that file.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from client.launch_supernode import (
    OFFLINE_ENV,
    check_host_port,
    flower_exe,
    format_flower_config,
)
from common.errors import FedmergeError


def flwr_env(flwr_home: Path | None) -> dict[str, str]:
    """Offline settings, FLWR_HOME, and this environment's bin first on PATH: the SuperLink
    and SuperNode spawn `flower-superexec`/`flwr-serverapp` by bare name."""
    import sys

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OFFLINE_ENV)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superlink_argv(
    *, ca: Path, cert: Path, key: Path, host: str = "0.0.0.0", port: int = 9093,
    database: Path | None = None,
) -> list[str]:
    """`flower-superlink` with TLS and node authentication; runtime installs disabled."""
    for flag, p in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not Path(p).is_file():
            raise FedmergeError(f"{flag} {p}: file not found (make it with `fedmerge certs`)")
    argv = [
        flower_exe("flower-superlink"),
        "--ssl-ca-certfile", str(ca),
        "--ssl-certfile", str(cert),
        "--ssl-keyfile", str(key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise FedmergeError(f"config.toml: cannot write a {type(v).__name__} value")


def _toml_dump(data: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not subs):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in subs.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"


def write_connection(
    flwr_home: Path, name: str, *, address: str, root_certificates: Path,
    make_default: bool = True,
) -> Path:
    """Add or replace `[superlink.NAME]` in `$FLWR_HOME/config.toml`, keeping other entries."""
    check_host_port(address, "--address")
    flwr_home = Path(flwr_home)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise FedmergeError(f"{path}: not valid TOML ({exc})") from None
    links = data.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(Path(root_certificates).resolve())}
    if make_default or "default" not in links:
        links["default"] = name
    # `default` must come first in its table for readability; TOML does not care.
    data["superlink"] = {"default": links.pop("default"), **links}
    flwr_home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".toml", dir=flwr_home)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(_toml_dump(data))
    os.replace(tmp, path)
    return path


def register_argv(public_key: Path, connection: str, name: str) -> list[str]:
    if not Path(public_key).is_file():
        raise FedmergeError(f"{public_key}: public key file not found")
    flwr = flower_exe("flwr")
    return [flwr, "supernode", "register", str(public_key), connection, "--name", name]


def submit_argv(app_dir: Path, connection: str, run_config: dict[str, Any]) -> list[str]:
    """`flwr run APP CONNECTION --run-config ...` (keys must exist in the app's pyproject)."""
    argv = [flower_exe("flwr"), "run", str(app_dir), connection, "--format", "json"]
    if run_config:
        argv += ["--run-config", format_flower_config(run_config, what="run config")]
    return argv
