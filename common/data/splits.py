"""Seeded ways to carve one data set into simulated hospitals.

Federated results depend on how different the sites are, so a simulation must be able to
reproduce the usual regimes: identical sites (iid), sites that differ in outcome rate (label
skew), sites that differ in size (size skew), and the data's own sites (region: eICU regions,
the synthetic cohort's hospitals). Every node computes the same split from the same seed, so
no site list has to be shipped around.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from common.data import lazy
from common.errors import FedmergeError
from common.records import PatientRecord

SplitName = Literal["iid", "label", "size", "region"]
SPLITS: tuple[str, ...] = ("iid", "label", "size", "region")
UNASSIGNED = "unassigned"


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, tag])


Part = Sequence[PatientRecord]  # a list, or a view of lazy records (common.data.lazy)


def _ordered(records: Sequence[PatientRecord]) -> Part:
    """The records sorted by stay id, so a split does not depend on the loader's row order.

    Only the stay ids are read: lazy records stay unbuilt (a view in the new order).
    """
    ids = lazy.stay_ids(records)
    return lazy.take(records, sorted(range(len(ids)), key=ids.__getitem__))


def split_iid(records, sites: int, seed: int = 0) -> list[Part]:
    """A random permutation dealt round-robin: equal sizes and, in expectation, equal rates."""
    recs = _ordered(records)
    order = _rng(seed, 1).permutation(len(recs))
    return [lazy.take(recs, order[k::sites]) for k in range(sites)]


def split_label(records, sites: int, seed: int = 0, alpha: float = 0.5) -> list[Part]:
    """Label skew: each class is divided by its own Dirichlet(alpha) shares, so positive rates
    differ between sites while every site keeps both classes when it can."""
    recs = _ordered(records)
    labels = lazy.labels(recs)
    rng = _rng(seed, 2)
    out: list[list[int]] = [[] for _ in range(sites)]
    for label in (0, 1):
        idx = [i for i, y in enumerate(labels) if y == label]
        idx = [idx[i] for i in rng.permutation(len(idx))]
        shares = rng.dirichlet([alpha] * sites)
        # At least one of each class per site where the class is large enough.
        floor = 1 if len(idx) >= sites else 0
        counts = floor + np.floor(shares * (len(idx) - floor * sites)).astype(int)
        counts[np.argmax(shares)] += len(idx) - counts.sum()
        start = 0
        for k in range(sites):
            out[k].extend(idx[start : start + counts[k]])
            start += counts[k]
    # recs is in stay-id order, so each site's positions sorted are its stays in that order.
    return [lazy.take(recs, sorted(part)) for part in out]


def split_size(records, sites: int, seed: int = 0, ratio: float = 4.0) -> list[Part]:
    """Size skew: site sizes form a geometric sequence whose largest/smallest is `ratio`."""
    recs = _ordered(records)
    order = _rng(seed, 3).permutation(len(recs))
    weights = ratio ** (np.arange(sites) / max(sites - 1, 1))
    counts = np.floor(weights / weights.sum() * len(recs)).astype(int)
    counts[-1] += len(recs) - counts.sum()
    out, start = [], 0
    for c in counts:
        out.append(lazy.take(recs, order[start : start + c]))
        start += c
    return out


def split_region(records) -> tuple[list[str], list[Part]]:
    """The data's own sites (`site_id`), in sorted order; records without one go together."""
    recs = _ordered(records)
    groups: dict[str, list[int]] = {}
    for i, site in enumerate(lazy.site_ids(recs)):
        groups.setdefault(site or UNASSIGNED, []).append(i)
    names = sorted(groups)
    return names, [lazy.take(recs, groups[n]) for n in names]


def split_records(
    records: Sequence[PatientRecord], split: str, sites: int | None, seed: int = 0
) -> tuple[list[str], list[Part]]:
    """Site names and their records for one split; every site must end up non-empty."""
    if split not in SPLITS:
        raise FedmergeError(f"split '{split}': expected one of {', '.join(SPLITS)}")
    if not records:
        raise FedmergeError(f"split '{split}': the data set is empty, expected records")
    if split == "region":
        names, parts = split_region(records)
        if sites is not None and sites != len(names):
            raise FedmergeError(
                f"split 'region': --sites {sites} but the data has {len(names)} sites "
                f"({', '.join(names)}); expected --sites {len(names)} or another split"
            )
        return names, parts
    if sites is None or sites < 1:
        raise FedmergeError(f"split '{split}': sites={sites}, expected an integer >= 1")
    if sites > len(records):
        raise FedmergeError(
            f"split '{split}': {sites} sites for {len(records)} records, expected at most one "
            "site per record"
        )
    fn = {"iid": split_iid, "label": split_label, "size": split_size}[split]
    parts = fn(records, sites, seed)
    for k, part in enumerate(parts):
        if not part:
            raise FedmergeError(
                f"split '{split}': site {k} got no records (seed {seed}); expected more records "
                "or fewer sites"
            )
    return [f"site-{k}" for k in range(sites)], parts


def write_site_files(
    root: Path, names: Sequence[str], parts: Sequence[Sequence[PatientRecord]]
) -> tuple[Path, list[Path]]:
    """One `jsonl:` file per site plus their union, for running the same split as real nodes.

    A deployment test or a rehearsal gives each SuperNode its own file while the simulation
    it is compared with splits the union the same way; each file appears only when complete.
    """
    root.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    union_rows: list[str] = []
    for name, part in zip(names, parts, strict=True):
        rows = [
            json.dumps({"id": r.stay_id, "site": r.site_id, "label": r.label, "text": r.text})
            for r in part
        ]
        files.append(_write_lines(root / f"{name}.jsonl", rows))
        union_rows.extend(rows)
    return _write_lines(root / "all.jsonl", union_rows), files


def _write_lines(path: Path, rows: Sequence[str]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)
    return path
