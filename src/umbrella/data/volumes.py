"""Reading and preprocessing 3D brain MRI volumes (T1 and 3D scalar maps).

Every array here is ``(D, H, W) = (x, y, z)`` in RAS+ voxel order, as nibabel gives it after
:func:`nibabel.as_closest_canonical`: axis 0 runs left -> Right, axis 1 posterior -> Anterior,
axis 2 inferior -> Superior.

Pipeline (:func:`preprocess_volume`): :func:`read_nifti` -> resampling to
``VolumeSpec.target_spacing()`` (``voxel_size``, else ``field_of_view / image_size``) ->
:func:`fit_to_shape` around the head -> :func:`normalize_intensity`.

Geometry is physical: the config's default ``field_of_view`` of 201.6 mm (96 voxels of 2.1 mm)
holds an adult brain with margin at any input spacing (0.7 mm HCP, 1 mm ABCD / UKB, 2 mm MNI,
4 mm rsfMRI): the input is always filled by the same physical extent of the head.
:class:`VolumeAugment` is the (MONAI-based, seeded) training augmentation applied afterwards.

MONAI is imported lazily (only by :class:`VolumeAugment`) because importing it takes seconds.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import OrientationError
from nibabel.spatialimages import HeaderDataError, SpatialImage
from scipy import ndimage

from umbrella.errors import VolumeError

SPATIAL_MODES = ("crop_pad", "resize")
NORMALIZE_METHODS = ("zscore_brain", "percentile", "none")
MAX_VOXELS = 2**28  # ~1 GiB of float32; a resampling target above this is surely a config mistake
_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, OverflowError, MemoryError, zlib.error,
                ImageFileError, HeaderDataError, OrientationError)
_CORRUPT_FIX = ("re-download or re-convert the file (e.g. with dcm2niix); "
                "`gzip -t FILE` checks a .nii.gz")


def _int_triple(name: str, value: Any) -> tuple[int, int, int]:
    ok = (isinstance(value, list | tuple) and len(value) == 3
          and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0
                  for v in value))
    if not ok:
        raise ValueError(f"VolumeSpec.{name} must be 3 positive integers (D, H, W), got {value!r}")
    return tuple(int(v) for v in value)


def _float_triple(name: str, value: Any) -> tuple[float, float, float]:
    ok = (isinstance(value, list | tuple) and len(value) == 3
          and all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                  and np.isfinite(v) and v > 0 for v in value))
    if not ok:
        raise ValueError(f"VolumeSpec.{name} must be None or 3 positive finite numbers (mm), "
                         f"got {value!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class VolumeSpec:
    """How a volume becomes a model input of shape ``image_size`` (D, H, W) in RAS+ order."""

    image_size: tuple[int, int, int] = (96, 96, 96)
    voxel_size: tuple[float, float, float] | None = None  # resample to this spacing (mm) first
    spatial: str = "crop_pad"  # "crop_pad" (crop/pad around the head, never rescales) | "resize"
    normalize: str = "zscore_brain"  # "zscore_brain" | "percentile" | "none"
    percentiles: tuple[float, float] = (0.5, 99.5)  # for "percentile": clip, then scale to [0, 1]
    # crop_pad without voxel_size: resample to field_of_view / image_size mm per axis first, so
    # the input covers this many mm whatever the file's spacing (None: keep the file's spacing)
    field_of_view: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _int_triple("image_size", self.image_size))
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", _float_triple("voxel_size", self.voxel_size))
        if self.field_of_view is not None:
            object.__setattr__(self, "field_of_view",
                               _float_triple("field_of_view", (self.field_of_view,) * 3)[0])
        if self.spatial not in SPATIAL_MODES:
            raise ValueError(f"VolumeSpec.spatial must be one of {SPATIAL_MODES}, "
                             f"got {self.spatial!r}")
        if self.normalize not in NORMALIZE_METHODS:
            raise ValueError(f"VolumeSpec.normalize must be one of {NORMALIZE_METHODS}, "
                             f"got {self.normalize!r}")
        p = self.percentiles
        ok = (isinstance(p, list | tuple) and len(p) == 2
              and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
              and 0.0 <= p[0] < p[1] <= 100.0)
        if not ok:
            raise ValueError("VolumeSpec.percentiles must be (low, high) with "
                             f"0 <= low < high <= 100, got {p!r}")
        object.__setattr__(self, "percentiles", (float(p[0]), float(p[1])))

    def target_spacing(self) -> tuple[float, float, float] | None:
        """The spacing (mm) volumes are resampled to before fitting: ``voxel_size``, else for
        crop_pad ``field_of_view / max(image_size)`` on every axis (isotropic: the longest axis
        of the input spans ``field_of_view``), else None (keep the file's)."""
        if self.voxel_size is not None:
            return self.voxel_size
        if self.field_of_view is None or self.spatial != "crop_pad":
            return None
        return (self.field_of_view / max(self.image_size),) * 3

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists instead of tuples); an unset field_of_view is left out,
        so specs (and cache keys) written before it existed read back the same."""
        d = asdict(self)
        if d["field_of_view"] is None:
            del d["field_of_view"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> VolumeSpec:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"VolumeSpec got unknown keys {unknown}; "
                             f"allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def read_nifti(path: str | Path, *, record_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D volume as RAS+ canonical ``(data, affine)``: NIfTI-1 or NIfTI-2 (.nii,
    .nii.gz) or FreeSurfer MGH (.mgh, .mgz: T1.mgz, brain.mgz, norm.mgz), all through nibabel.

    ``data`` is float32 of shape (D, H, W) with scl_slope / scl_inter applied; ``affine`` is the
    4x4 float64 voxel-to-world matrix of the reoriented image. A 4D image whose extra dims are
    all 1 is squeezed to 3D. Raises :class:`VolumeError` naming the file for: a missing file, an
    unreadable / corrupt / truncated file, a non-3D image, a zero-size dim, NaN / Inf voxels and a
    constant volume.
    """
    path = Path(path)

    def fail(message: str, fix: str) -> VolumeError:
        return VolumeError(message, path=path, record_id=record_id, fix=fix)

    if not path.is_file():
        raise fail("file not found" if not path.exists() else "not a regular file",
                   "check the image path in the record and the modality's data root")
    return read_canonical(path, 3, fail, "select one 3D volume, e.g. nibabel "
                          "`img.slicer[..., 0]` or `fslroi`, or use the modality's 4D loader")


def read_canonical(path: Path, ndim: int, fail, dims_fix: str) -> tuple[np.ndarray, np.ndarray]:
    """An existing NIfTI of ``ndim`` dims (trailing singleton dims squeezed) -> RAS+ canonical
    float32 data with scaling applied, and its affine. ``fail(message, fix)`` builds the error."""
    try:
        img = nib.load(path)
    except _READ_ERRORS as exc:
        raise fail(f"cannot read as NIfTI / MGH volume ({type(exc).__name__}: {exc})",
                   _CORRUPT_FIX) from exc
    if not isinstance(img, SpatialImage):
        raise fail(f"{type(img).__name__} is not a volumetric image",
                   f"point the record at a {ndim}D NIfTI")
    shape = tuple(img.shape)
    if 0 in shape:
        raise fail(f"image has a zero-size dimension, shape {shape}",
                   "the file holds no voxels; re-convert it or drop the record")
    if len(shape) < ndim or any(n != 1 for n in shape[ndim:]):
        kind = "3D volume" if ndim == 3 else "4D run (X, Y, Z, T)"
        raise fail(f"expected a {kind}, got shape {shape}", dims_fix)
    _check_header(img, path, fail)
    try:
        canonical = nib.as_closest_canonical(img)
        data = canonical.get_fdata(dtype=np.float32)
    except _READ_ERRORS as exc:
        raise fail(f"cannot read voxel data ({type(exc).__name__}: {exc})", _CORRUPT_FIX) from exc
    data = data.reshape(data.shape[:ndim])
    _check_values(data, fail)
    return data, np.asarray(canonical.affine, dtype=np.float64)


def _check_header(img, path: Path, fail) -> None:
    """Before any voxel is read: a scalar numeric type, a plausible voxel count, and (for an
    uncompressed file) enough bytes for what the header declares. Protects against headers that
    would make nibabel allocate gigabytes or map memory it cannot."""
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise fail(f"voxel type {dtype} is not a scalar real number (RGB or complex image?)",
                   "convert the image to a scalar intensity volume")
    n_voxels = int(np.prod([int(n) for n in img.shape], dtype=np.float64))
    if n_voxels > MAX_VOXELS:
        raise fail(f"the header declares {n_voxels} voxels (shape {tuple(img.shape)}), more than "
                   f"{MAX_VOXELS}", "the header is corrupt or this is not a brain volume")
    offset = int(getattr(img.header, "get_data_offset", lambda: 0)())
    if not is_compressed(path):  # a compressed file's size says nothing about its voxel bytes
        needed = offset + n_voxels * dtype.itemsize
        if needed > path.stat().st_size:
            raise fail(f"the header declares {needed} bytes of data but the file has "
                       f"{path.stat().st_size} (truncated file or corrupt header)", _CORRUPT_FIX)


_COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\x28\xb5\x2f\xfd")  # gzip (.gz, .mgz), bz2, zstd


def is_compressed(path: str | Path) -> bool:
    """Whether a file is gzip / bz2 / zstd compressed, judged by its first bytes (a FreeSurfer
    ``.mgz`` is gzip without a ``.gz`` suffix); False for a file that cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return any(head.startswith(m) for m in _COMPRESSION_MAGIC)


def _check_values(data: np.ndarray, fail) -> None:
    """Raise (via ``fail``) on non-finite voxels or a constant (D, H, W) volume."""
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise fail(f"{bad} of {data.size} voxels are NaN or Inf",
                   "re-run the step that produced the image, or replace non-finite voxels "
                   "(e.g. numpy.nan_to_num) before training")
    if data.min() == data.max():
        raise fail(f"volume is constant (every voxel is {data.flat[0]:g})",
                   "the image is blank; check its conversion or drop the record")


def antialias_sigmas(have, want) -> tuple[float, ...]:
    """Per axis the Gaussian sigma (in input voxels) that low-passes an axis shrunk from ``have``
    to ``want`` voxels before it is resampled: ``(n / t - 1) / 2`` when shrinking by ``n / t``
    (the prefilter scikit-image's ``resize(anti_aliasing=True)`` uses), 0 where the axis keeps
    or gains voxels."""
    return tuple(max(0.0, (n / t - 1.0) / 2.0) for n, t in zip(have, want, strict=True))


def _resize(data: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resize of (D, H, W) to ``shape``; voxels are cells (edges map onto edges).

    An axis that shrinks is low-passed first (:func:`antialias_sigmas`): trilinear interpolation
    alone samples the input at a few points per output voxel, so at 2 mm -> 8 mm a thin structure
    (cortex, a lesion) lands in the output by where the samples fall instead of by how much of it
    the output voxel holds, and noise is not averaged down.
    """
    data = np.asarray(data, dtype=np.float32)
    sigmas = antialias_sigmas(data.shape, shape)
    if any(sigmas):
        data = ndimage.gaussian_filter(data, sigmas, mode="nearest", truncate=4.0)
    factors = [t / n for t, n in zip(shape, data.shape, strict=True)]
    out = ndimage.zoom(data, factors, order=1, mode="nearest", grid_mode=True)
    return out.astype(np.float32, copy=False)


def head_windows(data: np.ndarray, shape) -> list[slice]:
    """Per axis the crop window (of ``min(n, t)`` voxels) that :func:`fit_to_shape` keeps when
    it is given ``keep=brain_mask(data)``: the window holding the head's bounding box, as
    central as possible; a head longer than the window keeps its centre, except along the
    inferior-superior axis (2), where the top is kept and the neck is dropped."""
    return crop_windows(data.shape, shape, mask_box(brain_mask(data)))


SPECK_FRACTION = 0.01  # mask_box: components under this fraction of the largest are specks


def mask_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """Per axis the half-open [lo, hi) extent of a bool mask (the whole axis when it is empty),
    specks left out: a connected component (faces touching) smaller than SPECK_FRACTION of the
    largest does not count. A threshold mask of a noisy scan holds scattered background voxels,
    and one of them at the edge of the field of view would otherwise stretch the head's box over
    the whole volume and move that scan's crop (11 of 40 of the learning benchmark's synthetic
    scans read at 4 mm: benchmarks/README.md section 14)."""
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        kept = np.flatnonzero(sizes >= SPECK_FRACTION * sizes.max()) + 1
        mask = np.isin(labels, kept)
    box = []
    for axis in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, mask.shape[axis]))
    return box


def crop_windows(have, want, box=None) -> list[slice]:
    """Crop windows (slices) per axis from ``have`` to ``want`` voxels: a window that holds
    ``box`` (per axis [lo, hi)), as central as possible; a box longer than the window keeps its
    centre, except along axis 2 (inferior-superior), which keeps the top. ``box`` None: central.
    An axis not longer than its target keeps everything (``slice(0, n)``)."""
    out = []
    for axis, (n, t) in enumerate(zip(have, want, strict=True)):
        lo, hi = box[axis] if box is not None else (0, n)
        if n <= t:
            out.append(slice(0, n))
            continue
        if box is None:
            start = (n - t) // 2
        elif hi - lo <= t:  # the whole box fits: as central as possible around it
            start = min(max((n - t) // 2, hi - t), lo)
        else:
            start = hi - t if axis == 2 else (lo + hi - t) // 2
        out.append(slice(start, start + t))
    return out


def fit_to_shape(data: np.ndarray, shape, mode: str = "crop_pad",
                 keep: np.ndarray | None = None) -> np.ndarray:
    """Bring a (D, H, W) array to ``shape`` (3 ints); returns float32 of exactly that shape.

    ``crop_pad``: crop / pad each axis independently; padding is central (an odd remainder at
    the end) with the volume's minimum. Spacing is kept. Without ``keep`` the crop is central
    too; with ``keep`` (a bool mask, e.g. the head) each crop window holds the mask's bounding
    box where it fits (see :func:`head_windows`).
    ``resize``: trilinear resampling of the whole volume (spacing changes, aspect may change).
    """
    shape = tuple(int(s) for s in shape)
    if data.ndim != 3 or len(shape) != 3 or min(shape) < 1 or 0 in data.shape:
        raise ValueError(f"fit_to_shape needs a non-empty 3D array and 3 positive sizes, "
                         f"got array {data.shape} and shape {shape}")
    if mode == "resize":
        return _resize(data, shape)
    if mode != "crop_pad":
        raise ValueError(f"fit_to_shape mode must be one of {SPATIAL_MODES}, got {mode!r}")
    crops = crop_windows(data.shape, shape, mask_box(keep) if keep is not None else None)
    pads = []
    for n, t in zip(data.shape, shape, strict=True):
        before = max(t - n, 0) // 2
        pads.append((before, max(t - n, 0) - before))
    out = np.asarray(data[tuple(crops)], dtype=np.float32)
    return np.pad(out, pads, mode="constant", constant_values=float(data.min()))


def brain_mask(data: np.ndarray) -> np.ndarray:
    """Bool (D, H, W) foreground mask: voxels above min + 10% of the (min .. 99.5th pct) range.

    For MRI with a ~0 background this is "> 10% of the robust max". Falls back to all voxels
    when the threshold selects nothing (e.g. a few bright outliers in an almost flat volume).
    """
    lo, hi = float(data.min()), float(np.percentile(data, 99.5))
    mask = data > lo + 0.1 * (hi - lo)
    return mask if mask.any() else np.ones(data.shape, dtype=bool)


def normalize_intensity(data: np.ndarray, method: str, percentiles=(0.5, 99.5)) -> np.ndarray:
    """Normalise intensities of an array (any shape, normally (D, H, W)); returns float32.

    ``zscore_brain``: ``(x - mean) / std`` over :func:`brain_mask` voxels; background voxels are
    then set to the *masked minimum* (the lowest brain value after the transform), so background
    is never brighter than brain and the whole result is invariant to ``a * x + b`` (a > 0).
    A zero std (flat foreground) divides by 1. ``percentile``: clip to the two percentiles, then
    scale to [0, 1] (all zeros if they coincide). ``none``: unchanged values.
    """
    x = np.asarray(data, dtype=np.float32)
    if method == "none":
        return x.copy()
    if method == "percentile":
        lo, hi = np.percentile(x, [float(percentiles[0]), float(percentiles[1])])
        if hi <= lo:
            return np.zeros_like(x)
        return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if method != "zscore_brain":
        raise ValueError(f"normalize method must be one of {NORMALIZE_METHODS}, got {method!r}")
    mask = brain_mask(x)
    brain = x[mask].astype(np.float64)
    std = float(brain.std())
    out = ((x - brain.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    out[~mask] = out[mask].min()
    return out


def resample_to_spacing(data: np.ndarray, affine: np.ndarray,
                        voxel_size: tuple[float, float, float]) -> np.ndarray:
    """Trilinear resampling of (D, H, W) from the affine's spacing to ``voxel_size`` (mm),
    anti-aliased where the spacing grows (:func:`_resize`).

    The output shape is ``round(n * old / new)`` per axis (at least 1); float32.
    """
    old = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    shape = tuple(max(1, round(n * o / v)) for n, o, v in zip(data.shape, old, voxel_size,
                                                               strict=True))
    if np.prod(shape, dtype=np.float64) > MAX_VOXELS:
        raise ValueError(f"resampling {data.shape} at {tuple(old.round(3))} mm to "
                         f"{voxel_size} mm gives {shape}, more than {MAX_VOXELS} voxels")
    if shape == data.shape and np.allclose(old, voxel_size):
        return np.asarray(data, dtype=np.float32)
    return _resize(data, shape)


def preprocess_volume(path: str | Path, spec: VolumeSpec, *,
                      record_id: str | None = None) -> np.ndarray:
    """File -> model input: C-contiguous float32 of shape ``spec.image_size`` (D, H, W), RAS+."""
    data, affine = read_nifti(path, record_id=record_id)
    return finish_volume(data, affine, spec, path=path, record_id=record_id)


def finish_volume(data: np.ndarray, affine: np.ndarray, spec: VolumeSpec, *, path=None,
                  record_id: str | None = None) -> np.ndarray:
    """(D, H, W) RAS+ data -> resampled to ``spec.target_spacing()``, fitted (crop_pad: around
    the head, see :func:`head_windows`), normalised float32."""
    data = resample_for_spec(data, affine, spec, path=path, record_id=record_id)
    keep = brain_mask(data) if spec.spatial == "crop_pad" else None
    data = fit_to_shape(data, spec.image_size, spec.spatial, keep=keep)
    data = normalize_intensity(data, spec.normalize, spec.percentiles)
    return np.ascontiguousarray(data, dtype=np.float32)


def resample_for_spec(data: np.ndarray, affine: np.ndarray, spec: VolumeSpec, *, path=None,
                      record_id: str | None = None) -> np.ndarray:
    spacing = spec.target_spacing()
    if spacing is None:
        return data
    try:
        return resample_to_spacing(data, affine, spacing)
    except ValueError as exc:
        raise VolumeError(str(exc), path=path, record_id=record_id,
                          fix="check voxel_size / field_of_view and the file's header") from exc


def kept_fraction(data: np.ndarray, affine: np.ndarray, spec: VolumeSpec,
                  mask: np.ndarray | None = None) -> float:
    """The fraction of ``mask`` (default: the head, :func:`brain_mask` of ``data``) that the
    spatial fitting of ``spec`` keeps, measured after resampling as :func:`finish_volume` does
    (the same windows); 1.0 for ``resize``, which keeps everything."""
    if spec.spatial != "crop_pad":
        return 1.0
    mask = brain_mask(data) if mask is None else mask
    spacing = spec.target_spacing()
    if spacing is not None:
        data = resample_to_spacing(data, affine, spacing)
        mask = resample_to_spacing(mask.astype(np.float32), affine, spacing)
    mask = np.asarray(mask, dtype=np.float64)
    total = float(mask.sum())
    if total <= 0:
        return 1.0
    window = head_windows(data, spec.image_size)
    return float(mask[tuple(window)].sum()) / total


class VolumeAugment:
    """Seeded random augmentation of a (D, H, W) volume built on MONAI array transforms.

    Per call: a flip along each axis in ``flip_axes`` (each with ``flip_prob``); one RandAffine
    (rotation up to ``rotate_deg`` degrees, scaling by 1 +/- ``scale``, translation up to
    ``translate_vox`` voxels, per axis; bilinear, border padding so background stays background);
    then intensity scaling by 1 +/- ``intensity`` and a shift of +/- ``intensity``; then a contrast
    curve (MONAI RandAdjustContrast: the volume's range mapped to [0, 1], raised to a power drawn
    uniformly from [1 / (1 + ``gamma``), 1 + ``gamma``], mapped back, the mean and standard
    deviation kept). A zero range drops that transform. ``__call__(array, seed)`` re-seeds the
    Compose, so the output is a pure function of (array, seed); derive ``seed`` from (base seed,
    epoch, sample index) to make it independent of DataLoader workers. Not thread-safe: use one
    instance per thread / worker.
    """

    def __init__(self, *, flip_prob: float = 0.5, rotate_deg: float = 5.0, scale: float = 0.05,
                 translate_vox: float = 4.0, intensity: float = 0.1, gamma: float = 0.0,
                 flip_axes: tuple[int, ...] = (0, 1, 2)):
        from monai import transforms as mt

        values = {"flip_prob": flip_prob, "rotate_deg": rotate_deg, "scale": scale,
                  "translate_vox": translate_vox, "intensity": intensity, "gamma": gamma}
        for name, v in values.items():
            if not (isinstance(v, int | float) and np.isfinite(v) and v >= 0):
                raise ValueError(f"VolumeAugment {name} must be a finite number >= 0, got {v!r}")
        if flip_prob > 1 or scale >= 1 or not set(flip_axes) <= {0, 1, 2}:
            raise ValueError("VolumeAugment needs flip_prob <= 1, scale < 1 and flip_axes "
                             f"within (0, 1, 2); got {flip_prob}, {scale}, {flip_axes}")
        steps: list = [mt.RandFlip(prob=flip_prob, spatial_axis=a) for a in flip_axes]
        if rotate_deg or scale or translate_vox:
            steps.append(mt.RandAffine(
                prob=1.0, rotate_range=(np.deg2rad(rotate_deg),) * 3, scale_range=(scale,) * 3,
                translate_range=(translate_vox,) * 3, mode="bilinear", padding_mode="border"))
        if intensity:
            steps += [mt.RandScaleIntensity(factors=intensity, prob=1.0),
                      mt.RandShiftIntensity(offsets=intensity, prob=1.0)]
        if gamma:
            steps.append(mt.RandAdjustContrast(prob=1.0, gamma=(1 / (1 + gamma), 1 + gamma),
                                               retain_stats=True))
        self.options = {**values, "flip_axes": tuple(flip_axes)}
        self._compose = mt.Compose(steps)

    def __call__(self, array: np.ndarray, seed: int) -> np.ndarray:
        """Augment a (D, H, W) array; returns float32 of the same shape."""
        from monai.utils import convert_to_numpy

        if np.ndim(array) != 3:
            raise ValueError(f"VolumeAugment expects a (D, H, W) array, got shape "
                             f"{np.shape(array)}")
        self._compose.set_random_state(seed=int(seed))
        out = self._compose(np.asarray(array, dtype=np.float32)[None])
        return np.ascontiguousarray(convert_to_numpy(out)[0], dtype=np.float32)
