"""eICU loading: the row-by-row reader against the DuckDB path, on the demo scaled up.

The full eICU database has 200,859 unit stays; the demo (../shared/data/eicu-demo, ODbL) has
2,520. This writes the seven tables the loader reads with every stay repeated `--scale` times
under new ids (the hospital table as it is), gzipped, into a temporary folder (never into the
repository), then loads it in fresh processes:

1. `eicu:DIR?engine=python`: the row-by-row reference (`python_s`);
2. `eicu:DIR` with an empty cache: the DuckDB path (`first_s`), until `load_records` returns;
3. `eicu:DIR` again, from the cache (`cached_s`).

Both first loads are checked to give the same records. `speedup` = python_s / first_s,
`cached_speedup` = first_s / cached_s. Times are wall-clock seconds of `load_records`, imports
excluded; CPU seconds beside them (DuckDB uses both cores, the reference one). Prints a
table, an extrapolation to the full database (linear in stays) and one JSON line.

    python bench/eicu_load.py [--scale 20] [--eicu ../shared/data/eicu-demo] [--dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.data.eicu_python import TABLES  # noqa: E402

FULL_STAYS = 200_859
ID_STEP = 10_000_000  # new ids: the demo's plus a multiple of this (demo ids are < 4 million)


def write_scaled(source: Path, target: Path, scale: int) -> dict[str, int]:
    """Every table but `hospital` with its rows repeated `scale` times under new stay ids."""
    target.mkdir(parents=True, exist_ok=True)
    rows_out = {}
    for name in TABLES:
        with gzip.open(source / f"{name}.csv.gz", "rt", newline="") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], rows[1:]
        at = header.index("patientunitstayid") if "patientunitstayid" in header else None
        copies = 1 if at is None else scale
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for k in range(copies):
            for row in body:
                if at is not None:
                    row = [*row[:at], str(int(row[at]) + k * ID_STEP), *row[at + 1:]]
                writer.writerow(row)
        tmp = target / f".{name}.csv.gz.tmp"
        with gzip.open(tmp, "wt", compresslevel=1, newline="") as handle:
            handle.write(buffer.getvalue())
        tmp.replace(target / f"{name}.csv.gz")
        rows_out[name] = len(body) * copies
    return rows_out


def _load(spec: str) -> tuple[float, float, float, str]:
    """One `load_records(spec)` in this fresh process: wall s, CPU s, peak GB, a digest."""
    os.environ["FEDMERGE_QUIET"] = "1"
    import hashlib

    import duckdb  # noqa: F401  (imports are not load time)
    import pyarrow  # noqa: F401

    import common.data.eicu  # noqa: F401
    from common.data import load_records

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    records = load_records(spec)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.stay_id}\t{r.site_id}\t{r.label}\t{r.text}\n".encode())
    return seconds, cpu, usage.ru_maxrss / 1024**2, digest.hexdigest()


def _fresh(spec: str) -> tuple[float, float, float, str]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_load, spec).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=20, help="copies of every demo stay")
    ap.add_argument("--eicu", type=Path, default=ROOT.parent / "shared" / "data" / "eicu-demo")
    ap.add_argument("--dir", type=Path, default=None, help="reuse or keep the scaled export")
    args = ap.parse_args()
    if not (args.eicu / "patient.csv.gz").is_file():
        sys.exit(f"{args.eicu}: the eICU demo is not there (expected ../shared/data/eicu-demo)")
    with tempfile.TemporaryDirectory() as tmp:
        export = args.dir or Path(tmp) / "eicu"
        if not (export / "patient.csv.gz").is_file():
            print(f"writing the demo x{args.scale} to {export} ...", flush=True)
            rows = write_scaled(args.eicu, export, args.scale)
            print("  " + ", ".join(f"{k} {v:,}" for k, v in rows.items()), flush=True)
        cache = Path(tmp) / "cache"
        print("row-by-row reference ...", flush=True)
        python_s, python_cpu, python_gb, python_digest = _fresh(f"eicu:{export}?engine=python")
        print("DuckDB path, empty cache ...", flush=True)
        first_s, first_cpu, first_gb, first_digest = _fresh(f"eicu:{export}?cache={cache}")
        print("from the cache ...", flush=True)
        cached_s, _, cached_gb, cached_digest = _fresh(f"eicu:{export}?cache={cache}")
    same = python_digest == first_digest == cached_digest
    stays = 2_520 * args.scale
    full = FULL_STAYS / stays
    print(f"\n{'load':28} {'wall s':>8} {'CPU s':>7} {'peak GB':>8}")
    for name, s, c, gb in (("row by row (reference)", python_s, python_cpu, python_gb),
                           ("DuckDB, first load", first_s, first_cpu, first_gb),
                           ("DuckDB, from the cache", cached_s, None, cached_gb)):
        print(f"{name:28} {s:8.2f} {'' if c is None else f'{c:7.2f}':>7} {gb:8.2f}")
    print(f"same records: {same}; full eICU ({FULL_STAYS:,} stays, linear): reference "
          f"~{python_s * full:.0f} s, DuckDB ~{first_s * full:.0f} s")
    print(json.dumps({
        "scale": args.scale, "stays_approx": stays, "python_s": python_s, "first_s": first_s,
        "cached_s": cached_s, "python_cpu_s": python_cpu, "first_cpu_s": first_cpu,
        "speedup": python_s / first_s, "cached_speedup": first_s / cached_s,
        "peak_rss_gb": max(python_gb, first_gb, cached_gb), "same_records": same,
        "full_python_s_est": python_s * full, "full_first_s_est": first_s * full,
    }))


if __name__ == "__main__":
    main()
