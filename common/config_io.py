"""Reading the YAML files operators write (recipes, node files, merge recipes).

Why one reader: each file kind used to parse YAML its own way, with its own wording for a
missing file or a syntax error. Here a missing file, a YAML error (with its line) and a
top level that is not a mapping are each one line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import FedmergeError


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The file's top-level mapping; `what` names the kind of file in errors ("node file")."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FedmergeError(f"{path}: missing {what} (file not found)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise FedmergeError(f"{path}:{where} not valid YAML") from None
    if not isinstance(raw, dict):
        raise FedmergeError(f"{path}: expected a mapping of {what} fields")
    return raw
