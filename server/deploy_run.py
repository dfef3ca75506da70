"""What a deployed tuning run needs from the coordinator's side: the app, the recipe, `out`.

The ServerApp reads its recipe from Flower's flat run config (`server.recipe`'s keys) and
runs next to the SuperLink, on the coordinator's machine, so paths in the recipe are the
coordinator's. `flwr run --run-config` refuses keys that the app's pyproject does not
declare, so the submitted app is a STAGED copy: the four fedmerge packages plus the real
pyproject whose `[tool.flwr.app.config]` declares every key this run sets. Staging also
keeps tests, benchmarks and docs out of the app bundle (Flower caps it at 10 MB).
"""

from __future__ import annotations

import fnmatch
import shutil
import tomllib
from pathlib import Path
from typing import Any

from common.errors import FedmergeError

PACKAGES = ("common", "client", "server", "simulation")
STAGED_PATTERNS = ("*.py", "*.json", "*.yaml", "*.md", "*.jinja", "*.txt")


def locate_app_dir(app_dir: Path | None) -> Path:
    """The fedmerge source tree holding the Flower app's pyproject."""
    root = Path(app_dir) if app_dir else Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app" not in pyproject.read_text():
        raise FedmergeError(
            f"{pyproject}: expected the fedmerge source tree's pyproject with [tool.flwr.app]"
        )
    return root


def load_recipe(path: Path):
    """RECIPE.yaml (TuningRecipe's fields, nested as in the model) to a validated recipe."""
    from server.recipe import validate_recipe

    return validate_recipe(read_recipe_yaml(path), source=str(path))


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """The recipe file's fields, parent paths made absolute against the file's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FedmergeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise FedmergeError(f"{path}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise FedmergeError(f"{path}: expected a mapping of recipe fields")
    base = path.resolve().parent
    for key in ("parent_a", "parent_b"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            raw[key] = str((base / raw[key]).resolve())
    return raw


def recipe_run_config(recipe) -> dict[str, Any]:
    """The inverse of `server.recipe.recipe_from_run_config`: recipe -> flat run config."""
    from server.recipe import RUN_KEYS, recipe_from_run_config

    values: dict[str, Any] = {}
    for key, path in RUN_KEYS.items():
        value = recipe
        for part in path:
            value = getattr(value, part)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        values[key] = value
    if recipe_from_run_config(values) != recipe:  # pragma: no cover - guards a key drift
        raise FedmergeError("recipe does not survive the run-config round trip")
    return values


def stage_app(app_dir: Path, dest: Path, run_config: dict[str, Any],
              serverapp: str | None = None) -> Path:
    """Copy the app's packages to `dest` and write a pyproject declaring `run_config`'s keys."""
    from server.deploy_commands import _toml_dump

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
    components = dict(flwr_app["components"])
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
