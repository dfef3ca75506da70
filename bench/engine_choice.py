"""Which embedded engine reads MIMIC-IV's chartevents faster: DuckDB or Polars (same export).

The query is the core of the MIMIC-IV loader: read the gzipped chartevents, keep rows with a
number, join the ICU stays, keep the first 48 hours and average per stay and item. Polars is
not a fedmerge dependency; install it (`pip install polars==2.1.0`) to rerun this comparison.
Prints a table and ends with one JSON line.

    python bench/engine_choice.py [--stays 40000] [--rows 5000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import duckdb
from mimic_export import write_export


def with_duckdb(root: Path) -> int:
    con = duckdb.connect()
    con.execute("SET memory_limit = '6GB'")
    con.execute("SET enable_progress_bar = false")
    return con.execute(f"""
        SELECT count(*) FROM (
          SELECT c.stay_id, c.itemid, avg(c.valuenum)
          FROM read_csv('{root}/icu/chartevents.csv.gz', header = true, all_varchar = true,
                        types = {{'stay_id': 'BIGINT', 'itemid': 'BIGINT',
                                 'charttime': 'TIMESTAMP', 'valuenum': 'DOUBLE'}}) c
          JOIN read_csv('{root}/icu/icustays.csv.gz', header = true) s USING (stay_id)
          WHERE c.valuenum IS NOT NULL AND c.charttime >= s.intime
            AND c.charttime < s.intime + INTERVAL 48 HOUR
          GROUP BY c.stay_id, c.itemid)""").fetchone()[0]


def with_polars(root: Path) -> int:
    import polars as pl

    stays = pl.read_csv(root / "icu/icustays.csv.gz", try_parse_dates=True).select(
        "stay_id", "intime"
    )
    chart = (
        pl.scan_csv(root / "icu/chartevents.csv.gz", infer_schema=False)
        .select(
            pl.col("stay_id").cast(pl.Int64),
            pl.col("itemid").cast(pl.Int64),
            pl.col("charttime").str.to_datetime("%Y-%m-%d %H:%M:%S"),
            pl.col("valuenum").cast(pl.Float64),
        )
        .filter(pl.col("valuenum").is_not_null())
        .join(stays.lazy(), on="stay_id")
        .filter(
            (pl.col("charttime") >= pl.col("intime"))
            & (pl.col("charttime") < pl.col("intime") + pl.duration(hours=48))
        )
        .group_by("stay_id", "itemid")
        .agg(pl.col("valuenum").mean())
    )
    return chart.collect().height


def _timed(name: str, root: Path) -> tuple[float, int, float]:
    fn = with_duckdb if name == "duckdb" else with_polars
    start = time.perf_counter()
    groups = fn(root)
    seconds = time.perf_counter() - start
    return seconds, groups, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=40_000)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "mimic"
        if not (root / "icu/chartevents.csv.gz").exists():
            write_export(root, stays=args.stays, chart_rows=args.rows)
        results = {}
        # Each engine in its own process, so the peak memory is its own.
        for name in ("duckdb", "polars"):
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                results[name] = pool.submit(_timed, name, root).result()
    print(f"{'engine':<8} {'seconds':>8} {'rows/s':>12} {'groups':>8} {'peak GB':>8}")
    for name, (seconds, groups, peak) in results.items():
        print(f"{name:<8} {seconds:8.2f} {args.rows / seconds:12,.0f} {groups:8d} {peak:8.2f}")
    print(json.dumps({
        "rows": args.rows,
        "duckdb_s": round(results["duckdb"][0], 3),
        "polars_s": round(results["polars"][0], 3),
        "duckdb_peak_rss_gb": round(results["duckdb"][2], 3),
        "polars_peak_rss_gb": round(results["polars"][2], 3),
        "same_groups": results["duckdb"][1] == results["polars"][1],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
