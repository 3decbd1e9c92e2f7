"""Resting-state fMRI runs: reading, spatial fitting, normalisation and windows over time.

A *run* is ``(X, Y, Z, T)`` float32 in RAS+ voxel order (axis 0 left -> Right, axis 1
posterior -> Anterior, axis 2 inferior -> Superior), as :func:`read_fmri_run` returns it. The
preprocessed run that the cache stores is laid out ``(T, D, H, W)`` so that a window over time is
one contiguous slice of a memory-mapped file; :func:`take_window` turns it into the model's
``(D, H, W, L)`` input (the ``(1, 96, 96, 96, T)`` tensor without its channel).

Pipeline (:func:`preprocess_fmri`): :func:`read_fmri_run` -> optional resampling to
``FmriSpec.voxel_size`` -> :func:`fit_run_to_shape` (never drops brain) -> :func:`normalize_run`
-> transpose to ``(T, D, H, W)``.

Two input forms are read:

* a 4D NIfTI ``(X, Y, Z, T)``; nibabel's ``as_closest_canonical`` makes it RAS+ and applies
  scl_slope / scl_inter;
* a SwiFT-style frame folder: ``frame_0.pt``, ``frame_1.pt``, ... each a 3D tensor ``(X, Y, Z)``
  already in RAS+ order, plus an optional ``global_stats.pt`` dict (see :func:`read_frame_stats`).
  ``.pt`` files are only ever read with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umbrella.data.volumes import (
    _check_values,
    brain_mask,
    crop_windows,
    mask_box,
    read_canonical,
    resample_to_spacing,
)
from umbrella.errors import VolumeError

FMRI_NORMALIZE_METHODS = ("zscore_run", "zscore_run_bgmin", "zscore_voxel", "none")
AXIS_NAMES = ("0 (x, left-right)", "1 (y, posterior-anterior)", "2 (z, inferior-superior)")
FRAME_PATTERN = re.compile(r"^frame_(\d+)\.pt$")
STATS_FILE = "global_stats.pt"
_PT_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError,
              zipfile.BadZipFile)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"FmriSpec.{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _size_triple(value: Any) -> tuple[int, int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 3
            and all(_is_int(v) and v > 0 for v in value)):
        raise ValueError(f"FmriSpec.image_size must be 3 positive integers (D, H, W), "
                         f"got {value!r}")
    return tuple(int(v) for v in value)


def _spacing_triple(value: Any) -> tuple[float, float, float]:
    if not (isinstance(value, list | tuple) and len(value) == 3
            and all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                    and np.isfinite(v) and v > 0 for v in value)):
        raise ValueError(f"FmriSpec.voxel_size must be None or 3 positive finite numbers (mm), "
                         f"got {value!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class FmriSpec:
    """How a run becomes model windows of shape ``image_size + (sequence_length,)``.

    ``voxel_size`` (mm, optional) resamples every frame before fitting the shape; it needs the
    NIfTI affine, so it is rejected for frame folders.
    """

    image_size: tuple[int, int, int] = (96, 96, 96)  # spatial model shape (D, H, W)
    sequence_length: int = 20  # frames per window (L)
    stride_within_seq: int = 1  # step between the frames of one window
    stride_between_seq: int = 1  # step between window starts
    normalize: str = "zscore_run"  # "zscore_run" | "zscore_run_bgmin" | "zscore_voxel" | "none"
    voxel_size: tuple[float, float, float] | None = None
    # without voxel_size: resample to field_of_view / image_size mm per axis (a frame folder,
    # which has no affine, keeps its grid); None keeps the file's spacing
    field_of_view: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _size_triple(self.image_size))
        for name in ("sequence_length", "stride_within_seq", "stride_between_seq"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        if self.normalize not in FMRI_NORMALIZE_METHODS:
            raise ValueError(f"FmriSpec.normalize must be one of {FMRI_NORMALIZE_METHODS}, "
                             f"got {self.normalize!r}")
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", _spacing_triple(self.voxel_size))
        if self.field_of_view is not None:
            object.__setattr__(self, "field_of_view",
                               _spacing_triple((self.field_of_view,) * 3)[0])

    def target_spacing(self) -> tuple[float, float, float] | None:
        """``voxel_size``, else ``field_of_view / image_size`` per axis, else None."""
        if self.voxel_size is not None:
            return self.voxel_size
        if self.field_of_view is None:
            return None
        return tuple(self.field_of_view / n for n in self.image_size)

    @property
    def window_span(self) -> int:
        """Frames from the first to the last frame of one window, inclusive."""
        return (self.sequence_length - 1) * self.stride_within_seq + 1

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists instead of tuples); an unset field_of_view is left out,
        so specs (and cache keys) written before it existed read back the same."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["field_of_view"] is None:
            del d["field_of_view"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FmriSpec:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"FmriSpec got unknown keys {unknown}; "
                             f"allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


# ----------------------------------------------------------------------------- windows over time

def window_starts(n_frames: int, sequence_length: int, stride_within: int,
                  stride_between: int) -> list[int]:
    """Start frames of every full window: a window covers frames start + k*stride_within,
    k < sequence_length. Starts step by ``stride_between`` from 0; a run shorter than one window
    span gives ``[]``. E.g. (10, 3, 2, 3) -> [0, 3] (frames [0, 2, 4] and [3, 5, 7])."""
    if not (_is_int(n_frames) and n_frames >= 0):
        raise ValueError(f"n_frames must be an integer >= 0, got {n_frames!r}")
    for name, v in (("sequence_length", sequence_length), ("stride_within", stride_within),
                    ("stride_between", stride_between)):
        _positive_int(name, v)
    span = (sequence_length - 1) * stride_within + 1
    return list(range(0, int(n_frames) - span + 1, stride_between))


def window_frames(start: int, sequence_length: int, stride_within: int) -> list[int]:
    """Frame indices of the window starting at ``start``: [start, start + s, ...] (L of them)."""
    return [int(start) + k * int(stride_within) for k in range(int(sequence_length))]


def n_windows(n_frames: int, spec: FmriSpec) -> int:
    """Number of full windows in a run of ``n_frames`` frames under ``spec``."""
    return len(window_starts(n_frames, spec.sequence_length, spec.stride_within_seq,
                             spec.stride_between_seq))


# ----------------------------------------------------------------------------- reading

def read_fmri_run(path: str | Path, *,
                  record_id: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, Y, Z, T) float32 RAS+ canonical (nibabel as_closest_canonical; scaling applied) from a
    4D NIfTI, or stacked frames from a frame folder (affine None).

    Returns ``(run, affine)``; ``affine`` is the 4x4 voxel-to-world matrix of the reoriented
    NIfTI, or None for a frame folder. Raises :class:`VolumeError` naming the path for: a missing
    path, an unreadable / corrupt / truncated file, a non-4D image, a zero-size dimension, NaN /
    Inf voxels and a constant run. Whether the run is long enough for one window is NOT checked.
    """
    path = Path(path)
    if path.is_dir():
        return _read_frame_folder(path, record_id), None
    return _read_nifti_4d(path, record_id)


def _failer(path: Path, record_id: str | None):
    def fail(message: str, fix: str) -> VolumeError:
        return VolumeError(message, path=path, record_id=record_id, fix=fix)
    return fail


def _read_nifti_4d(path: Path, record_id: str | None) -> tuple[np.ndarray, np.ndarray]:
    """4D NIfTI -> ((X, Y, Z, T) float32 RAS+, 4x4 affine)."""
    fail = _failer(path, record_id)
    if not path.exists():
        raise fail("file not found", "check the rsfMRI path in the record and the modality's "
                   "data root (a frame folder must be a directory of frame_<i>.pt files)")
    if not path.is_file():
        raise fail("not a regular file or folder",
                   "point the record at a 4D NIfTI or a frame folder")
    return read_canonical(path, 4, fail, "a 3D volume belongs to the T1/dMRI sections; for "
                          "rsfMRI give the whole 4D series or a frame folder")


def _frame_files(folder: Path, fail) -> list[Path]:
    """Sorted frame_<i>.pt paths of a folder; i must run 0..N-1 without gaps."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := FRAME_PATTERN.match(p.name))}
    if not found:
        raise fail("folder holds no frame_<i>.pt files", "a frame folder needs frame_0.pt, "
                   "frame_1.pt, ... (one 3D tensor each); or point the record at a 4D NIfTI")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise fail(f"frames are not contiguous: {len(missing)} missing, "
                   f"first frame_{missing[0]}.pt",
                   "re-export the run so frames are numbered 0..N-1")
    return [found[i] for i in range(len(found))]


def _load_pt(path: Path, fail) -> Any:
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except _PT_ERRORS as exc:
        raise fail(f"cannot read {path.name} with torch.load(weights_only=True) "
                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                   "re-save it as a plain tensor with torch.save; files holding pickled "
                   "objects other than tensors/dicts are refused") from exc


def _read_frame_folder(folder: Path, record_id: str | None) -> np.ndarray:
    """frame_<i>.pt (X, Y, Z) tensors -> (X, Y, Z, T) float32."""
    fail = _failer(folder, record_id)
    files = _frame_files(folder, fail)
    data = None
    for i, file in enumerate(files):
        frame = _frame_array(file, fail)
        if data is None:
            data = np.empty((*frame.shape, len(files)), dtype=np.float32)
        elif frame.shape != data.shape[:3]:
            raise fail(f"{file.name} has shape {frame.shape}, frame_0.pt has {data.shape[:3]}",
                       "all frames of a run must share one grid; re-export the run")
        data[..., i] = frame
    _check_values(data, fail)
    return data


def _frame_array(file: Path, fail) -> np.ndarray:
    """One frame file -> (X, Y, Z) float32 numpy array."""
    import torch

    t = _load_pt(file, fail)
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or 0 in t.shape:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise fail(f"{file.name} is not a non-empty 3D tensor (X, Y, Z): got {got}",
                   "each frame file must hold one 3D tensor")
    return t.detach().to(torch.float32).numpy()


def read_frame_stats(folder: str | Path, *, record_id: str | None = None) -> dict | None:
    """The optional ``global_stats.pt`` of a frame folder as {name: float}, or None if absent.

    SwiFT writes e.g. {"global_mean": ..., "global_std": ...}; tensors of one element become
    floats. The pipeline does not need it (:func:`normalize_run` recomputes run statistics).
    """
    import torch

    folder = Path(folder)
    path = folder / STATS_FILE
    if not path.is_file():
        return None
    fail = _failer(path, record_id)
    stats = _load_pt(path, fail)
    if not isinstance(stats, dict):
        raise fail(f"holds {type(stats).__name__}, expected a dict of numbers",
                   "save a dict such as {'global_mean': m, 'global_std': s}")
    out = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise fail(f"entry {key!r} is {type(value).__name__}, expected a number",
                       "store plain numbers (or 1-element tensors) only")
        out[str(key)] = float(value)
    return out


# ----------------------------------------------------------------------------- spatial fitting

def fit_run_to_shape(run: np.ndarray, shape, *, path: str | Path | None = None,
                     record_id: str | None = None) -> np.ndarray:
    """Crop/pad the 3 spatial axes of a (X, Y, Z, T) run to ``shape`` without dropping brain.

    The brain bounding box comes from :func:`brain_mask` of the temporal mean. A cropped axis keeps
    a window as central as possible that still contains the whole box; a padded axis is padded
    centrally (odd remainder at the end, as :func:`umbrella.data.volumes.fit_to_shape`) with the
    run minimum. Returns float32 ``(*shape, T)``. If the box is larger than ``shape`` on an axis,
    raises :class:`VolumeError` naming the axis, the brain extent and the fix.
    """
    shape = tuple(int(s) for s in shape)
    if run.ndim != 4 or len(shape) != 3 or min(shape) < 1 or 0 in run.shape:
        raise ValueError(f"fit_run_to_shape needs a non-empty (X, Y, Z, T) array and 3 positive "
                         f"sizes, got array {run.shape} and shape {shape}")
    box = mask_box(brain_mask(run.mean(axis=3, dtype=np.float64)))
    windows = crop_windows(run.shape[:3], shape, box)
    crops, pads = [], []
    for axis, (n, t, (lo, hi)) in enumerate(zip(run.shape[:3], shape, box, strict=True)):
        if hi - lo > t:
            raise VolumeError(
                f"the brain spans {hi - lo} voxels along axis {AXIS_NAMES[axis]} "
                f"(voxels {lo}..{hi - 1} of {n}) but the model shape allows {t}",
                path=path, record_id=record_id,
                fix="raise image_size on that axis (keep it a multiple of the patch size) or "
                    "resample to coarser voxels (voxel_size)")
        crops.append(windows[axis])  # the brain fits: its box lies inside the window
        before = max(t - n, 0) // 2
        pads.append((before, max(t - n, 0) - before))
    out = np.full((*shape, run.shape[3]), float(run.min()), dtype=np.float32)
    inner = tuple(slice(before, before + min(n, t))
                  for (before, _), n, t in zip(pads, run.shape[:3], shape, strict=True))
    out[inner] = run[tuple(crops)]
    return out


def _resample_run(run: np.ndarray, affine: np.ndarray,
                  voxel_size: tuple[float, float, float]) -> np.ndarray:
    """Resample each frame of a (X, Y, Z, T) run to ``voxel_size`` mm; float32 (X', Y', Z', T)."""
    frames = [resample_to_spacing(run[..., i], affine, voxel_size) for i in range(run.shape[3])]
    return np.stack(frames, axis=-1)


# ----------------------------------------------------------------------------- intensity

def normalize_run(run: np.ndarray, method: str) -> np.ndarray:
    """Normalise a (X, Y, Z, T) run; returns float32 of the same shape.

    ``zscore_run``: ``(x - mean) / std`` with mean and std over all brain voxels of all frames
    (brain = :func:`brain_mask` of the temporal mean; a zero std divides by 1).
    ``zscore_run_bgmin``: the same, then every background voxel of every frame is set to the
    minimum brain value after the transform. ``zscore_voxel``: every brain voxel's series
    demeaned and divided by its own standard deviation over the run's frames (a constant series
    becomes 0), background 0: only the fluctuations are left, each voxel on the same scale, as
    connectivity analyses standardise their series; anatomy and intensity are gone.
    ``none``: an unchanged float32 copy.
    """
    if method not in FMRI_NORMALIZE_METHODS:
        raise ValueError(f"normalize method must be one of {FMRI_NORMALIZE_METHODS}, "
                         f"got {method!r}")
    if run.ndim != 4:
        raise ValueError(f"normalize_run expects a (X, Y, Z, T) run, got shape {run.shape}")
    return _normalize_inplace(np.array(run, dtype=np.float32, copy=True), method)


def _normalize_inplace(out: np.ndarray, method: str) -> np.ndarray:
    """:func:`normalize_run` on a float32 (X, Y, Z, T) array that it may overwrite."""
    if method == "none":
        return out
    mask = brain_mask(out.mean(axis=3, dtype=np.float64))
    if method == "zscore_voxel":
        brain = out[mask].astype(np.float64)  # (n_brain, T)
        brain -= brain.mean(axis=1, keepdims=True)
        std = brain.std(axis=1, keepdims=True)
        brain /= np.where(std > 0, std, 1.0)
        out[...] = 0.0
        out[mask] = brain
        return out
    brain = out[mask]  # (n_brain, T)
    mean = float(brain.mean(dtype=np.float64))
    std = float(brain.std(dtype=np.float64))
    out -= mean
    out /= std if std > 0 else 1.0
    if method == "zscore_run_bgmin":
        out[~mask] = out[mask].min()
    return out


# ----------------------------------------------------------------------------- pipeline

def preprocess_fmri(path: str | Path, spec: FmriSpec, *,
                    record_id: str | None = None) -> np.ndarray:
    """Full run preprocessed, laid out (T, D, H, W) float32 C-contiguous so that a window over
    time is a contiguous slice (the cache memory-maps this layout).

    Raises :class:`VolumeError` for every reading problem of :func:`read_fmri_run`, a brain larger
    than ``spec.image_size``, ``voxel_size`` on a frame folder, and a run with fewer frames than
    one window needs (``(sequence_length - 1) * stride_within_seq + 1``).
    """
    run, affine = read_fmri_run(path, record_id=record_id)
    n_frames = run.shape[3]
    if n_windows(n_frames, spec) == 0:
        raise VolumeError(
            f"run has {n_frames} frames; one window needs {spec.window_span} "
            f"(sequence_length {spec.sequence_length}, stride_within_seq "
            f"{spec.stride_within_seq})", path=path, record_id=record_id,
            fix="lower sequence_length / stride_within_seq or drop this run")
    if spec.voxel_size is not None or (spec.field_of_view is not None and affine is not None):
        run = _resample_for_spec(run, affine, spec, path, record_id)
    run = fit_run_to_shape(run, spec.image_size, path=path, record_id=record_id)
    run = _normalize_inplace(run, spec.normalize)  # the fitted run is a fresh array
    return np.ascontiguousarray(run.transpose(3, 0, 1, 2), dtype=np.float32)


def _resample_for_spec(run, affine, spec: FmriSpec, path, record_id) -> np.ndarray:
    if affine is None:
        raise VolumeError("a frame folder has no affine, so it cannot be resampled to "
                          f"voxel_size {spec.voxel_size}", path=path, record_id=record_id,
                          fix="leave voxel_size unset for frame folders (resample when "
                              "exporting the frames) or give the 4D NIfTI instead")
    try:
        return _resample_run(run, affine, spec.target_spacing())
    except ValueError as exc:
        raise VolumeError(str(exc), path=path, record_id=record_id,
                          fix="check voxel_size and the file's header") from exc


def take_window(run_tdhw: np.ndarray, start: int, spec: FmriSpec) -> np.ndarray:
    """(T, D, H, W) run -> (D, H, W, L) window float32 (the model's (1, 96, 96, 96, T) input
    without the channel); frames ``window_frames(start, L, stride_within_seq)``.

    Works on a memory-mapped array (reads only the frames it needs). Raises ValueError if the
    window does not fit in the run or the spatial shape is not ``spec.image_size``.
    """
    if run_tdhw.ndim != 4 or tuple(run_tdhw.shape[1:]) != spec.image_size:
        raise ValueError(f"take_window expects a (T, *{spec.image_size}) run, "
                         f"got shape {tuple(run_tdhw.shape)}")
    n_frames = run_tdhw.shape[0]
    if not (_is_int(start) and start >= 0):
        raise ValueError(f"window start must be an integer >= 0, got {start!r}")
    if start + spec.window_span > n_frames:
        last = start + spec.window_span - 1
        raise ValueError(f"window at start {start} needs frames {start}..{last}"
                         f" but the run has {n_frames} frames (0..{n_frames - 1})")
    window = run_tdhw[int(start):int(start) + spec.window_span:spec.stride_within_seq]
    return np.ascontiguousarray(np.moveaxis(window, 0, -1), dtype=np.float32)
