"""The preprocessing cache: each referenced image is decoded and preprocessed once, into a float16
``.npy`` file that training memory-maps.

Layout under ``root``: ``<key[:2]>/<key>.npy`` (the array, C order, float16) and ``<key>.json``
(the sidecar: source, kind, params, shape, created). The key hashes what produced the array: the
source's identity (resolved path, size, mtime_ns; for a frame folder, those of its files), the
files the preprocessing also reads (``extra_sources``), the kind, its parameters and
:data:`CACHE_VERSION`. A changed setting or a touched file gives a new key, so only that entry is
rebuilt. Old entries are left where they are: nothing here deletes anything.

Writes are atomic: a temp file in the same folder, fsync, then ``os.replace``. A reader sees
either no entry or a complete one, never a half-written one. When two processes put the same key,
both succeed, the last rename wins and the contents are identical. A killed writer can leave a
``.<key>.npy.*.tmp`` file behind. It is never read, and it is safe to delete when no build runs.

A 4D run is stored ``(T, D, H, W)`` in C order, so a time window ``arr[t0:t1]`` is one contiguous
byte range of the map. Only those pages are read from disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from umbrella.errors import ConfigError, UmbrellaError, VolumeError
from umbrella.io import atomic_write, file_mode

# 2: crop boxes leave specks of the threshold mask out (volumes.mask_box); arrays cached by
# version 1 may sit elsewhere in the field of view
CACHE_VERSION = 2
KEY_CHARS = 24  # 96 bits of sha256: collisions are out of reach for any cohort
_KEY_PATTERN = re.compile(r"[0-9a-f]{8,64}")
_LOAD_ERRORS = (OSError, ValueError, EOFError)
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_MISSING_FIX = "check the image path in the record and the modality's data root"
_ENTRY_FIX = "delete the entry (.npy and .json); the next cache build rebuilds it"


# ------------------------------------------------------------------------------------ keys

def source_identity(path: str | os.PathLike) -> dict:
    """What identifies an input: ``{"path", "size", "mtime_ns"}`` for a file, or ``{"path",
    "files"}`` for a directory (a frame folder). ``files`` is the sorted list of ``[relative
    name, size, mtime_ns]`` of the files under it, hidden (dot) files excluded. ``path`` is
    resolved (symlinks followed), so moving the data re-keys it. Raises :class:`VolumeError`
    naming the path if it does not exist or cannot be read.

    A frame folder is identified by every frame's size and mtime (one ``stat`` per frame): the
    folder's own mtime changes when frames are added, removed or renamed, but not when one is
    rewritten in place (``torch.save`` truncates and rewrites the file), so it is not enough.
    """
    return CacheKeys().identity(path)


def _inspect_error(given, exc: BaseException) -> VolumeError:
    if isinstance(exc, FileNotFoundError):
        return VolumeError("file not found", path=Path(given), fix=_MISSING_FIX)
    return VolumeError(f"cannot inspect ({type(exc).__name__}: {exc})", path=Path(given),
                       fix="check that the path and its folders are readable")


def _resolve_and_stat(given: str) -> tuple[str, os.stat_result]:
    """``Path.resolve(strict=True)`` and ``stat`` of the result: one ``lstat`` per component."""
    try:
        resolved = os.path.realpath(given, strict=True)
        return resolved, os.stat(resolved)
    except (OSError, RuntimeError) as exc:  # missing, permissions, symlink loop
        raise _inspect_error(given, exc) from exc


class CacheKeys:
    """Cache keys (and source identities) for many images in one pass.

    Keys are those of :func:`cache_key`; what is shared between images is worked out once per
    instance: the resolved path of each folder that holds images (then a file costs one
    ``lstat``; a symlinked file falls back to a full resolve), and the canonical JSON of each
    ``params`` object (by identity: do not change a params dict while an instance is in use).
    Use one instance per pass (indexing, a cache build), not for the lifetime of a process: a
    folder that is re-linked later is only seen by a new instance.
    """

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}
        self._params: dict[int, tuple[Any, str]] = {}

    def _resolved_folder(self, head: str) -> str:
        resolved = self._folders.get(head)
        if resolved is None:
            resolved = self._folders[head] = os.path.realpath(head or ".", strict=True)
        return resolved

    def _resolve_and_stat(self, given: str) -> tuple[str, os.stat_result]:
        head, name = os.path.split(given)
        if name in ("", ".", ".."):
            return _resolve_and_stat(given)
        try:
            info = os.lstat(given)
        except OSError as exc:
            raise _inspect_error(given, exc) from exc
        if stat.S_ISLNK(info.st_mode):
            return _resolve_and_stat(given)
        try:
            return os.path.join(self._resolved_folder(head), name), info
        except (OSError, RuntimeError) as exc:  # the folder vanished or loops meanwhile
            raise _inspect_error(given, exc) from exc

    def identity(self, path: str | os.PathLike) -> dict:
        """:func:`source_identity` of ``path``."""
        given = os.fspath(path)
        resolved, info = self._resolve_and_stat(given)
        if stat.S_ISDIR(info.st_mode):
            return {"path": resolved, "files": _folder_files(resolved)}
        return {"path": resolved, "size": info.st_size, "mtime_ns": info.st_mtime_ns}

    def _params_json(self, params: Mapping, path) -> str:
        known = self._params.get(id(params))
        if known is not None and known[0] is params:
            return known[1]
        text = json.dumps(_canonical_params(params, path), sort_keys=True, separators=(",", ":"))
        self._params[id(params)] = (params, text)  # holding params keeps its id unique
        return text

    def key(self, path: str | os.PathLike, kind: str, params: Mapping,
            extra_sources: Iterable = ()) -> str:
        """:func:`cache_key` of the arguments."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"cache kind must be a non-empty string (e.g. 'T1'), got {kind!r}")
        identity = {"source": self.identity(path),
                    "extra": [self.identity(p) for p in _as_paths(extra_sources)]}
        # the JSON of {"identity", "kind", "params", "version"} with sorted keys, assembled from
        # its parts so that the params' canonical text is made once per params object
        text = "".join(('{"identity":', json.dumps(identity, sort_keys=True, separators=(",", ":")),
                        ',"kind":', json.dumps(kind), ',"params":', self._params_json(params, path),
                        f',"version":{CACHE_VERSION}}}'))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_CHARS]


def _folder_files(folder: str | os.PathLike) -> list[list]:
    """Sorted ``[relative posix name, size, mtime_ns]`` of the non-hidden files under ``folder``.

    Walks with ``os.scandir`` and plain strings (as ``os.walk`` does: unreadable subfolders are
    skipped, symlinked folders are not entered): a dataset reading a 1,200-frame folder keys it on
    every access, so the loop does one ``stat`` per file and little else.
    """
    files = []
    pending = [(os.fspath(folder), "")]
    while pending:
        here, prefix = pending.pop()
        try:
            with os.scandir(here) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():
                    pending.append((entry.path, f"{prefix}{name}/"))
                continue
            try:
                info = entry.stat()
            except OSError as exc:
                raise VolumeError(f"cannot inspect a frame ({exc})", path=Path(entry.path),
                                  fix="check that the frame folder is complete and readable"
                                  ) from exc
            files.append([prefix + name, info.st_size, info.st_mtime_ns])
    files.sort()
    return files


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` hook for params: paths, numpy values and config objects (``to_dict``)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if callable(getattr(obj, "to_dict", None)):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _canonical_params(params: Mapping, path: str | os.PathLike) -> dict:
    """``params`` as plain JSON values (tuples become lists); :class:`ConfigError` otherwise."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"cache params for {path} must be a dict, got {type(params).__name__}")
    try:
        return json.loads(json.dumps(params, default=_jsonable, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cache params for {path} cannot be hashed ({exc}); use str, numbers, "
                          "bools, lists and dicts with str keys, or an object with to_dict()"
                          ) from exc


def _as_paths(extra_sources: Iterable | str | os.PathLike) -> tuple[Path, ...]:
    if isinstance(extra_sources, str | os.PathLike):  # one path, not a sequence of characters
        return (Path(extra_sources),)
    return tuple(Path(p) for p in extra_sources)


def cache_key(path: str | os.PathLike, kind: str, params: Mapping,
              extra_sources: Iterable = ()) -> str:
    """Hex sha256 (first :data:`KEY_CHARS` characters) over the JSON of the source identity (plus
    those of ``extra_sources``), ``kind``, ``params`` and :data:`CACHE_VERSION`, keys sorted.
    For many images at once, :class:`CacheKeys` gives the same keys with less work per image.

    Raises :class:`VolumeError` for a missing source and :class:`ConfigError` for params that are
    not JSON values.
    """
    return CacheKeys().key(path, kind, params, extra_sources)


def _source_meta(path, kind: str, params: Mapping, extra_sources: Iterable) -> dict:
    return {"source": str(Path(path).resolve()), "kind": kind,
            "params": _canonical_params(params, path),
            "extra_sources": [str(p.resolve()) for p in _as_paths(extra_sources)]}


# ------------------------------------------------------------------------------------ writing

def _write_array(fh: IO[bytes], data: np.ndarray) -> None:
    """Write ``data`` (C-contiguous) as ``.npy`` bytes to an open file."""
    np.lib.format.write_array(fh, data, allow_pickle=False)


def _atomic_file(path: Path, fill: Callable[[IO[bytes]], None]) -> None:
    """Atomically create ``path`` from ``fill(fh)``, readable as a normal file would be."""
    def write(tmp: Path) -> None:
        os.chmod(tmp, file_mode())
        with open(tmp, "wb") as fh:
            fill(fh)

    atomic_write(path, write)


def _as_float16(array: Any, source: Any) -> np.ndarray:
    """C-contiguous float16 copy; :class:`VolumeError` naming ``source`` if values do not fit."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        raise VolumeError(f"preprocessing returned dtype {arr.dtype} with shape {arr.shape}, "
                          "which cannot be cached", path=source,
                          fix="the build must return a non-empty numeric array")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float16)
    bad = out.size - int(np.count_nonzero(np.isfinite(out)))
    if bad:
        finite = np.abs(arr[np.isfinite(arr)])
        largest = float(finite.max()) if finite.size else float("nan")
        raise VolumeError(f"{bad} of {out.size} values are NaN/Inf in float16 (largest finite "
                          f"|value| {largest:g}, float16 holds up to {_FLOAT16_MAX:g})",
                          path=source, fix="normalise intensities before caching (e.g. "
                          "VolumeSpec.normalize 'zscore_brain' or 'percentile')")
    return out


# ------------------------------------------------------------------------------------ the cache

class PreprocessCache:
    """Content-keyed float16 arrays under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"PreprocessCache({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """``root/<key[:2]>/<key>.npy``; the sidecar is the same path with ``.json``."""
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"cache key must be 8-64 lowercase hex characters (from cache_key), "
                             f"got {key!r}")
        return self.root / key[:2] / f"{key}.npy"

    def sidecar_for(self, key: str) -> Path:
        return self.path_for(key).with_suffix(".json")

    def get(self, key: str) -> np.memmap | None:
        """The entry as a read-only float16 memmap, or None if there is none.

        Raises :class:`VolumeError` naming the file if an entry exists but cannot be read.
        """
        path = self.path_for(key)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        except _LOAD_ERRORS as exc:
            raise VolumeError(f"cache entry is unreadable ({type(exc).__name__}: {exc})",
                              path=path, fix=_ENTRY_FIX) from exc
        if not isinstance(arr, np.memmap) or arr.dtype != np.float16:
            raise VolumeError(f"cache entry holds {type(arr).__name__} of dtype {arr.dtype}, "
                              "expected a float16 array", path=path, fix=_ENTRY_FIX)
        return arr

    def put(self, key: str, array: Any, meta: Mapping) -> np.memmap:
        """Store ``array`` as float16 under ``key`` (atomically) and return its read-only memmap.

        ``meta`` (source, kind, params, ...) goes into the JSON sidecar, with the shape, dtype,
        key, cache version and creation time added. Raises :class:`VolumeError` naming
        ``meta["source"]`` when a value overflows float16 or is NaN/Inf; nothing is written then.
        """
        self._store(key, array, meta)
        return self._open_written(key)

    def get_or_build(self, path: str | os.PathLike, kind: str, params: Mapping,
                     build: Callable[[], Any], extra_sources: Iterable = ()) -> np.memmap:
        """The cached entry for (path, kind, params, extra_sources), building it on a miss.

        An unreadable entry is rebuilt (with a warning): the rename replaces it.
        """
        key = cache_key(path, kind, params, extra_sources)
        try:
            cached = self.get(key)
        except VolumeError as exc:
            warnings.warn(f"rebuilding an unreadable cache entry: {exc}", stacklevel=2)
            cached = None
        if cached is not None:  # the hot path of training: one key, one stat, one mmap
            if not self.sidecar_for(key).exists():
                self._write_sidecar(key, cached.shape,
                                    _source_meta(path, kind, params, extra_sources))
            return cached
        _build_and_store(self, key, path, kind, params, build, extra_sources)
        return self._open_written(key)

    def _open_written(self, key: str) -> np.memmap:
        arr = self.get(key)
        if arr is None:
            raise VolumeError("cache entry vanished right after it was written",
                              path=self.path_for(key),
                              fix="another process is deleting cache entries; stop it and rerun")
        return arr

    def keys(self) -> set[str]:
        """The keys that have an array file, from one listing per ``<key[:2]>`` folder (no
        ``stat`` per entry): "is this image cached?" for many images at once."""
        found: set[str] = set()
        try:
            with os.scandir(self.root) as top:
                folders = [e.path for e in top if len(e.name) == 2 and e.is_dir()]
        except FileNotFoundError:
            return found
        for folder in folders:
            prefix = os.path.basename(folder)
            try:
                with os.scandir(folder) as listing:
                    for entry in listing:
                        key, dot, ext = entry.name.partition(".")
                        if (dot and ext == "npy" and key[:2] == prefix
                                and _KEY_PATTERN.fullmatch(key)):
                            found.add(key)
            except FileNotFoundError:
                continue
        return found

    def entries(self) -> list[dict]:
        """One dict per entry, sorted by key: its sidecar (if readable) plus ``key``, ``path``
        and ``file_bytes``. An entry whose sidecar is missing still appears; a bad sidecar adds
        ``sidecar_error``."""
        out = []
        for npy in sorted(self.root.glob("??/*.npy")):
            key = npy.stem
            if not _KEY_PATTERN.fullmatch(key) or npy.parent.name != key[:2]:
                continue
            try:
                size = npy.stat().st_size
            except FileNotFoundError:
                continue
            out.append({**_read_sidecar(npy.with_suffix(".json")), "key": key,
                        "path": str(npy), "file_bytes": size})
        return out

    def _store(self, key: str, array: Any, meta: Mapping) -> Path:
        """Write the array, then its sidecar; returns the array's path."""
        path = self.path_for(key)
        data = _as_float16(array, meta.get("source"))
        _atomic_file(path, lambda fh: _write_array(fh, data))
        self._write_sidecar(key, data.shape, meta)
        return path

    def _write_sidecar(self, key: str, shape: tuple[int, ...], meta: Mapping) -> None:
        record = {**meta, "key": key, "shape": list(shape), "dtype": "float16",
                  "cache_version": CACHE_VERSION,
                  "created": datetime.now(UTC).isoformat(timespec="seconds")}
        text = json.dumps(record, indent=2, default=str) + "\n"
        _atomic_file(self.sidecar_for(key), lambda fh: fh.write(text.encode("utf-8")))

    def _ensure_sidecar(self, key: str, shape: tuple[int, ...], meta: Mapping) -> None:
        """Rewrite a sidecar lost to a crash between the array's rename and the sidecar's."""
        if not self.sidecar_for(key).exists():
            self._write_sidecar(key, shape, meta)


def _read_sidecar(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return {"sidecar_error": f"{path}: {type(exc).__name__}: {exc}"}
    return record if isinstance(record, dict) else {"sidecar_error": f"{path}: not a JSON object"}


def _build_and_store(cache: PreprocessCache, key: str, path, kind: str, params: Mapping,
                     build: Callable[[], Any], extra_sources: Iterable) -> None:
    """Run ``build`` and store its result under ``key``, unless the source changed meanwhile
    (then the array may mix two versions of the file and is not stored)."""
    array = build()
    if cache_key(path, kind, params, extra_sources) != key:
        raise VolumeError("the file changed while it was being preprocessed", path=path,
                          fix="rerun the cache build once the file is no longer being written")
    cache._store(key, array, _source_meta(path, kind, params, extra_sources))


def cache_size_bytes(root: str | os.PathLike) -> int:
    """Total size of the files under ``root`` (entries, sidecars, leftover temp files); 0 if absent."""
    total = 0
    for here, _dirs, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(here, name), follow_symlinks=False).st_size
            except FileNotFoundError:  # a temp file renamed meanwhile
                continue
    return total


# ------------------------------------------------------------------------------------ batch build

@dataclass
class CacheJob:
    """One image to cache. ``build`` returns the preprocessed array; with ``workers > 1`` it is
    sent to a worker process, so it must pickle: a ``functools.partial`` of a module-level
    function, e.g. ``partial(preprocess_volume, path, spec)``."""

    path: Path
    kind: str
    params: dict
    build: Callable[[], np.ndarray]
    extra_sources: tuple = ()


@dataclass
class CacheReport:
    """Outcome of :func:`build_cache`, counted over distinct keys (duplicate jobs count once).
    ``failed`` holds ``(path, message)``; each message names the file."""

    built: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def build_cache(cache: PreprocessCache, jobs: list[CacheJob], *, workers: int = 2,
                progress: bool = True) -> CacheReport:
    """Make sure every job has a cache entry: deduplicate by key, reuse existing entries and
    build the rest, in ``workers`` processes (``workers <= 1``: in this process).

    A file that fails (missing, corrupt, overflowing float16, ...) is recorded in
    ``report.failed`` and the others go on; the caller decides whether failures are fatal. An
    unreadable entry is rebuilt in place. Nothing is ever deleted. Raises ``TypeError`` (before
    building anything) if ``workers > 1`` and a job's ``build`` cannot be pickled.
    """
    start = time.perf_counter()
    report = CacheReport()
    keyed = _key_jobs(jobs, report)
    total = len(keyed) + len(report.failed)
    with tqdm(total=total, desc="cache", unit="image", disable=not progress) as bar:
        def tick(n: int = 1) -> None:
            bar.set_postfix(built=report.built, reused=report.reused,
                            failed=len(report.failed), refresh=False)
            bar.update(n)

        tick(len(report.failed))  # sources that could not even be inspected

        pending = {}
        for key, job in keyed.items():
            if _reuse(cache, key, job):
                report.reused += 1
                tick()
            else:
                pending[key] = job
        for job, error in _run_builds(cache, pending, workers):
            if error is None:
                report.built += 1
            else:
                report.failed.append((str(job.path), error))
            tick()
    report.seconds = time.perf_counter() - start
    return report


def _key_jobs(jobs: list[CacheJob], report: CacheReport) -> dict[str, CacheJob]:
    """Key every job (first job wins per key); a source that cannot be inspected is a failure."""
    keyed: dict[str, CacheJob] = {}
    keys = CacheKeys()
    for job in jobs:
        try:
            key = keys.key(job.path, job.kind, job.params, job.extra_sources)
        except VolumeError as exc:
            report.failed.append((str(job.path), _error_text(exc, job.path)))
            continue
        keyed.setdefault(key, job)
    return keyed


def _reuse(cache: PreprocessCache, key: str, job: CacheJob) -> bool:
    """True if the entry exists and reads; repairs a missing sidecar on the way."""
    try:
        arr = cache.get(key)
    except VolumeError as exc:
        warnings.warn(f"rebuilding an unreadable cache entry: {exc}", stacklevel=3)
        return False
    if arr is None:
        return False
    cache._ensure_sidecar(key, arr.shape,
                          _source_meta(job.path, job.kind, job.params, job.extra_sources))
    return True


def _run_builds(cache: PreprocessCache, pending: dict[str, CacheJob], workers: int):
    """Yield ``(job, error text or None)`` as builds finish."""
    if workers <= 1 or len(pending) <= 1:
        for key, job in pending.items():
            yield job, _build_entry(str(cache.root), key, job)
        return
    for job in pending.values():
        _check_picklable(job)
    with ProcessPoolExecutor(min(workers, len(pending)), mp_context=_mp_context()) as pool:
        futures = {pool.submit(_build_entry, str(cache.root), key, job): job
                   for key, job in pending.items()}
        try:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    error = fut.result()
                except Exception as exc:  # the worker died (e.g. out of memory)
                    error = _error_text(exc, job.path) + (
                        " (a cache worker process failed; rerun with fewer workers: "
                        "entries already built are reused)")
                yield job, error
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _build_entry(root: str, key: str, job: CacheJob) -> str | None:
    """Build and store one entry; returns None, or the error text naming the file. Runs in a
    worker process, so the array goes to disk, not back through a pipe."""
    try:
        _build_and_store(PreprocessCache(root), key, job.path, job.kind, job.params, job.build,
                         job.extra_sources)
    except Exception as exc:
        return _error_text(exc, job.path)
    return None


def _error_text(exc: BaseException, path) -> str:
    """The exception as one line that names ``path`` (project errors already do)."""
    text = str(exc) if isinstance(exc, UmbrellaError) else f"{type(exc).__name__}: {exc}"
    return text if str(path) in text else f"{path}: {text}"


def _check_picklable(job: CacheJob) -> None:
    try:
        pickle.dumps(job.build)
    except Exception as exc:
        raise TypeError(f"CacheJob.build for {job.path} cannot be sent to a worker process "
                        f"({type(exc).__name__}: {exc}); use functools.partial of a module-level "
                        "function, or workers=1") from exc


def _mp_context():
    """fork on Linux (no ``__main__`` guard needed in scripts, workers start fast); spawn
    elsewhere."""
    fork_ok = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if fork_ok else "spawn")
