"""The coordinator's hand-off to Flower: SuperLink command, connection, registration, submission.

Why: the SuperLink's security rests on flags that are easy to drop (`--enable-supernode-auth`
without TLS is refused, TLS without the CA file silently means something else, the
Control API's connection must name the CA). These builders always emit TLS and node
authentication, and `fedmerge coordinator ...` prints the exact command before running it.

The `flwr` CLI addresses a SuperLink through a named connection in
`$FLWR_HOME/config.toml` (`[superlink.NAME] address, root-certificates`), checked in the
installed flwr 1.41 (`flwr.cli.flower_config`); `write_connection` maintains that file.

A submitted run is a STAGED copy of the app: the ServerApp reads its recipe from Flower's
flat run config (`server.recipe`'s keys) and runs next to the SuperLink, so paths in the
recipe are the coordinator's. `flwr run --run-config` refuses keys that the app's pyproject
does not declare, so staging writes a pyproject whose `[tool.flwr.app.config]` declares every
key this run sets and whose components are the deployment apps; it also keeps tests,
benchmarks and docs out of the bundle (Flower caps it at 10 MB).
"""

from __future__ import annotations

import fnmatch
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.atomic_files import write_atomic
from common.errors import FedmergeError
from common.flower_runtime import check_host_port, flower_exe, format_flower_config

# The apps a deployment runs (pyproject's components are `flwr run .`'s simulation apps).
DEPLOY_COMPONENTS = {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}
PACKAGES = ("common", "client", "server", "simulation")
STAGED_PATTERNS = ("*.py", "*.json", "*.yaml", "*.md", "*.jinja", "*.txt")
# The SuperLink listens on loopback unless the operator says where hospitals dial.
DEFAULT_LISTEN_HOST = "127.0.0.1"


def superlink_argv(
    *, ca: Path, cert: Path, key: Path, host: str = DEFAULT_LISTEN_HOST, port: int = 9093,
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
    write_atomic(path, _toml_dump(data))
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


def locate_app_dir(app_dir: Path | None) -> Path:
    """The fedmerge source tree holding the Flower app's pyproject."""
    root = Path(app_dir) if app_dir else Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app" not in pyproject.read_text():
        raise FedmergeError(
            f"{pyproject}: expected the fedmerge source tree's pyproject with [tool.flwr.app]"
        )
    return root


def recipe_run_config(recipe) -> dict[str, Any]:
    """The inverse of `server.recipe.recipe_from_run_config`: recipe -> flat run config."""
    from server.recipe import RUN_KEYS, recipe_from_run_config

    values: dict[str, Any] = {}
    for key, path in RUN_KEYS.items():
        value = recipe
        for part in path:
            value = getattr(value, part) if value is not None else None
        if value is None:  # unset (a histogram left to the privacy mode's default)
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        values[key] = value
    if recipe_from_run_config(values) != recipe:  # pragma: no cover - guards a key drift
        raise FedmergeError("recipe does not survive the run-config round trip")
    return values


def stage_app(
    app_dir: Path | None, dest: Path, run_config: dict[str, Any], *,
    serverapp: str | None = None, extra_files: Sequence[Path] = (),
) -> Path:
    """Copy the app's packages to `dest` and write a pyproject declaring `run_config`'s keys.

    `serverapp` and `extra_files` (copied to the bundle's top level) let a benchmark ship
    its own instrumented ServerApp; operators never need them.
    """
    app_dir = locate_app_dir(app_dir)
    project = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for pkg in PACKAGES:
        for src in sorted((app_dir / pkg).rglob("*")):
            rel = src.relative_to(app_dir)
            if not src.is_file() or "__pycache__" in rel.parts:
                continue
            if any(fnmatch.fnmatch(src.name, p) for p in STAGED_PATTERNS):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    flwr_app = project["tool"]["flwr"]["app"]
    config = {**flwr_app.get("config", {})}
    for key, value in run_config.items():
        config[key] = value
    for extra in extra_files:
        shutil.copy2(extra, dest / Path(extra).name)
    components = dict(DEPLOY_COMPONENTS)
    if serverapp:
        components["serverapp"] = serverapp
    staged = {
        "project": {
            "name": project["project"]["name"],
            "version": project["project"]["version"],
            "description": project["project"].get("description", ""),
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": flwr_app["publisher"],
                    "components": components,
                    "config": config,
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(_toml_dump(staged), encoding="utf-8")
    return dest


def run_config_for(recipe, out: Path, sites: int | None) -> dict[str, Any]:
    values = recipe_run_config(recipe)
    values["out"] = str(Path(out).resolve())
    if sites:
        values["sites"] = int(sites)
    return values
