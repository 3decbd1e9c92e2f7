"""The demo cohorts' shared anatomy: the packaged MNI152 template, the subject transform (scale,
rotation, translation, ventricle warp) composed into one coordinate map, the bias field, and the
atomic int16 NIfTI writer. The basic cohort (:mod:`umbrella.demo.cohort`), its extra modalities
(:mod:`umbrella.demo.modalities`) and the realistic variant (:mod:`umbrella.demo.realistic`) all
build on this module; it imports none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umbrella.io import atomic_write

AGE_RANGE = (20.0, 80.0)
WM_LEVEL = 1000.0  # output intensity of white matter (before gain/bias)
FOV_CENTRE_MM = (0.0, -17.0, 5.0)  # centre of the template brain-mask bounding box, MNI mm
VENTRICLE_CENTRE_MM = (0.0, -1.0, 15.0)  # centroid of template voxels < 30 % WM in the midbrain box
VENTRICLE_SIGMA_MM = 18.0
VENTRICLE_GAIN = 0.25  # radial pull at age 80 (0 at age 20)
GM_THINNING = 0.15  # fraction of the GM-CSF contrast lost at age 80 (0 at age 20)
SCALE_JITTER_SD = 0.01
ROTATION_DEG = 5.0
TRANSLATION_MM = 4.0
GAIN_RANGE = 0.10
BIAS_MAX = 0.10
NOISE_SD = 0.02  # times the (gained) white-matter level


@dataclass(frozen=True)
class _Template:
    t1: np.ndarray  # float32, white matter = 1
    gm: np.ndarray  # float32 GM probability, 0 outside the brain
    inv_affine: np.ndarray  # world mm -> template voxel
    csf_level: float  # CSF intensity on the same scale as t1
    wm: np.ndarray | None = None  # float32 WM probability, 0 outside the brain
    mask: np.ndarray | None = None  # bool brain mask

    @functools.cached_property
    def gm_level(self) -> float:
        """GM intensity on the same scale as t1 (median where P(GM) > 0.9), computed once."""
        return float(np.median(self.t1[self.gm > 0.9]))


@dataclass(frozen=True)
class _Job:
    index: int
    seed: int
    sex: str
    age: float
    image_size: tuple[int, int, int]
    voxel_mm: float
    sex_scale: float
    path: str  # absolute output path
    variant: str = "basic"  # "realistic": the fields below come from realistic.subject_latents
    scale: float = 0.0  # realistic: the subject's planted brain scale
    brain_age: float = 0.0  # realistic: the subject's planted brain age (years)
    csf_factor: float = 1.0  # realistic: the T1 scan's CSF level over the template's


_TEMPLATE: _Template | None = None


# ----------------------------------------------------------------------------- template

def _load_template() -> _Template:
    """Read the packaged MNI152 2 mm template and tissue maps (offline, no download)."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=2)
    t1 = t1_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=2).get_fdata(dtype=np.float32) > 0.5
    wm_level = float(np.median(t1[wm > 0.9]))
    csf = mask & (gm < 0.1) & (wm < 0.1)
    csf_level = float(np.median(t1[csf])) / wm_level
    t1 = np.where(mask, t1 / wm_level, 0.0).astype(np.float32)
    gm = np.where(mask, gm, 0.0).astype(np.float32)
    wm = np.where(mask, wm, 0.0).astype(np.float32)
    return _Template(t1, gm, np.linalg.inv(t1_img.affine), csf_level, wm, mask)


def _set_template(template: _Template) -> None:
    global _TEMPLATE
    _TEMPLATE = template


def _template() -> _Template:
    if _TEMPLATE is None:
        _set_template(_load_template())
    return _TEMPLATE


# ----------------------------------------------------------------------------- synthesis

def output_affine(image_size: Sequence[int], voxel_mm: float) -> np.ndarray:
    """RAS+ affine of the output grid: isotropic ``voxel_mm``, centred on ``FOV_CENTRE_MM``."""
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    half = (np.asarray(image_size, dtype=float) - 1) / 2
    affine[:3, 3] = np.asarray(FOV_CENTRE_MM) - voxel_mm * half
    return affine


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_nuisance(rng: np.random.Generator, sex: str, sex_scale: float) -> dict:
    """All per-subject random terms except noise, in a fixed draw order."""
    base = 1 + sex_scale if sex == "male" else 1 - sex_scale
    return {
        "scale": base * rng.normal(1.0, SCALE_JITTER_SD),
        "rotation": _rotation(np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))),
        "translation": rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3),
        "gain": rng.uniform(1 - GAIN_RANGE, 1 + GAIN_RANGE),
        "bias_coef": rng.normal(size=9),
        "bias_amp": rng.uniform(0.0, BIAS_MAX),
    }


def _source_coords(job: _Job, draw: dict, tpl: _Template, pull: float | None = None,
                   displace=None) -> np.ndarray:
    """Template voxel coordinates, shape (3, *image_size), sampled by every output voxel.

    Composes output grid -> inverse subject transform (``y = c + s R (p - c) + t``) ->
    [``displace``] -> ventricle radial warp -> template voxel, evaluated separably along the grid
    axes. ``pull`` (the warp's strength at its core) defaults to the basic cohort's law of
    ``job.age``. ``displace`` (optional): a function of template-space points (3, ...) in MNI
    mm returning the points they sample (the realistic cohort's individual anatomy,
    :class:`umbrella.demo.realistic.Anatomy`); None: none.
    """
    out, rot, scale = output_affine(job.image_size, job.voxel_mm), draw["rotation"], draw["scale"]
    centre, vc = np.asarray(FOV_CENTRE_MM), np.asarray(VENTRICLE_CENTRE_MM)
    lin = rot.T @ out[:3, :3] / scale  # output voxel -> template mm, relative to vc
    off = rot.T @ (out[:3, 3] - centre - draw["translation"]) / scale + centre - vc
    grid = np.ix_(*(np.arange(n, dtype=np.float64) for n in job.image_size))
    d = np.empty((3, *job.image_size))
    for a in range(3):
        d[a] = lin[a, 0] * grid[0] + lin[a, 1] * grid[1] + lin[a, 2] * grid[2] + off[a]
    if displace is not None:
        vc_col = vc[:, None, None, None]
        d = displace(d + vc_col) - vc_col
    if pull is None:
        pull = VENTRICLE_GAIN * _age_fraction(job.age)
    if pull > 0:
        r2 = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
        d *= 1 - pull * np.exp(r2 * (-0.5 / VENTRICLE_SIGMA_MM**2))
    inv = tpl.inv_affine
    return np.tensordot(inv[:3, :3], d, axes=1) + (inv[:3, :3] @ vc + inv[:3, 3])[:, None, None, None]


def _age_fraction(age: float) -> float:
    lo, hi = AGE_RANGE
    return float(np.clip((age - lo) / (hi - lo), 0.0, 1.0))


def _bias_field(shape: Sequence[int], coef: np.ndarray, amp: float) -> np.ndarray:
    """1 + amp * f, f a 2nd-order polynomial over [-1, 1]^3 normalised to max |f| = 1."""
    x, y, z = (np.linspace(-1, 1, n).reshape([-1 if a == i else 1 for a in range(3)])
               for i, n in enumerate(shape))
    terms = (x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z)
    field = sum(c * t for c, t in zip(coef, terms, strict=True))
    field = np.broadcast_to(field, tuple(shape))
    peak = float(np.abs(field).max())
    return 1 + amp * field / peak if peak > 0 else np.ones(shape)


def reorient(data: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]):
    """A RAS+ array (3D or 4D) and its affine -> the same image stored in ``axcodes`` order."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    return (np.ascontiguousarray(apply_orientation(data, ornt)),
            affine @ inv_ornt_aff(ornt, data.shape[:3]))


def _save_int16(data: np.ndarray, affine: np.ndarray, final: Path, tr: float | None = None,
                axcodes: Sequence[str] | None = None) -> None:
    """Write a 3D volume or a 4D run (``tr`` seconds per frame) as int16 NIfTI with scl_slope,
    atomically (temporary name in the same folder, then rename). ``data`` is on the RAS+ grid of
    ``affine``; ``axcodes`` (e.g. ("L", "A", "S")) stores it in that orientation (the same image,
    another voxel order; None: RAS+)."""
    import nibabel as nib

    if axcodes is not None:
        data, affine = reorient(data, affine, axcodes)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.int16)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if tr is None:
        img.header.set_xyzt_units("mm")
    else:
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms((*img.header.get_zooms()[:3], float(tr)))
    img.header["descrip"] = b"umbrella demo cohort"
    atomic_write(final, lambda tmp: nib.save(img, tmp), suffix=".tmp.nii.gz")
