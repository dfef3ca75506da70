"""One error type for bad input, so the CLI can print one clear line and exit non-zero."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class FedmergeError(Exception):
    """Bad input or a refused operation; the message names the file, field and what was expected."""


def validation_error(source: str, exc: ValidationError, *, prefix: str = "") -> FedmergeError:
    """Pydantic's errors as one line naming `source` and every offending field, first first.

    Every config fedmerge reads (recipes, node files, site policies, merge recipes) reports
    through here, so an operator sees the same shape of message whichever file is wrong.
    """
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"field '{prefix}{loc}': {err['msg']}")
    return FedmergeError(f"{source}: {'; '.join(parts)}")
