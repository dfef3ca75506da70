"""Keep one site's stays out of a data set that holds several (rehearsals, the eICU demo).

Why: a rehearsal gives every node the same multi-site source (`synthetic:sites=3`, the eICU
demo); without a selector each node silently scored every site's stays. A selector that
matches nothing is an error naming the sites the data does hold, never an empty cohort.
"""

from __future__ import annotations

from common.errors import FedmergeError
from common.records import PatientRecord


def select_site(
    records: list[PatientRecord], site: str, spec: str, option: str
) -> list[PatientRecord]:
    chosen = [r for r in records if r.site_id == site]
    if not chosen:
        present = sorted({str(r.site_id) for r in records})
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        raise FedmergeError(
            f"data spec {spec}: {option}={site} selects no stays (expected one of: {shown})"
        )
    return chosen
