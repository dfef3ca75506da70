"""Parse a data spec string (`kind:PATH?key=value&...`) into one validated object.

Every command that takes `--data` goes through this parser, so a typo in a spec fails the same
way everywhere: one line naming the spec, the part that is wrong and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict

from common.errors import FedmergeError

# Options each kind understands; anything else is a typo we refuse rather than ignore.
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "jsonl": frozenset(),
    "csv": frozenset(),
    "mimic4": frozenset({
        "hours", "demographics", "site", "bucket", "pred_window", "outlier", "outlier_low",
        "icd_map", "cache", "engine",
    }),
    "eicu": frozenset({"hours", "site", "cache", "select", "engine"}),
    "meds": frozenset({"site", "labels", "hours", "cache"}),
    "synthetic": frozenset(),
}


class DataSpec(BaseModel):
    """A parsed spec: `location` is the path (or, for `synthetic:`, the raw argument string)."""

    model_config = ConfigDict(frozen=True)

    kind: str
    location: str
    options: dict[str, str] = {}

    @property
    def path(self) -> Path:
        return Path(self.location).expanduser()

    def option(self, name: str, default: str) -> str:
        return self.options.get(name, default)

    def float_option(self, name: str, default: float) -> float:
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise FedmergeError(
                f"data spec {self.kind}:{self.location}: option '{name}={raw}' "
                "must be a positive number"
            )
        return value

    def int_option(self, name: str, default: int, *, minimum: int = 1) -> int:
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise FedmergeError(
                f"data spec {self.kind}:{self.location}: option '{name}={raw}' "
                f"must be a whole number >= {minimum}"
            )
        return value

    def bool_option(self, name: str, default: bool) -> bool:
        raw = self.options.get(name)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes"}:
            return True
        if raw.lower() in {"0", "false", "no"}:
            return False
        raise FedmergeError(
            f"data spec {self.kind}:{self.location}: option '{name}={raw}' "
            "must be 1/0 or true/false"
        )


def parse_spec(spec: str) -> DataSpec:
    """Split `kind:location?options`; `synthetic:` keeps everything after the colon verbatim."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KIND_OPTIONS:
        known = ", ".join(f"{k}:" for k in KIND_OPTIONS)
        raise FedmergeError(f"data spec '{spec}': expected one of {known} followed by a path")
    if kind == "synthetic":
        # The synthetic cohort owns its own argument syntax; we only route to it.
        return DataSpec(kind=kind, location=rest)
    location, _, query = rest.partition("?")
    if not location:
        raise FedmergeError(f"data spec '{spec}': the path after '{kind}:' is empty")
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in KIND_OPTIONS[kind]:
            allowed = ", ".join(sorted(KIND_OPTIONS[kind])) or "none"
            raise FedmergeError(
                f"data spec '{spec}': unknown option '{key}' for {kind}: (allowed: {allowed})"
            )
        options[key] = value
    if query and not options:
        raise FedmergeError(f"data spec '{spec}': could not read options '{query}' (use key=value)")
    return DataSpec(kind=kind, location=location, options=options)
