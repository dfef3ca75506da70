"""One error type for bad input, so the CLI can print one clear line and exit non-zero."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class FedmergeError(Exception):
    """Bad input or a refused operation; the message names the file, field and what was expected."""


class RunStopped(FedmergeError):
    """A tuning run cannot go on. `cause` is a fixed code (report.json's `cause`, for scripts
    and the terminal) and `nodes` the node ids it concerns (the sites missing), so nothing
    downstream has to parse the English message, which stays for people."""

    CAUSES = ("too-few-sites", "single-class", "secure-aggregation-error")

    def __init__(self, message: str, *, cause: str, nodes=()) -> None:
        if cause not in self.CAUSES:
            raise ValueError(f"RunStopped: unknown cause {cause!r}")
        super().__init__(message)
        self.cause = cause
        self.nodes = tuple(int(n) for n in nodes)

    def __reduce__(self):  # keyword-only fields: rebuild explicitly (pickle, copy)
        return _rebuild_run_stopped, (str(self), self.cause, self.nodes)


def _rebuild_run_stopped(message: str, cause: str, nodes: tuple[int, ...]) -> RunStopped:
    return RunStopped(message, cause=cause, nodes=nodes)


def validation_error(source: str, exc: ValidationError, *, prefix: str = "") -> FedmergeError:
    """Pydantic's errors as one line naming `source` and every offending field, first first.

    Every config fedmerge reads (recipes, node files, site policies, merge recipes) reports
    through here, so an operator sees the same shape of message whichever file is wrong.
    """
    return validation_errors(source, [(exc, prefix)])


def validation_errors(
    source: str, failures: list[tuple[ValidationError, str]]
) -> FedmergeError:
    """Several models' errors (e.g. a node file's two sections) as ONE line, all at once.

    Never the offending value: an unknown key is named, a bad value only by its field (a
    value may be a path or, pasted by mistake, a line of patient text).
    """
    parts = []
    for exc, prefix in failures:
        for err in exc.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"field '{prefix}{loc}': {msg}")
    return FedmergeError(f"{source}: {'; '.join(parts)}")
