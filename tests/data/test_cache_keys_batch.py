"""CacheKeys (keys for many images in one pass) gives exactly the keys of the one-image formula:
sha256 of the JSON of {identity (resolved path, size, mtime_ns / frame list), kind, params,
version}; PreprocessCache.keys() lists the cached keys without a stat per entry."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from umbrella.data.cache import (
    CACHE_VERSION,
    KEY_CHARS,
    CacheKeys,
    PreprocessCache,
    cache_key,
    source_identity,
)
from umbrella.errors import VolumeError


def _oracle_identity(path) -> dict:
    """The identity as first specified: Path.resolve(strict=True), stat, os.walk of a folder."""
    resolved = Path(path).resolve(strict=True)
    if resolved.is_dir():
        files = []
        for here, dirs, names in os.walk(resolved):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(here).relative_to(resolved)
            for name in names:
                if not name.startswith("."):
                    info = os.stat(os.path.join(here, name))
                    files.append([(rel / name).as_posix(), info.st_size, info.st_mtime_ns])
        return {"path": str(resolved), "files": sorted(files)}
    info = resolved.stat()
    return {"path": str(resolved), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _oracle_key(path, kind, params, extra=()) -> str:
    payload = {"identity": {"source": _oracle_identity(path),
                            "extra": [_oracle_identity(p) for p in extra]},
               "kind": kind, "params": json.loads(json.dumps(params)), "version": CACHE_VERSION}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_CHARS]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "t1").mkdir(parents=True)
    (data / "run" / "sub").mkdir(parents=True)
    for i in range(3):
        (data / "t1" / f"s{i}.nii").write_bytes(b"x" * (10 + i))
        (data / "run" / f"frame_{i}.pt").write_bytes(b"f" * (5 + i))
    (data / "run" / "sub" / "frame_9.pt").write_bytes(b"g")
    (data / "run" / ".hidden").write_bytes(b"h")
    (data / "bval").write_text("0 1000")
    os.symlink(data / "t1", tmp_path / "linked_folder")
    os.symlink(data / "t1" / "s0.nii", tmp_path / "linked_file.nii")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _paths(root):
    return [root / "data/t1/s0.nii", root / "data/t1/s1.nii", "data/t1/s2.nii",
            "data/./t1/s0.nii", "data/t1/../t1/s1.nii", root / "linked_folder/s2.nii",
            "linked_file.nii", root / "data/run", "data/run/", root / "data/run/.", "data/t1/.."]


def test_batch_keys_equal_the_one_image_formula(tree):
    params = {"modality": "T1", "spec": {"image_size": (8, 8, 8), "voxel_size": None}}
    keys = CacheKeys()
    for path in _paths(tree) * 2:  # the second round is served from the folder memo
        expected = _oracle_key(path, "T1", params)
        assert keys.key(path, "T1", params) == expected
        assert cache_key(path, "T1", params) == expected
        assert keys.identity(path) == source_identity(path) == _oracle_identity(path)
    extra = [tree / "data/bval"]
    assert keys.key(tree / "data/t1/s0.nii", "dMRI", params, extra) == \
        _oracle_key(tree / "data/t1/s0.nii", "dMRI", params, extra)


def test_params_are_canonicalised_per_object_and_still_told_apart(tree):
    keys = CacheKeys()
    a, b = {"modality": "T1", "size": [8, 8, 8]}, {"modality": "T1", "size": [4, 4, 4]}
    path = tree / "data/t1/s0.nii"
    assert keys.key(path, "T1", a) != keys.key(path, "T1", b)
    assert keys.key(path, "T1", a) == _oracle_key(path, "T1", a)
    assert keys.key(path, "T1", b) == _oracle_key(path, "T1", b)
    for _ in range(3):  # fresh dicts (the id of a freed one may come back): each keyed by value
        assert keys.key(path, "T1", dict(b)) == _oracle_key(path, "T1", b)


def test_a_changed_file_or_frame_changes_the_key_in_a_new_pass(tree):
    params = {"m": 1}
    t1, run = tree / "data/t1/s1.nii", tree / "data/run"
    before = CacheKeys().key(t1, "T1", params), CacheKeys().key(run, "rsfMRI", params)
    # rewritten in place with the same size: the folder's own mtime does not change
    folder_mtime = os.stat(run).st_mtime_ns
    for path in (t1, run / "frame_1.pt"):
        info = os.stat(path)
        path.write_bytes(b"z" * info.st_size)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert os.stat(run).st_mtime_ns == folder_mtime
    after = CacheKeys().key(t1, "T1", params), CacheKeys().key(run, "rsfMRI", params)
    assert after[0] != before[0] and after[1] != before[1]
    (run / "frame_3.pt").write_bytes(b"new")  # an added frame
    assert CacheKeys().key(run, "rsfMRI", params) != after[1]


def test_missing_and_unreadable_sources_name_the_path(tree):
    keys = CacheKeys()
    with pytest.raises(VolumeError, match="file not found") as err:
        keys.key(tree / "data/t1/missing.nii", "T1", {})
    assert "missing.nii" in str(err.value)
    with pytest.raises(VolumeError, match="file not found"):
        keys.key("nowhere/s0.nii", "T1", {})
    with pytest.raises(VolumeError, match="cannot inspect"):
        keys.key(tree / "data/t1/s0.nii/child", "T1", {})  # a file used as a folder
    os.symlink("loop", tree / "loop")
    with pytest.raises(VolumeError):
        keys.key(tree / "loop", "T1", {})


def test_cache_keys_lists_entries_without_stat(tmp_path):
    cache = PreprocessCache(tmp_path / "cache")
    assert cache.keys() == set()
    made = {cache_key(_write(tmp_path / f"s{i}.bin"), "T1", {"i": i}) for i in range(5)}
    for key in made:
        cache.put(key, np.ones((2, 2), np.float32), {"source": "x"})
    (tmp_path / "cache" / "zz").mkdir()
    (tmp_path / "cache" / "zz" / "zz00000000.npy").write_bytes(b"")  # wrong folder for its key
    (tmp_path / "cache" / "ab").mkdir(exist_ok=True)
    (tmp_path / "cache" / "ab" / ".abcdef0123.npy.1.tmp").write_bytes(b"")  # a leftover temp
    assert cache.keys() == made == {e["key"] for e in cache.entries()}


def _write(path: Path) -> Path:
    path.write_bytes(path.name.encode())
    return path
