"""The sentences rendered in DuckDB and Arrow equal those `mimic_text.render` writes (issue 14)."""

from __future__ import annotations

import random

import duckdb
import pyarrow as pa

from common.data import mimic_text as text


def test_printed_means_are_format_mean():
    values = [0.0625, 0.1875, 1.0005, 2.675, -0.0004, -0.0, 0.0005, 123.6375, 1e15 + 0.5, 7.0]
    rng = random.Random(14)
    values += [rng.uniform(-500, 500) for _ in range(2000)]
    values += [round(rng.uniform(0, 300), 1) / rng.choice([2, 3, 4, 8]) for _ in range(2000)]
    con = duckdb.connect()
    con.execute("CREATE TABLE v AS SELECT unnest($1::DOUBLE[]) AS x", [values])
    printed = con.execute(f"SELECT x, {text.sql_mean('x')} FROM v").fetchall()
    assert [p for _, p in printed] == [text.format_mean(x) for x, _ in printed]


def test_arrow_sentences_equal_the_sql_aggregate():
    rng = random.Random(7)
    rows = [(stay, item, f"{rng.randint(0, 99)} for label {item}")
            for stay in range(300)
            for item in rng.sample(range(40), rng.randint(1, 12))]  # fmt: skip
    con = duckdb.connect()
    con.execute("CREATE TABLE t (stay BIGINT, item BIGINT, words VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    want = con.execute(f"SELECT stay, {text.sql_sentence(text.CHART_HEADER, 'words', 'item')} "
                       "FROM t GROUP BY stay ORDER BY stay").fetchall()  # fmt: skip
    got = text.sentences(con.sql("SELECT stay, words FROM t ORDER BY stay, item").to_arrow_table(),
                         "stay", "words", text.CHART_HEADER)  # fmt: skip
    assert list(zip(got.column("stay").to_pylist(), got.column("sentence").to_pylist(),
                    strict=True)) == want  # fmt: skip
    titles = con.execute(f"SELECT stay, {text.sql_joined('words', 'item', 'words')} FROM t "
                         "GROUP BY stay ORDER BY stay").fetchall()  # fmt: skip
    joined = text.joined(con.sql("SELECT stay, words FROM t ORDER BY stay, item, words")
                         .to_arrow_table(), "stay", "words")  # fmt: skip
    assert list(zip(joined.column("stay").to_pylist(), joined.column("joined").to_pylist(),
                    strict=True)) == titles  # fmt: skip


def test_no_rows_give_no_sentences():
    empty = pa.table({"stay": pa.array([], pa.int64()), "words": pa.array([], pa.string())})
    assert text.sentences(empty, "stay", "words", "H").num_rows == 0


def test_means_are_exact_whatever_the_order_of_addition():
    """`sql_avg` is the exact mean of the values (as written, up to 10 decimals), correctly
    rounded once: so the same on every run, whichever thread adds what. DuckDB's plain `avg`
    of DOUBLEs is not (it agrees with the exact mean for about half of these groups), which
    is how a mean on a rounding tie printed differently from run to run."""
    from fractions import Fraction

    rng = random.Random(18862)
    groups = [[round(rng.uniform(0, 300), rng.choice([0, 1, 2, 3]))
               for _ in range(rng.randint(2, 40))] for _ in range(3000)]  # fmt: skip
    keys = [g for g, values in enumerate(groups) for _ in values]
    con = duckdb.connect()
    con.execute("SET threads = 4")
    con.execute("CREATE TABLE t AS SELECT unnest($1::BIGINT[]) AS g, unnest($2::DOUBLE[]) AS x",
                [keys, [v for values in groups for v in values]])
    exact = [float(sum(Fraction(str(v)) for v in values) / len(values)) for values in groups]
    means = dict(con.execute(f"SELECT g, {text.sql_avg('x')} FROM t GROUP BY g").fetchall())
    assert [means[g] for g in range(len(groups))] == exact
    plain = dict(con.execute("SELECT g, avg(x) FROM t GROUP BY g").fetchall())
    assert sum(plain[g] == exact[g] for g in range(len(groups))) < 0.9 * len(groups)
