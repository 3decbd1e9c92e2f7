"""Diffusion MRI: a 4D DWI series (+ bval/bvec) or a ready 3D scalar map -> one model volume.

A 4D DWI becomes a 3D diffusion-tensor scalar map (FA, MD, AD or RD) with dipy; from there it is
treated exactly like a 3D map: optional resampling, :func:`~umbrella.data.volumes.fit_to_shape`,
:func:`~umbrella.data.volumes.normalize_intensity`. Output is ``(D, H, W)`` float32 in RAS+ order.

Orientation: FSL-style b-vectors are given in the voxel axes of the image *as stored*, so the
tensor is fitted on the stored (not reoriented) series with the b-vectors as given, and only the
resulting scalar map is reoriented to RAS+ (``as_closest_canonical``). Reordering voxels does not
change any voxel's signal, so FA/MD/AD/RD would come out the same either way; fitting in stored
order keeps the tensor's eigenvectors consistent with the b-vectors should directions be used.

Brain mask for the fit: dipy's ``median_otsu`` on the mean b0 volume (``median_radius=3``,
``numpass=1``, the settings of dipy's DTI example); if that selects nothing, the project's
:func:`~umbrella.data.volumes.brain_mask` threshold on the mean b0 is used instead. Voxels
outside the mask are 0 in every map.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from umbrella.data.volumes import (
    _CORRUPT_FIX,
    _READ_ERRORS,
    VolumeSpec,
    _check_values,
    brain_mask,
    finish_volume,
    preprocess_volume,
)
from umbrella.errors import VolumeError

SCALAR_MAPS = ("FA", "MD", "AD", "RD")
B0_THRESHOLD = 50.0  # s/mm^2: volumes at or below this b-value count as b0 (dipy's default)
MIN_DIRECTIONS = 6  # a tensor has 6 unknowns: at least 6 diffusion-weighted volumes


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_gradients(dwi_path: str | Path, bval: str | Path | None = None,
                   bvec: str | Path | None = None) -> tuple[Path, Path]:
    """Explicit bval/bvec, else siblings with the same stem (``<stem>.bval`` / ``<stem>.bvec``,
    FSL/dcm2niix style), else ``bvals`` / ``bvecs`` in the same folder (HCP style).

    Returns ``(bval_path, bvec_path)``. Raises :class:`VolumeError` naming the DWI path, the
    missing file and the fix.
    """
    dwi_path = Path(dwi_path)
    stem = _nifti_stem(dwi_path)
    explicit = {"bval": bval, "bvec": bvec}
    found: dict[str, Path] = {}
    for kind, given in explicit.items():
        if given is not None:
            candidates = [Path(given)]
        else:
            candidates = [dwi_path.with_name(f"{stem}.{kind}"), dwi_path.with_name(f"{kind}s")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            looked = " or ".join(str(c) for c in candidates)
            raise VolumeError(
                f"no {kind} file for this diffusion series: {looked} does not exist",
                path=dwi_path,
                fix=f"put {stem}.bval and {stem}.bvec next to the image, or pass the "
                    f"{kind} path explicitly ({kind}= argument)")
        found[kind] = hit
    return found["bval"], found["bvec"]


def _load_dwi(dwi_path: Path, record_id: str | None) -> nib.Nifti1Image:
    """nib image of a 4D DWI series (header checked; data not read yet)."""
    def fail(message: str, fix: str) -> VolumeError:
        return VolumeError(message, path=dwi_path, record_id=record_id, fix=fix)

    if not dwi_path.is_file():
        raise fail("file not found", "check the dMRI path in the record and the data root")
    try:
        img = nib.load(dwi_path)
    except _READ_ERRORS as exc:
        raise fail(f"cannot read as NIfTI ({type(exc).__name__}: {exc})", _CORRUPT_FIX) from exc
    if not isinstance(img, SpatialImage):
        raise fail(f"{type(img).__name__} is not a volumetric image", "give a 4D DWI NIfTI")
    shape = tuple(img.shape)
    if 0 in shape:
        raise fail(f"image has a zero-size dimension, shape {shape}", "re-convert the series")
    if len(shape) != 4 or shape[3] < 2:
        raise fail(f"expected a 4D diffusion series (X, Y, Z, N volumes), got shape {shape}",
                   "a 3D scalar map (e.g. FA) goes through preprocess_dmri directly; "
                   "compute_scalar_map needs the whole DWI series")
    return img


def _gradient_table(bval_path: Path, bvec_path: Path, n_volumes: int, dwi_path: Path,
                    record_id: str | None):
    """dipy GradientTable checked against the number of DWI volumes."""
    from dipy.core.gradients import gradient_table
    from dipy.io import read_bvals_bvecs

    def fail(message: str, fix: str) -> VolumeError:
        return VolumeError(message, path=dwi_path, record_id=record_id, fix=fix)

    try:
        bvals, bvecs = read_bvals_bvecs(str(bval_path), str(bvec_path))
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read gradients {bval_path} / {bvec_path} ({exc})",
                   "bval: one row of N b-values; bvec: 3 rows of N unit vectors "
                   "(FSL format)") from exc
    if len(bvals) != n_volumes or bvecs.shape != (n_volumes, 3):
        raise fail(f"gradient count mismatch: the image has {n_volumes} volumes but {bval_path} "
                   f"gives {len(bvals)} b-values and {bvec_path} {bvecs.shape[0]} vectors",
                   "use the bval/bvec written with this image (e.g. by dcm2niix), or drop "
                   "the volumes the gradient files do not describe")
    try:
        gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)
    except ValueError as exc:
        raise fail(f"invalid gradients in {bval_path} / {bvec_path}: {exc}",
                   "b-vectors must be unit length except for b0 volumes") from exc
    n_dw = int((~gtab.b0s_mask).sum())
    if not gtab.b0s_mask.any() or n_dw < MIN_DIRECTIONS:
        raise fail(f"a tensor fit needs >= 1 b0 and >= {MIN_DIRECTIONS} diffusion-weighted "
                   f"volumes; got {int(gtab.b0s_mask.sum())} b0 and {n_dw} weighted "
                   f"(b0 means b <= {B0_THRESHOLD:g})", "give the full DWI series")
    return gtab


def _fit_mask(mean_b0: np.ndarray) -> np.ndarray:
    """Bool (X, Y, Z) mask: median_otsu of the mean b0, else the brain_mask threshold."""
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(mean_b0, median_radius=3, numpass=1)
    return mask if mask.any() else brain_mask(mean_b0)


def _scalar(fit, kind: str) -> np.ndarray:
    """One tensor scalar map, float32, NaN/Inf -> 0; FA clipped to [0, 1]."""
    values = {"FA": fit.fa, "MD": fit.md, "AD": fit.ad, "RD": fit.rd}[kind]
    out = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0) if kind == "FA" else out


def compute_scalar_map(dwi_path: str | Path, bval_path: str | Path, bvec_path: str | Path,
                       kind: str = "FA", *,
                       record_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DWI series -> ((X, Y, Z) float32 scalar map in RAS+ canonical order, its 4x4 affine).

    dipy: read_bvals_bvecs -> gradient_table -> TensorModel(gtab).fit(data, mask) -> FA / MD / AD
    / RD (MD/AD/RD in mm^2/s when b is in s/mm^2), NaN -> 0, 0 outside the mask. The fit runs in
    the stored orientation (see the module docstring) and the map is then reoriented. Raises
    :class:`VolumeError` for a 3D input, a gradient count that differs from the number of
    volumes, unreadable files and non-finite voxels; ValueError for an unknown ``kind``.
    """
    from dipy.reconst.dti import TensorModel

    if kind not in SCALAR_MAPS:
        raise ValueError(f"dMRI scalar map must be one of {SCALAR_MAPS}, got {kind!r}")
    dwi_path = Path(dwi_path)
    img = _load_dwi(dwi_path, record_id)
    gtab = _gradient_table(Path(bval_path), Path(bvec_path), img.shape[3], dwi_path, record_id)

    def fail(message: str, fix: str) -> VolumeError:
        return VolumeError(message, path=dwi_path, record_id=record_id, fix=fix)

    try:
        data = img.get_fdata(dtype=np.float32)
    except _READ_ERRORS as exc:
        raise fail(f"cannot read voxel data ({type(exc).__name__}: {exc})", _CORRUPT_FIX) from exc
    _check_values(data, fail)
    mask = _fit_mask(data[..., gtab.b0s_mask].mean(axis=3))
    fit = TensorModel(gtab).fit(data, mask=mask)
    scalar = nib.Nifti1Image(_scalar(fit, kind), img.affine)
    canonical = nib.as_closest_canonical(scalar)
    return (np.asarray(canonical.dataobj, dtype=np.float32),
            np.asarray(canonical.affine, dtype=np.float64))


def is_dwi_series(path: Path, record_id: str | None) -> bool:
    """True for a 4D image with more than one volume (header only); False otherwise."""
    if not path.is_file():
        return False  # preprocess_volume reports the missing file
    try:
        shape = tuple(nib.load(path).shape)
    except _READ_ERRORS:
        return False  # preprocess_volume reports the unreadable file
    return len(shape) >= 4 and any(n > 1 for n in shape[3:])


def preprocess_dmri(path: str | Path, spec: VolumeSpec, *, kind: str = "FA",
                    bval: str | Path | None = None, bvec: str | Path | None = None,
                    record_id: str | None = None) -> np.ndarray:
    """File -> model input: C-contiguous float32 of shape ``spec.image_size`` (D, H, W), RAS+.

    A 3D scalar map NIfTI goes through :func:`~umbrella.data.volumes.preprocess_volume`; a 4D
    DWI has its ``kind`` map computed first (gradients from :func:`find_gradients`), then is
    resampled / fitted / normalised exactly like a 3D map.
    """
    path = Path(path)
    if not is_dwi_series(path, record_id):
        return preprocess_volume(path, spec, record_id=record_id)
    bval_path, bvec_path = find_gradients(path, bval, bvec)
    data, affine = compute_scalar_map(path, bval_path, bvec_path, kind, record_id=record_id)
    _check_values(data, lambda message, fix: VolumeError(
        f"{kind} map: {message}", path=path, record_id=record_id,
        fix="the tensor fit found no usable brain voxels; check the series and its b-values"))
    return finish_volume(data, affine, spec, path=path, record_id=record_id)
