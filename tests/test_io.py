import os
import stat

import pytest

from umbrella.io import atomic_write, atomic_write_json, file_mode


def test_atomic_files_get_the_mode_open_would_give(tmp_path):
    """mkstemp's 0600 would hide reports and caches from collaborators on a shared cluster."""
    old = os.umask(0o027)
    file_mode.cache_clear()
    try:
        path = atomic_write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert path.read_text() == '{\n  "accuracy": 1.0\n}\n'
    finally:
        os.umask(old)
        file_mode.cache_clear()


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = atomic_write_json(tmp_path / "a.json", [1])

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "[\n  1\n]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
