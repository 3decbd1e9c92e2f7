"""Tests for umbrella.data.cache: keys, memory-mapped float16 entries, atomic writes, batch builds."""

from __future__ import annotations

import json
import multiprocessing
import os
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umbrella.data import cache as cache_mod
from umbrella.data.cache import (
    CACHE_VERSION,
    CacheJob,
    PreprocessCache,
    build_cache,
    cache_key,
    cache_size_bytes,
    source_identity,
)
from umbrella.data.volumes import VolumeSpec, preprocess_volume
from umbrella.errors import ConfigError, VolumeError

SPEC = VolumeSpec(image_size=(16, 16, 16))


def _head(shape=(20, 18, 22), seed=0) -> np.ndarray:
    """Synthetic T1-like volume: bright noisy ellipsoid on a dim noisy background."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.6
    data = np.abs(rng.normal(0, 2, shape))
    data[inside] = rng.normal(100, 20, int(inside.sum()))
    return data.astype(np.float32)


def _nifti(folder: Path, name: str = "t1.nii.gz", seed: int = 0) -> Path:
    path = folder / name
    nib.Nifti1Image(_head(seed=seed), np.eye(4)).to_filename(path)
    return path


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class CountingBuild:
    """A build that counts its calls (in-process only)."""

    def __init__(self, path: Path, spec: VolumeSpec):
        self.path, self.spec, self.calls = path, spec, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return preprocess_volume(self.path, self.spec)


# ---------------------------------------------------------------------------------- keys

def test_key_is_stable_and_hashes_identity_kind_params_version(tmp_path):
    path = _nifti(tmp_path)
    key = cache_key(path, "T1", SPEC.to_dict())
    assert len(key) == 24 and all(c in "0123456789abcdef" for c in key)
    assert cache_key(path, "T1", SPEC.to_dict()) == key
    nested = cache_key(path, "T1", {"spec": SPEC.to_dict(), "window": (0, 4)})
    assert cache_key(path, "T1", {"window": [0, 4], "spec": SPEC}) == nested  # to_dict(), tuples
    assert cache_key(path, "rsfMRI", SPEC.to_dict()) != key
    ident = source_identity(path)
    st = path.stat()
    assert ident == {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert CACHE_VERSION == 2


def test_key_tracks_extra_sources_and_frame_folders(tmp_path):
    dwi = _nifti(tmp_path, "dwi.nii.gz")
    bval = tmp_path / "dwi.bval"
    bval.write_text("0 1000 1000\n")
    with_bval = cache_key(dwi, "dMRI", {}, extra_sources=(bval,))
    assert with_bval != cache_key(dwi, "dMRI", {})
    st = bval.stat()
    os.utime(bval, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(dwi, "dMRI", {}, extra_sources=(bval,)) != with_bval

    frames = tmp_path / "run1"
    frames.mkdir()
    for t in range(3):
        (frames / f"frame_{t:03d}.npy").write_bytes(bytes(10 + t))
    ident = source_identity(frames)
    assert [row[0] for row in ident["files"]] == ["frame_000.npy", "frame_001.npy", "frame_002.npy"]
    before = cache_key(frames, "rsfMRI", {})
    (frames / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    assert cache_key(frames, "rsfMRI", {}) == before
    (frames / "frame_003.npy").write_bytes(bytes(5))
    assert cache_key(frames, "rsfMRI", {}) != before


def test_key_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeError, match=r"file .*nope\.nii\.gz: file not found \(fix: check"):
        cache_key(missing, "T1", {})
    with pytest.raises(ConfigError, match=r"t1\.nii\.gz cannot be hashed"):
        cache_key(_nifti(tmp_path), "T1", {"fn": object()})
    with pytest.raises(ConfigError, match=r"must be a dict, got VolumeSpec"):
        cache_key(_nifti(tmp_path), "T1", SPEC)
    with pytest.raises(ValueError, match="8-64 lowercase hex"):
        PreprocessCache(tmp_path).path_for("../../etc")


# ---------------------------------------------------------------------------------- entries

def test_cached_t1_equals_uncached_preprocessing(tmp_path):
    path = _nifti(tmp_path)
    cache = PreprocessCache(tmp_path / "cache")
    arr = cache.get_or_build(path, "T1", SPEC.to_dict(), partial(preprocess_volume, path, SPEC))
    expected = preprocess_volume(path, SPEC)
    assert arr.shape == (16, 16, 16) and arr.dtype == np.float16
    np.testing.assert_array_equal(arr, expected.astype(np.float16))
    np.testing.assert_allclose(arr.astype(np.float32), expected, rtol=2**-11, atol=1e-7)

    key = cache_key(path, "T1", SPEC.to_dict())
    assert cache.path_for(key) == tmp_path / "cache" / key[:2] / f"{key}.npy"
    [entry] = cache.entries()
    assert entry["key"] == key and entry["source"] == str(path.resolve())
    assert entry["kind"] == "T1" and entry["params"] == SPEC.to_dict()
    assert entry["shape"] == [16, 16, 16] and entry["dtype"] == "float16"
    assert entry["file_bytes"] == cache.path_for(key).stat().st_size
    assert cache_size_bytes(cache.root) == entry["file_bytes"] + cache.sidecar_for(key).stat().st_size
    assert cache_size_bytes(tmp_path / "absent") == 0


def test_get_returns_a_read_only_memmap(tmp_path):
    cache = PreprocessCache(tmp_path)
    key = "ab" * 12
    assert cache.get(key) is None
    cache.put(key, np.arange(24, dtype=np.float32).reshape(2, 3, 4), {"source": "x"})
    arr = cache.get(key)
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0, 0] = 1.0
    np.testing.assert_array_equal(arr, np.arange(24).reshape(2, 3, 4))


def test_changed_param_or_touched_file_rebuilds_and_same_inputs_reuse(tmp_path):
    path = _nifti(tmp_path)
    cache = PreprocessCache(tmp_path / "cache")
    build = CountingBuild(path, SPEC)
    first = cache.get_or_build(path, "T1", SPEC.to_dict(), build)
    again = cache.get_or_build(path, "T1", SPEC.to_dict(), build)
    assert build.calls == 1
    np.testing.assert_array_equal(again, first)

    old_key = cache_key(path, "T1", SPEC.to_dict())
    old_file = cache.path_for(old_key)
    old_stat, old_bytes = old_file.stat(), old_file.read_bytes()

    pct = VolumeSpec(image_size=(16, 16, 16), normalize="percentile")
    rebuilt = cache.get_or_build(path, "T1", pct.to_dict(), CountingBuild(path, pct))
    assert cache_key(path, "T1", pct.to_dict()) != old_key
    assert float(rebuilt.min()) == 0.0 and float(rebuilt.max()) == 1.0  # percentile, not z-score
    assert old_file.read_bytes() == old_bytes and old_file.stat().st_mtime_ns == old_stat.st_mtime_ns

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache.get_or_build(path, "T1", SPEC.to_dict(), build)
    assert build.calls == 2
    assert cache_key(path, "T1", SPEC.to_dict()) != old_key
    assert len(cache.entries()) == 3 and old_file.read_bytes() == old_bytes


def test_failed_write_leaves_no_entry_and_no_temp_file(tmp_path, monkeypatch):
    cache = PreprocessCache(tmp_path)
    key = "cd" * 12
    good = np.ones((8, 8), dtype=np.float32)

    def write_half_then_fail(fh, data):
        fh.write(b"\x93NUMPY" + bytes(100))
        raise OSError("No space left on device")

    monkeypatch.setattr(cache_mod, "_write_array", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        cache.put(key, good, {"source": "x"})
    assert cache.get(key) is None
    assert _files(tmp_path) == []
    assert cache.entries() == []

    monkeypatch.undo()
    cache.put(key, good, {"source": "x"})
    monkeypatch.setattr(cache_mod, "_write_array", write_half_then_fail)
    with pytest.raises(OSError):
        cache.put(key, good * 2, {"source": "x"})
    np.testing.assert_array_equal(cache.get(key), good)  # the old entry survives
    assert [p.suffix for p in _files(tmp_path)] == [".json", ".npy"]


def test_float16_overflow_is_an_error_naming_the_source(tmp_path):
    cache = PreprocessCache(tmp_path)
    with pytest.raises(VolumeError, match=r"file /data/raw\.nii: 1 of 4 values are NaN/Inf in "
                                          r"float16 .*\(fix: normalise"):
        cache.put("ef" * 12, np.array([1.0, 2.0, 3.0, 1e5]), {"source": "/data/raw.nii"})
    assert _files(tmp_path) == []


def test_unreadable_entry_is_reported_then_rebuilt(tmp_path):
    path = _nifti(tmp_path)
    cache = PreprocessCache(tmp_path / "cache")
    key = cache_key(path, "T1", SPEC.to_dict())
    cache.path_for(key).parent.mkdir(parents=True)
    cache.path_for(key).write_bytes(b"garbage, not an npy file")
    with pytest.raises(VolumeError, match=rf"file {cache.path_for(key)}: cache entry is unread"):
        cache.get(key)
    with pytest.warns(UserWarning, match="rebuilding an unreadable cache entry"):
        arr = cache.get_or_build(path, "T1", SPEC.to_dict(), partial(preprocess_volume, path, SPEC))
    np.testing.assert_array_equal(arr, preprocess_volume(path, SPEC).astype(np.float16))


def test_time_window_of_a_4d_entry_is_a_contiguous_view_of_the_map(tmp_path):
    run = np.random.default_rng(0).standard_normal((12, 4, 5, 6)).astype(np.float32)
    cache = PreprocessCache(tmp_path)
    key = "0123456789abcdef01234567"
    cache.put(key, np.asfortranarray(run), {"source": "run.nii.gz", "kind": "rsfMRI"})
    arr = cache.get(key)
    assert arr.shape == (12, 4, 5, 6) and arr.flags.c_contiguous  # stored C order, even from F
    window = arr[5:10]
    assert isinstance(window, np.memmap) and window.flags.c_contiguous
    assert np.shares_memory(window, arr)
    frame_bytes = 4 * 5 * 6 * 2
    assert window.ctypes.data - arr.ctypes.data == 5 * frame_bytes
    np.testing.assert_array_equal(window, run[5:10].astype(np.float16))
    # the window's bytes sit at one offset in the file: header + 5 frames
    raw = cache.path_for(key).read_bytes()
    header = len(raw) - run.size * 2
    chunk = raw[header + 5 * frame_bytes: header + 10 * frame_bytes]
    np.testing.assert_array_equal(np.frombuffer(chunk, np.float16).reshape(5, 4, 5, 6), window)


# ---------------------------------------------------------------------------------- concurrency

def _put_many_times(root: str, key: str, path: str, barrier, rounds: int) -> None:
    """Worker: build the entry, wait for the other worker, then put it ``rounds`` times."""
    cache = PreprocessCache(root)
    array = preprocess_volume(path, SPEC)
    meta = {"source": path, "kind": "T1", "params": SPEC.to_dict()}
    barrier.wait(timeout=30)
    for _ in range(rounds):
        cache.put(key, array, meta)


def test_two_processes_putting_one_key_both_succeed(tmp_path):
    path = _nifti(tmp_path)
    cache = PreprocessCache(tmp_path / "cache")
    key = cache_key(path, "T1", SPEC.to_dict())
    expected = preprocess_volume(path, SPEC).astype(np.float16)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_put_many_times, args=(str(cache.root), key, str(path), barrier, 30))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    seen = 0
    while any(proc.is_alive() for proc in procs):  # a reader never sees a partial entry
        arr = cache.get(key)
        if arr is not None:
            np.testing.assert_array_equal(arr, expected)
            seen += 1
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    np.testing.assert_array_equal(cache.get(key), expected)
    assert json.loads(cache.sidecar_for(key).read_text())["shape"] == [16, 16, 16]
    assert [p.name for p in _files(cache.root)] == [f"{key}.json", f"{key}.npy"]  # no temp files
    assert seen > 0


# ---------------------------------------------------------------------------------- build_cache

def _jobs(paths: list[Path]) -> list[CacheJob]:
    return [CacheJob(p, "T1", SPEC.to_dict(), partial(preprocess_volume, p, SPEC)) for p in paths]


@pytest.mark.parametrize("workers", [1, 2])
def test_build_cache_records_bad_files_and_builds_the_rest(tmp_path, workers):
    good = [_nifti(tmp_path, f"sub-{i}.nii.gz", seed=i) for i in range(3)]
    bad = tmp_path / "sub-bad.nii.gz"
    bad.write_bytes(os.urandom(300))
    missing = tmp_path / "sub-missing.nii.gz"
    cache = PreprocessCache(tmp_path / "cache")
    jobs = _jobs(good + [bad, good[0], missing])  # good[0] twice: built once

    first = build_cache(cache, jobs, workers=workers, progress=False)
    assert (first.built, first.reused) == (3, 0)
    assert sorted(p for p, _ in first.failed) == [str(bad), str(missing)]
    for failed_path, message in first.failed:
        assert failed_path in message
    assert "cannot read as NIfTI" in dict(first.failed)[str(bad)]
    assert "file not found" in dict(first.failed)[str(missing)]
    assert first.seconds > 0
    for p in good:
        arr = cache.get(cache_key(p, "T1", SPEC.to_dict()))
        np.testing.assert_array_equal(arr, preprocess_volume(p, SPEC).astype(np.float16))

    files_before = {p: p.stat().st_mtime_ns for p in _files(cache.root)}
    second = build_cache(cache, jobs, workers=workers, progress=False)
    assert (second.built, second.reused, len(second.failed)) == (0, 3, 2)
    assert {p: p.stat().st_mtime_ns for p in _files(cache.root)} == files_before
    assert sorted(e["source"] for e in cache.entries()) == sorted(str(p.resolve()) for p in good)


def test_build_cache_rejects_a_build_that_cannot_reach_a_worker(tmp_path):
    paths = [_nifti(tmp_path, f"sub-{i}.nii.gz", seed=i) for i in range(2)]
    jobs = [CacheJob(p, "T1", {}, lambda: np.zeros(3)) for p in paths]
    with pytest.raises(TypeError, match=r"sub-0\.nii\.gz cannot be sent to a worker process"):
        build_cache(PreprocessCache(tmp_path / "cache"), jobs, workers=2, progress=False)
    report = build_cache(PreprocessCache(tmp_path / "cache"), jobs, workers=1, progress=False)
    assert report.built == 2 and report.failed == []
