"""Scans the server may read: uploads and files under the data roots, and what the viewer shows.

A scan is registered once (``ScanStore.add``) after it has been read with the project's own
NIfTI reader, and is then referred to by an opaque id. Paths sent by a client are confined to the
data roots (:func:`resolve_under_root`): no ``..``, no absolute path outside a root, no symlink
that leads out. Uploads are written to the store's temporary folder and deleted when they fall
out of the store or the server stops.

For the viewer each scan gives two NIfTI images in the scanner's world space:

- ``original``: the scan as read (RAS+), a 4D rsfMRI run averaged over time, a dMRI series
  replaced by its FA (or the model's) map;
- ``model_input``: exactly what the model reads (resampled, cropped/padded, normalised; for
  rsfMRI the mean of the first window), with an affine that puts each voxel where it came from
  in the original, so the viewer can lay one over the other and show what was cut.
"""

from __future__ import annotations

import gzip
import io
import itertools
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from umbrella.data.dmri import compute_scalar_map, find_gradients, is_dwi_series
from umbrella.data.fmri import take_window
from umbrella.data.inputs import ModalityInput
from umbrella.data.records import ImageRef
from umbrella.data.volumes import head_windows, read_canonical, resample_to_spacing
from umbrella.errors import UmbrellaError, VolumeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class PathRefused(UmbrellaError):
    """A client asked for a path outside the data roots (answered 403)."""


class UnknownScan(UmbrellaError):
    """A scan id the store does not hold (answered 404)."""


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def resolve_under_root(path: str, modality: str, roots: dict[str, Path]) -> Path:
    """``path`` (relative to the modality's data root, or absolute inside it) -> the real file.

    Raises :class:`PathRefused` for ``..`` components, a modality without a root, and a path
    whose real location (symlinks followed) is outside the root."""
    if modality not in roots:
        given = ", ".join(sorted(roots)) or "none"
        raise PathRefused(f"no data root for {modality!r} (roots given for: {given}); start "
                          f"the server with --data-root {modality}=DIR")
    if ".." in Path(path).parts:
        raise PathRefused(f"path {path!r} contains '..'; give a path inside the {modality} "
                          "data root")
    root = roots[modality].resolve()
    candidate = Path(path) if Path(path).is_absolute() else root / path
    real = Path(candidate).resolve()  # follows every symlink
    if not real.is_relative_to(root):
        raise PathRefused(f"path {path!r} is outside the {modality} data root {root}")
    return real


def read_checked(path: Path, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` with the project's NIfTI reader: (RAS+ float32 data, affine). T1 and dMRI
    maps are 3D, rsfMRI and a dMRI series 4D. Raises :class:`VolumeError` naming the file."""
    if not is_nifti_name(path.name):
        raise VolumeError("not a NIfTI file name (.nii or .nii.gz)", path=path.name,
                          fix="upload a NIfTI image; convert DICOM with dcm2niix first")
    if not path.is_file():
        raise VolumeError("file not found" if not path.exists() else "not a regular file",
                          path=path, fix="check the path (relative to the data root)")

    def fail(message: str, fix: str) -> VolumeError:
        return VolumeError(message, path=path.name, fix=fix)

    four_d = modality == "rsfMRI" or (modality == "dMRI" and is_dwi_series(path, None))
    return read_canonical(path, 4 if four_d else 3, fail,
                          "rsfMRI needs a 4D run; T1 and dMRI maps a 3D volume")


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, overlay: bool = False) -> bytes:
    """gzip NIfTI bytes. ``overlay``: the header's display range starts just above the minimum
    (padding and the normalised background), which a viewer then draws transparent."""
    data = np.asarray(data, dtype=np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    if overlay:
        lo, hi = float(data.min()), float(np.percentile(data, 99.5))
        img.header["cal_min"] = lo + 1e-3 * max(hi - lo, 1e-6)
        img.header["cal_max"] = max(hi, img.header["cal_min"] + 1e-6)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _grid_affine(affine: np.ndarray, scale, shift) -> np.ndarray:
    """Affine of a grid whose voxel i sits at index ``i * scale + shift`` of ``affine``'s grid."""
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = shift
    return np.asarray(affine, dtype=np.float64) @ step


def _resampled_affine(affine, shape_in, shape_out) -> np.ndarray:
    """Cell-aligned trilinear resampling (scipy zoom, grid_mode): output voxel i covers input
    coordinates (i + 0.5) * n_in / n_out - 0.5."""
    s = np.asarray(shape_in, dtype=np.float64) / np.asarray(shape_out, dtype=np.float64)
    return _grid_affine(affine, s, 0.5 * s - 0.5)


def model_input_affine(mean: np.ndarray, affine: np.ndarray, spec: ModalityInput) -> np.ndarray:
    """The affine of the model input of a scan whose (X, Y, Z) RAS+ image (the temporal mean for
    rsfMRI) is ``mean`` with ``affine``: resampling to the spec's target spacing (``voxel_size``,
    else the field of view's), then the crop/pad or resize the modality's preprocessing applies
    (T1 / dMRI crop around the head, rsfMRI around the brain box)."""
    s = spec.spec
    shape = np.array(mean.shape[:3])
    spacing = s.target_spacing()
    if spacing is not None:
        mean = resample_to_spacing(mean, affine, spacing)
        affine = _resampled_affine(affine, shape, mean.shape)
        shape = np.array(mean.shape)
    target = np.array(s.image_size)
    if not spec.is_fmri and s.spatial == "resize":
        return _resampled_affine(affine, shape, target)
    # crop_pad keeps the window around the brain of the (mean) image, as preprocessing does
    windows = head_windows(mean, tuple(int(t) for t in target[:3]))
    shift = [w.start - max(int(t) - int(n), 0) // 2
             for w, n, t in zip(windows, shape, target[:3], strict=True)]
    return _grid_affine(affine, np.ones(3), np.array(shift, dtype=np.float64))


@dataclass
class Scan:
    id: str
    modality: str
    path: Path
    name: str  # shown to the user: the upload's name, or the path under the data root
    temporary: bool  # an upload: deleted with the scan
    shape: tuple[int, ...]
    views: dict[str, bytes] = field(default_factory=dict)  # "original" / "input" NIfTI bytes
    series: np.ndarray | None = None  # rsfMRI: the (X, Y, Z, T) run, for time courses

    def public(self) -> dict:
        return {"scan_id": self.id, "modality": self.modality, "name": self.name,
                "shape": list(self.shape), "uploaded": self.temporary}


class ScanStore:
    """Registered scans by id, least recently used dropped first (their uploads deleted)."""

    def __init__(self, max_scans: int = 64):
        self.max_scans = max_scans
        self._scans: OrderedDict[str, Scan] = OrderedDict()
        self._tmp = Path(tempfile.mkdtemp(prefix="umbrella-serve-"))
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.on_drop = lambda scan: None  # e.g. forget the model's cached input

    @property
    def upload_dir(self) -> Path:
        return self._tmp

    def new_upload_path(self, filename: str) -> Path:
        suffix = ".nii.gz" if filename.lower().endswith(".nii.gz") else ".nii"
        return self._tmp / f"upload-{next(self._counter):05d}-{secrets.token_hex(4)}{suffix}"

    def add(self, modality: str, path: Path, name: str, temporary: bool) -> Scan:
        """Read ``path`` with the project's reader and register it (an unreadable upload is
        deleted before the error propagates)."""
        try:
            data, _ = read_checked(path, modality)
        except BaseException:
            if temporary:
                path.unlink(missing_ok=True)
            raise
        scan = Scan(secrets.token_urlsafe(9), modality, path, name, temporary, data.shape)
        with self._lock:
            self._scans[scan.id] = scan
            dropped = []
            while len(self._scans) > self.max_scans:
                dropped.append(self._scans.popitem(last=False)[1])
        for old in dropped:
            self._drop(old)
        return scan

    def get(self, scan_id: str) -> Scan:
        with self._lock:
            scan = self._scans.get(scan_id)
            if scan is None:
                raise UnknownScan(f"no scan {scan_id!r} on this server (it may have been "
                                  "dropped: the server keeps the latest "
                                  f"{self.max_scans}); upload or open it again")
            self._scans.move_to_end(scan_id)
            return scan

    def _drop(self, scan: Scan) -> None:
        self.on_drop(scan)
        if scan.temporary:
            scan.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget every scan and delete the uploads folder."""
        with self._lock:
            scans, self._scans = list(self._scans.values()), OrderedDict()
        for scan in scans:
            self._drop(scan)
        shutil.rmtree(self._tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- viewer images

def original_view(scan: Scan, spec: ModalityInput | None) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) image shown as the scan, and its affine; keeps an rsfMRI run on the scan for
    time courses."""
    if scan.modality == "dMRI" and is_dwi_series(scan.path, None):
        kind = spec.dmri_map if spec is not None else "FA"
        bval, bvec = find_gradients(scan.path)
        return compute_scalar_map(scan.path, bval, bvec, kind)
    data, affine = read_checked(scan.path, scan.modality)
    if data.ndim == 4:
        scan.series = data
        data = data.mean(axis=3)
    return data, affine


def model_input_view(scan: Scan, spec: ModalityInput, shown: np.ndarray,
                     affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's input of ``scan`` ((X, Y, Z); rsfMRI: the mean of the first window) and the
    affine placing it over ``shown`` (the original view, same world space)."""
    array = spec.preprocess(ImageRef(scan.modality, scan.path))
    if spec.is_fmri:
        array = take_window(array, spec.window_starts(array.shape[0])[0], spec.spec).mean(axis=3)
    return array, model_input_affine(shown, affine, spec)


def view_bytes(scan: Scan, which: str, spec: ModalityInput | None) -> bytes:
    """NIfTI (gzip) bytes of ``which`` ("original" or "input") for the viewer, built once."""
    if which not in scan.views:
        shown, affine = original_view(scan, spec)
        scan.views["original"] = _nifti_bytes(shown, affine)
        if spec is not None:
            data, placed = model_input_view(scan, spec, shown, affine)
            scan.views["input"] = _nifti_bytes(data, placed, overlay=True)
    if which not in scan.views:
        raise VolumeError(f"this model does not read {scan.modality}", path=scan.name,
                          fix="open a scan of a modality the model was trained on")
    return scan.views[which]


def time_course(scan: Scan, voxel: tuple[int, int, int]) -> list[float]:
    """The rsfMRI signal at ``voxel`` (RAS+ indices of the original run)."""
    if scan.series is None:
        if scan.modality != "rsfMRI":
            raise VolumeError("a time course needs an rsfMRI run", path=scan.name,
                              fix="pick an rsfMRI scan")
        scan.series, _ = read_checked(scan.path, "rsfMRI")
    shape = scan.series.shape[:3]
    if any(not 0 <= v < n for v, n in zip(voxel, shape, strict=True)):
        raise VolumeError(f"voxel {list(voxel)} is outside the run's grid {list(shape)}",
                          path=scan.name, fix="pick a voxel inside the image")
    return [float(v) for v in scan.series[voxel]]


def read_nifti_bytes(data: bytes) -> nib.Nifti1Image:
    """A NIfTI from (gzip) bytes (used by tests and clients reading the viewer images)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return nib.Nifti1Image.from_stream(io.BytesIO(data))
