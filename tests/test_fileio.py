"""The one atomic-write helper: the file appears whole or not at all, follows the umask, and leaves no debris."""
import os
import stat

import pytest

from revsnn_triton.fileio import atomic_write, atomic_write_text, default_file_mode, remove_stale_temps


def test_writes_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "hello\n")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello\n"
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"\x00\x01"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "sub"]


def test_failure_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "c.txt"
    target.write_text("old")

    def broken(f):
        f.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken, binary=False)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        path = atomic_write_text(tmp_path / "m.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_remove_stale_temps(tmp_path):
    for name in (".checkpoint_last.pt.abc123.tmp", ".curves.png.x9.tmp", "keep.tmp", ".other.txt.q.tmp"):
        (tmp_path / name).write_text("debris")
    removed = remove_stale_temps(tmp_path, ["checkpoint_last.pt", "curves.png"])
    assert sorted(p.name for p in removed) == [".checkpoint_last.pt.abc123.tmp", ".curves.png.x9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.txt.q.tmp", "keep.tmp"]
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".other.txt.q.tmp"]
    assert remove_stale_temps(tmp_path / "missing") == []
