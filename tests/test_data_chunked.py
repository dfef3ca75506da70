"""The gzipped-CSV chunker that lets DuckDB parse chartevents on every core (issue 14)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from mimic4_fixture import COLUMNS, ROWS, write_mimic4, write_table

from common.data import chunked, load_records
from common.errors import FedmergeError


def _gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", newline="") as handle:
        handle.write(text)
    return path


def _pieces(source: Path, tmp_path: Path, size: int) -> list[tuple[str, int]]:
    """Each chunk's text and first line, read before the chunker deletes it."""
    return [(c.path.read_text(), c.first_line)
            for c in chunked.chunks(source, tmp_path / "work", size)]  # fmt: skip


def test_chunks_rebuild_the_table_and_number_their_lines(tmp_path):
    rows = [f"{i},value {i}" for i in range(200)]
    source = _gz(tmp_path / "t.csv.gz", "id,text\n" + "\n".join(rows) + "\n")
    pieces = _pieces(source, tmp_path, 100)
    assert len(pieces) > 5
    body: list[str] = []
    for text, first_line in pieces:
        lines = text.splitlines()
        assert lines[0] == "id,text"  # every chunk is a CSV of its own
        assert lines[1] == rows[first_line - 2]  # file line 2 is row 0
        body.extend(lines[1:])
    assert body == rows
    assert not any((tmp_path / "work").iterdir())  # every chunk file is gone


def test_a_quoted_line_break_never_splits_a_row(tmp_path):
    long_quote = '"' + "word\n" * 40 + '""quoted"" end"'
    text = "id,text\n" + "".join(f"{i},{long_quote}\n" for i in range(6))
    pieces = _pieces(_gz(tmp_path / "q.csv.gz", text), tmp_path, 64)
    rebuilt = "".join(piece.split("\n", 1)[1] for piece, _ in pieces)
    assert rebuilt == text.split("\n", 1)[1]
    assert all(piece.split("\n", 1)[1].startswith(tuple("012345")) for piece, _ in pieces)
    assert [first for _, first in pieces] == sorted({first for _, first in pieces})


def test_leaving_early_removes_the_chunks_and_stops_the_inflater(tmp_path):
    source = _gz(tmp_path / "t.csv.gz", "a\n" + "1\n" * 10_000)
    import threading

    chunks = chunked.chunks(source, tmp_path / "work", 256)
    for _chunk in chunks:
        break
    chunks.close()  # what leaving a loop does to a generator no one holds any more
    assert not any((tmp_path / "work").iterdir())
    assert not [t for t in threading.enumerate() if t.name.startswith("inflate-")]


def test_a_file_that_is_not_gzip_is_one_error(tmp_path):
    source = tmp_path / "bad.csv.gz"
    source.write_bytes(b"not gzip at all\n1,2\n")
    with pytest.raises(FedmergeError, match=r"bad\.csv\.gz: cannot inflate"):
        list(chunked.chunks(source, tmp_path, 64))


@pytest.fixture
def mimic_copy(tmp_path) -> Path:
    return write_mimic4(tmp_path / "mimic4")


def test_a_bad_value_in_a_later_chunk_names_its_line_in_the_whole_file(mimic_copy, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)  # a few rows per chunk
    good = ROWS["icu/chartevents"]
    rows = good * 5 + [dict(good[0], valuenum="high")]
    write_table(mimic_copy / "icu/chartevents.csv.gz", COLUMNS["icu/chartevents"].split(), rows)
    with pytest.raises(FedmergeError, match=rf"chartevents\.csv\.gz: line {len(rows) + 1}, "
                       r"column 'valuenum': 'high' is not a number"):  # fmt: skip
        load_records(f"mimic4:{mimic_copy}?cache=off")


def test_small_chunks_give_the_same_records(mimic_copy, monkeypatch):
    whole = [(r.stay_id, r.text) for r in load_records(f"mimic4:{mimic_copy}?cache=off")]
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 150)
    assert [(r.stay_id, r.text)
            for r in load_records(f"mimic4:{mimic_copy}?cache=off")] == whole  # fmt: skip


def test_a_damaged_chartevents_gz_is_one_error(mimic_copy):
    path = mimic_copy / "icu/chartevents.csv.gz"
    path.write_bytes(path.read_bytes()[:-20])  # truncated: the gzip trailer is missing
    with pytest.raises(FedmergeError, match=r"chartevents\.csv\.gz: cannot inflate"):
        load_records(f"mimic4:{mimic_copy}?cache=off")


def test_a_quote_that_never_closes_is_one_error_not_a_read_to_the_end(tmp_path):
    rows = [f"{i},fine" for i in range(20)] + ['20,"opens and never closes'] + [
        f"{i},more\n" for i in range(21, 2000)]
    source = _gz(tmp_path / "q.csv.gz", "id,text\n" + "\n".join(rows) + "\n")
    with pytest.raises(FedmergeError, match=r"q\.csv\.gz: line 22: a quoted field does not "
                       r"close within"):  # fmt: skip
        _pieces(source, tmp_path, 256)
    assert not any((tmp_path / "work").iterdir())


def test_a_row_with_an_extra_field_in_a_later_chunk_names_its_line_in_the_whole_file(
        mimic_copy, monkeypatch):  # fmt: skip
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)  # a few rows per chunk
    good = ROWS["icu/chartevents"]
    path = mimic_copy / "icu/chartevents.csv.gz"
    write_table(path, COLUMNS["icu/chartevents"].split(), good * 5)
    with gzip.open(path, "rt", newline="") as handle:
        text = handle.read()
    lines = text.splitlines()
    bad = len(lines) - 3  # one field too many on a row of a later chunk (file line bad + 1)
    lines[bad] += ",surplus"
    _gz(path, "\n".join(lines) + "\n")
    with pytest.raises(FedmergeError, match=rf"chartevents\.csv\.gz: .*Line: {bad + 1}\b"):
        load_records(f"mimic4:{mimic_copy}?cache=off")


def test_chunks_go_to_memory_backed_scratch_only_when_it_has_room(tmp_path, monkeypatch):
    ram = tmp_path / "ram"
    ram.mkdir()
    monkeypatch.setattr(chunked, "RAM_DIR", ram)
    monkeypatch.setattr(chunked, "RAM_ROOM", 1)
    assert chunked.scratch_dir(tmp_path / "spill") == ram
    monkeypatch.setattr(chunked, "RAM_ROOM", 1 << 62)  # more than any disk: too small
    assert chunked.scratch_dir(tmp_path / "spill") == tmp_path / "spill"
    monkeypatch.setattr(chunked, "RAM_DIR", tmp_path / "absent")
    assert chunked.scratch_dir(None) is None


def test_a_chunk_without_quotes_is_cut_at_its_last_line_break():
    assert chunked._cut(b"a,b\n1,2\n3,") == len(b"a,b\n1,2\n")
    assert chunked._cut(b'a,"x\ny"\n3,"') == len(b'a,"x\ny"\n')  # quoted break kept inside
    assert chunked._cut(b"no break") == 0


@pytest.mark.parametrize("block", [3, 7, 50, 1 << 20])
def test_blocks_smaller_than_a_chunk_keep_rows_whole_and_lines_numbered(tmp_path, monkeypatch,
                                                                        block):  # fmt: skip
    monkeypatch.setattr(chunked, "BLOCK_BYTES", block)  # a chunk is written block by block
    rows = [f'{i},"note {i}\nspans ""lines""",x' if i % 3 == 0 else f"{i},plain,x"
            for i in range(60)]  # fmt: skip
    text = "id,text,more\n" + "\n".join(rows) + "\n"
    pieces = _pieces(_gz(tmp_path / "b.csv.gz", text), tmp_path, 64)
    assert len(pieces) > 3
    assert "".join(p.split("\n", 1)[1] for p, _ in pieces) == text.split("\n", 1)[1]
    line_of_row = {}
    line = 2
    for row in rows:
        line_of_row[row] = line
        line += row.count("\n") + 1
    for piece, first_line in pieces:
        first_row = next(r for r in rows if piece.split("\n", 1)[1].startswith(r + "\n"))
        assert line_of_row[first_row] == first_line  # a chunk starts at a row, numbered right
    assert not any((tmp_path / "work").iterdir())


def test_chunk_folders_of_killed_loads_are_removed_by_the_next(tmp_path):
    """A load killed mid-way leaves its chunk folder (in /dev/shm: RAM); the next load
    removes it, and never a folder whose process still runs."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    work = tmp_path / "work"
    stale = work / f"{chunked.SCRATCH_PREFIX}{gone}-abc"
    live = work / f"{chunked.SCRATCH_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "000000.csv").write_text("id\n1\n")
    source = _gz(tmp_path / "t.csv.gz", "id,text\n1,a\n")
    assert [text for text, _ in _pieces(source, tmp_path, 100)] == ["id,text\n1,a\n"]
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in work.iterdir()) == [live.name]


def test_inflated_gives_the_plain_text_and_leaves_nothing(tmp_path):
    text = "id,text\n" + "".join(f'{i},"row {i}, quoted"\n' for i in range(5000))
    source = _gz(tmp_path / "t.csv.gz", text)
    with chunked.inflated(source, tmp_path / "work") as plain:
        assert plain.name == "t.csv"
        assert plain.read_text() == text
        folder = plain.parent
    assert not folder.exists()
    flat = tmp_path / "flat.csv"
    flat.write_text(text)
    with chunked.inflated(flat) as same:
        assert same == flat
