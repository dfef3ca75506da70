"""Files other processes read while they are rewritten: whole or absent, never half, and no
temporary left behind; a PID file that outlives its process (and its pid) is not believed."""

from __future__ import annotations

import os

import pytest

from common.atomic_files import write_atomic
from common.service import PidFile


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "status.json"
    write_atomic(path, "first\n")
    write_atomic(path, b"second\n", mode=0o640)  # mkstemp's own mode is 0o600
    assert path.read_text() == "second\n"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["status.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_atomic(path, "old\n")

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    # Fails after the temporary holds the new bytes, before it takes the name.
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_no_overwrite_refuses_an_existing_file(tmp_path):
    path = tmp_path / "ca.key"
    write_atomic(path, b"key", mode=0o600, overwrite=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"other", mode=0o600, overwrite=False)
    assert path.read_bytes() == b"key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key"]


def test_pid_file_names_this_process_only_while_the_start_time_matches(tmp_path):
    pid_file = PidFile(tmp_path / "node.pid")
    pid_file.claim("a test", "nothing")
    assert pid_file.pid() == os.getpid()
    pid, started = (tmp_path / "node.pid").read_text().split()
    # The same pid with another start time: the pid was reused by a stranger after the
    # process that wrote the file died. Believing it would block a start, or make `stop`
    # signal an unrelated process.
    (tmp_path / "node.pid").write_text(f"{pid} {float(started) - 3600:.3f}\n")
    assert pid_file.pid() is None
    # A file written before start times were recorded (pid alone) is judged by the pid.
    (tmp_path / "node.pid").write_text(f"{pid}\n")
    assert pid_file.pid() == os.getpid()
