"""Keep one site's stays out of a data set that holds several (rehearsals, the eICU demo).

Why: a rehearsal gives every node the same multi-site source (`synthetic:sites=3`, the eICU
demo); without a selector each node silently scored every site's stays. A selector that
matches nothing is an error naming the sites the data does hold, never an empty cohort.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.data import lazy
from common.errors import FedmergeError
from common.records import PatientRecord


def select_site(
    records: Sequence[PatientRecord], site: str, spec: str, option: str
) -> Sequence[PatientRecord]:
    """The stays of `site` (read from the site column when the records are lazy)."""
    sites = lazy.site_ids(records)
    chosen = [i for i, s in enumerate(sites) if s == site]
    if not chosen:
        present = sorted({str(s) for s in sites})
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        raise FedmergeError(
            f"data spec {spec}: {option}={site} selects no stays (expected one of: {shown})"
        )
    return lazy.take(records, chosen)
