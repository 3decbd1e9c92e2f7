"""rsfMRI and dMRI sessions of the demo cohort: the T1 subjects' anatomy seen by two more scans.

Every extra session reuses the subject's T1 *anatomy*: the sex-dependent global brain scale (the
first draw of ``SeedSequence([seed, index])``, exactly as the T1 draws it, so males are
``1 + sex_scale`` and females ``1 - sex_scale`` times N(1, 0.01)) and the age-dependent ventricle
warp. The head position is new per session (rotation uniform +-5 deg per axis, translation uniform
+-4 mm), drawn from ``SeedSequence([seed, index, stream])`` with stream 1 for rsfMRI and 2 for
dMRI, so every file depends only on (seed, subject) and the settings, never on worker count.
Both are written on a coarser grid than the T1 (default 48^3 at 4.2 mm: the T1's 201.6 mm field
of view) as int16 NIfTI with scl_slope, RAS+ affine.

**rsfMRI** (4D, default 24 frames, TR 2 s). A mean EPI-like image (grey matter 1.0, white matter
0.75, CSF 1.3 times ``BOLD_LEVEL``, from the MNI152 GM/WM templates and brain mask) modulated by
four networks. Each network's spatial map is a sum of Gaussian blobs (sigma ``BLOB_SIGMA_MM``) at
the MNI centres of :data:`NETWORKS`, clipped to 1 and multiplied by the GM probability; each has its
own low-frequency time series (white noise smoothed in time with a Gaussian of sigma
``SIGNAL_SMOOTH_S`` seconds, i.e. half power near 0.066 Hz, then orthonormalised across networks so
that sample correlations are exact). A frame is ``base * (1 + BOLD_AMPLITUDE * sum_n map_n *
signal_n) + noise`` (noise sd ``BOLD_NOISE`` of the level, magnitude image), brain-extracted
(0 outside the warped brain mask, as preprocessed runs are; this also keeps files ~1 MB).

* **sex -> DMN-FPN connectivity.** In females the default-mode (DMN) and fronto-parietal (FPN)
  signals share a latent series: ``s = sqrt(rho) * shared + sqrt(1 - rho) * own`` with
  ``rho = COUPLING["female"] = 0.7``, so their correlation is exactly 0.7; in males ``rho = 0`` and
  they are exactly uncorrelated. Every other pair of networks is exactly uncorrelated in both sexes.
  Measured on the voxel data (mean signal over each network's voxels) the correlation reads about
  0.7 in females and about 0 in males; the sex -> brain-scale effect is present as in the T1.

**dMRI** (3D FA-like map). ``FA = 0.70 * p_wm + 0.15 * p_gm + 0.05 * p_csf`` inside the brain mask,
plus Gaussian noise (sd ``FA_NOISE``), clipped to [0, 1], exactly 0 outside the brain. The planted
sex effect is the same brain scale. Besides these maps, dipy's packaged real DWI series
``small_64D`` (10x10x10, 64 directions + b0, bval/bvec) is copied once to
``dwi/real_dwi.nii.gz`` (+ ``.bval``/``.bvec``) to exercise the tensor-fit path; it is a real
scan of an unknown subject and never gets a sex label.

Some rsfMRI runs (``FmriSettings.frame_folders``, the last subjects) are written as SwiFT-style
frame folders instead: ``frame_<t>.pt`` (a float16 (X, Y, Z) tensor each, RAS+ order) plus
``global_stats.pt`` ({"global_mean", "global_std"} over brain voxels).
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from umbrella.demo import anatomy as _anatomy
from umbrella.io import atomic_write

MODALITIES = ("T1", "rsfMRI", "dMRI")
RSFMRI_STREAM, DMRI_STREAM = 1, 2
BOLD_LEVEL = 1000.0  # EPI intensity of grey matter (before gain)
EPI_TISSUE = {"gm": 1.0, "wm": 0.75, "csf": 1.3}  # EPI-like mean intensity per tissue
BOLD_AMPLITUDE = 0.02  # signal sd as a fraction of the mean, where a network map is 1
BOLD_NOISE = 0.01  # thermal noise sd, fraction of BOLD_LEVEL (tSNR ~ 100 in grey matter)
BOLD_GAIN = 0.10  # per-session gain uniform in [1 - g, 1 + g]
SIGNAL_SMOOTH_S = 2.0  # sigma of the temporal Gaussian (s): half power near 0.066 Hz
BLOB_SIGMA_MM = 8.0
NETWORKS = {  # MNI mm centres of each network's nodes
    "DMN": ((0, -54, 28), (0, 50, -4), (-46, -66, 30), (46, -66, 30)),
    "FPN": ((-44, 36, 20), (44, 36, 20), (-40, -46, 50), (40, -46, 50)),
    "SMN": ((-38, -22, 56), (38, -22, 56)),
    "VIS": ((-12, -88, 2), (12, -88, 2)),
}
COUPLED = ("DMN", "FPN")  # the pair whose connectivity depends on sex
COUPLING = {"female": 0.7, "male": 0.0}  # shared-latent fraction rho = their exact correlation
FA_TISSUE = {"wm": 0.70, "gm": 0.15, "csf": 0.05}
FA_NOISE = 0.03
REAL_DWI = {"name": "small_64D", "path": "dwi/real_dwi.nii.gz", "bval": "dwi/real_dwi.bval",
            "bvec": "dwi/real_dwi.bvec"}


# ----------------------------------------------------------------------------- settings

def _size_problem(name: str, value) -> str | None:
    ok = isinstance(value, tuple | list) and len(value) == 3 and all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 8 for n in value)
    return None if ok else f"{name} must be three integers >= 8, got {value!r}"


def _positive_problem(name: str, value) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0
    return None if ok else f"{name} must be a positive number, got {value!r}"


@dataclass(frozen=True)
class FmriSettings:
    """Grid and timing of the demo rsfMRI runs (same field of view as the 96^3 x 2.1 mm T1)."""

    image_size: tuple[int, int, int] = (48, 48, 48)
    voxel_mm: float = 4.2
    n_frames: int = 24
    tr: float = 2.0  # seconds
    frame_folders: int = 2  # the last N subjects get a frame folder instead of a 4D NIfTI

    def problems(self) -> list[str]:
        out = [_size_problem("rsfmri.image_size", self.image_size),
               _positive_problem("rsfmri.voxel_mm", self.voxel_mm),
               _positive_problem("rsfmri.tr", self.tr)]
        if not (isinstance(self.n_frames, int) and not isinstance(self.n_frames, bool)
                and self.n_frames >= 2 * (len(NETWORKS) + 1)):
            out.append(f"rsfmri.n_frames must be an integer >= {2 * (len(NETWORKS) + 1)}, "
                       f"got {self.n_frames!r}")
        if not (isinstance(self.frame_folders, int) and not isinstance(self.frame_folders, bool)
                and self.frame_folders >= 0):
            out.append(f"rsfmri.frame_folders must be an integer >= 0, got {self.frame_folders!r}")
        return [p for p in out if p]

    def to_dict(self) -> dict:
        d = asdict(self)
        return d | {"image_size": [int(n) for n in self.image_size],
                    "voxel_mm": float(self.voxel_mm), "tr": float(self.tr)}


@dataclass(frozen=True)
class DmriSettings:
    """Grid of the demo FA maps; ``real_dwi`` copies dipy's small real DWI series once."""

    image_size: tuple[int, int, int] = (48, 48, 48)
    voxel_mm: float = 4.2
    real_dwi: bool = True

    def problems(self) -> list[str]:
        out = [_size_problem("dmri.image_size", self.image_size),
               _positive_problem("dmri.voxel_mm", self.voxel_mm)]
        if not isinstance(self.real_dwi, bool):
            out.append(f"dmri.real_dwi must be true or false, got {self.real_dwi!r}")
        return [p for p in out if p]

    def to_dict(self) -> dict:
        return asdict(self) | {"image_size": [int(n) for n in self.image_size],
                               "voxel_mm": float(self.voxel_mm)}


def session_path(subject_id: str, index: int, n_subjects: int, modality: str,
                  fmri: FmriSettings) -> str:
    """Path of one subject's session, relative to the cohort root."""
    if modality == "dMRI":
        return f"dwi/{subject_id}_FA.nii.gz"
    folder = index >= n_subjects - fmri.frame_folders
    return f"rsfmri/{subject_id}_bold" + ("" if folder else ".nii.gz")


def planted_effects() -> dict:
    """The rsfMRI and dMRI effects (words and numbers) for the manifest and reports."""
    return {
        "rsfMRI": {
            "sex_brain_scale": "as T1 (same per-subject scale draw)",
            "sex_connectivity": {"networks": list(COUPLED),
                                 "correlation_female": COUPLING["female"],
                                 "correlation_male": COUPLING["male"],
                                 "law": "s = sqrt(rho) shared + sqrt(1-rho) own, orthonormal "
                                        "series: sample correlation exactly rho"},
            "networks_mni_mm": {k: [list(c) for c in v] for k, v in NETWORKS.items()},
            "blob_sigma_mm": BLOB_SIGMA_MM, "signal_smoothing_sigma_s": SIGNAL_SMOOTH_S,
            "bold_amplitude": BOLD_AMPLITUDE, "noise_sd_fraction": BOLD_NOISE,
            "epi_tissue_levels": EPI_TISSUE, "gain": [1 - BOLD_GAIN, 1 + BOLD_GAIN]},
        "dMRI": {"sex_brain_scale": "as T1 (same per-subject scale draw)",
                 "fa_tissue_levels": FA_TISSUE, "noise_sd": FA_NOISE,
                 "real_dwi": f"dipy {REAL_DWI['name']} copied to {REAL_DWI['path']} "
                             "(unknown subject, no sex label)"},
    }


# ----------------------------------------------------------------------------- template maps

@dataclass(frozen=True)
class _Maps:
    epi: np.ndarray  # EPI-like mean intensity (GM = 1), 0 outside the brain
    fa: np.ndarray  # FA-like values, 0 outside the brain
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray  # float32 0/1
    networks: np.ndarray  # (n_networks, *template shape), in [0, 1]


_MAPS: tuple[int, _Maps] | None = None  # (id of the template it was built from, maps)


def _blob_sum(centres, affine: np.ndarray, shape) -> np.ndarray:
    """Sum of isotropic Gaussians at ``centres`` (mm) on a template grid with a diagonal affine."""
    axes = [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(shape)]
    out = np.zeros(shape, dtype=np.float32)
    for centre in centres:
        g = [np.exp(-0.5 * ((ax - c) / BLOB_SIGMA_MM) ** 2) for ax, c in zip(axes, centre,
                                                                           strict=True)]
        out += (g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]).astype(np.float32)
    return out


def _build_maps(tpl) -> _Maps:
    if tpl.wm is None or tpl.mask is None:
        raise RuntimeError("the demo template lacks WM/mask maps; reload it with _load_template")
    affine = np.linalg.inv(tpl.inv_affine)
    if np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 1e-6:
        raise RuntimeError("the MNI template affine is not axis-aligned")
    mask = tpl.mask.astype(np.float32)
    gm, wm = tpl.gm * mask, tpl.wm * mask
    csf = np.clip(1 - gm - wm, 0, 1) * mask
    epi = sum(EPI_TISSUE[k] * p for k, p in (("gm", gm), ("wm", wm), ("csf", csf)))
    fa = sum(FA_TISSUE[k] * p for k, p in (("gm", gm), ("wm", wm), ("csf", csf)))
    nets = np.stack([np.minimum(_blob_sum(c, affine, gm.shape), 1.0) * gm
                     for c in NETWORKS.values()])
    return _Maps(epi.astype(np.float32), fa.astype(np.float32), gm, wm, mask,
                 nets.astype(np.float32))


def template_maps() -> _Maps:
    """Maps derived from the loaded template, built once per process (cheap: ~0.3 s)."""
    global _MAPS
    tpl = _anatomy._template()
    if _MAPS is None or _MAPS[0] != id(tpl):
        _MAPS = (id(tpl), _build_maps(tpl))
    return _MAPS[1]


# ----------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class SessionJob:
    """One subject's rsfMRI run or dMRI map; ``path`` absolute."""

    modality: str  # "rsfMRI" | "dMRI"
    index: int
    seed: int
    sex: str
    age: float
    sex_scale: float
    image_size: tuple[int, int, int]
    voxel_mm: float
    path: str
    n_frames: int = 0
    tr: float = 0.0
    frame_folder: bool = False
    variant: str = "basic"  # "realistic": the fields below come from realistic.subject_latents
    scale: float = 0.0  # realistic: this session's brain scale (rsfMRI: sex-independent)
    brain_age: float = 0.0  # realistic: the subject's brain age (ventricle warp)
    coupling: float = 0.0  # realistic rsfMRI: Fisher z of the DMN-FPN correlation


def _session(job: SessionJob) -> tuple[np.ndarray, np.random.Generator]:
    """Template voxel coordinates (3, *image_size) of the session grid, and the session's rng
    positioned after the head-position draws. Realistic sessions take their scale and brain age
    from the job, draw the position with :func:`umbrella.demo.realistic.draw_position` and
    deform the template by the subject's individual anatomy (the same as its T1's)."""
    stream = RSFMRI_STREAM if job.modality == "rsfMRI" else DMRI_STREAM
    grid = _anatomy._Job(job.index, job.seed, job.sex, job.age, tuple(job.image_size),
                        job.voxel_mm, job.sex_scale, job.path)
    if job.variant == "realistic":
        from umbrella.demo.realistic import draw_position, individual_anatomy, ventricle_pull

        rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index, stream]))
        draw = draw_position(rng) | {"scale": job.scale}
        anatomy = individual_anatomy(job.seed, job.index)  # the subject's, as in its T1
        return _anatomy._source_coords(grid, draw, _anatomy._template(),
                                      pull=ventricle_pull(job.brain_age),
                                      displace=anatomy.displace_grid), rng
    t1_rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    scale = _anatomy._draw_nuisance(t1_rng, job.sex, job.sex_scale)["scale"]  # the T1's anatomy
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index, stream]))
    angles = np.deg2rad(rng.uniform(-_anatomy.ROTATION_DEG, _anatomy.ROTATION_DEG, 3))
    draw = {"scale": scale, "rotation": _anatomy._rotation(angles),
            "translation": rng.uniform(-_anatomy.TRANSLATION_MM, _anatomy.TRANSLATION_MM, 3)}
    return _anatomy._source_coords(grid, draw, _anatomy._template()), rng


def _warp(source: np.ndarray, coords: np.ndarray) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    return map_coordinates(source, coords, order=1, mode="constant", cval=0.0,
                           prefilter=False).astype(np.float32)


def session_maps(job: SessionJob) -> dict[str, np.ndarray]:
    """The template maps seen on this session's grid: gm, wm, mask and networks (n, X, Y, Z).

    For checks and figures: the planted effects can be measured against these.
    """
    coords, _ = _session(job)
    maps = template_maps()
    return {"gm": _warp(maps.gm, coords), "wm": _warp(maps.wm, coords),
            "mask": _warp(maps.mask, coords),
            "networks": np.stack([_warp(m, coords) for m in maps.networks])}


# ----------------------------------------------------------------------------- synthesis

def network_signals(rng: np.random.Generator, sex: str, n_frames: int, tr: float,
                    correlation: float | None = None) -> np.ndarray:
    """(n_networks, n_frames) zero-mean unit-sd series; pairwise correlations are exactly 0 except
    the :data:`COUPLED` pair, exactly ``COUPLING[sex]`` (or ``correlation``, in (-1, 1), when
    given: the realistic cohort's per-subject value; a negative one flips the shared latent's sign
    in the second network)."""
    from scipy.ndimage import gaussian_filter1d

    names = list(NETWORKS)
    white = rng.standard_normal((len(names) + 1, n_frames))  # last row: the shared latent
    smooth = gaussian_filter1d(white, SIGNAL_SMOOTH_S / tr, axis=1, mode="reflect")
    smooth -= smooth.mean(axis=1, keepdims=True)
    q, r = np.linalg.qr(smooth.T)
    z = (q * np.sign(np.diag(r))).T * math.sqrt(n_frames)  # orthonormal rows -> unit sd
    shared, out = z[-1], z[:-1].copy()
    rho = COUPLING[sex] if correlation is None else float(correlation)
    if not -1 < rho < 1:
        raise ValueError(f"network correlation must lie in (-1, 1), got {rho}")
    for k, name in enumerate(COUPLED):
        i = names.index(name)
        sign = -1.0 if k == 1 and rho < 0 else 1.0
        out[i] = sign * math.sqrt(abs(rho)) * shared + math.sqrt(1 - abs(rho)) * z[i]
    return out


def synthesize_rsfmri(job: SessionJob) -> np.ndarray:
    """Float32 run (X, Y, Z, T) for one subject (deterministic from ``[seed, index, 1]``)."""
    coords, rng = _session(job)
    maps = template_maps()
    inside = _warp(maps.mask, coords) > 0.5  # brain-extracted, as preprocessed runs are
    base = _warp(maps.epi, coords)[inside]
    nets = np.stack([_warp(m, coords)[inside] for m in maps.networks])  # (n, n_brain)
    gain = rng.uniform(1 - BOLD_GAIN, 1 + BOLD_GAIN)
    correlation = math.tanh(job.coupling) if job.variant == "realistic" else None
    signals = network_signals(rng, job.sex, job.n_frames, job.tr,
                              correlation).astype(np.float32)
    brain = base * (1 + BOLD_AMPLITUDE * (signals.T @ nets)) * np.float32(BOLD_LEVEL * gain)
    brain += rng.standard_normal(brain.shape, dtype=np.float32) * np.float32(
        BOLD_NOISE * BOLD_LEVEL * gain)  # (T, n_brain)
    run = np.zeros((*inside.shape, job.n_frames), dtype=np.float32)
    run[inside] = np.abs(brain).T
    return run


def synthesize_fa(job: SessionJob) -> np.ndarray:
    """Float32 FA-like map (X, Y, Z) in [0, 1], 0 outside the brain (``[seed, index, 2]``)."""
    coords, rng = _session(job)
    maps = template_maps()
    fa = _warp(maps.fa, coords)
    inside = _warp(maps.mask, coords) > 0.5
    fa += rng.standard_normal(fa.shape, dtype=np.float32) * np.float32(FA_NOISE)
    return np.where(inside, np.clip(fa, 0.0, 1.0), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- writing

def _axcodes(job: SessionJob):
    """The stored orientation of a session's image: the realistic cohort's, else RAS+ (None)."""
    if job.variant != "realistic":
        return None
    from umbrella.demo.realistic import ORIENTATION

    return ORIENTATION


def write_session(job: SessionJob) -> str:
    """Synthesize and write one session atomically; returns its path."""
    affine = _anatomy.output_affine(job.image_size, job.voxel_mm)
    if job.modality == "dMRI":
        _anatomy._save_int16(synthesize_fa(job), affine, Path(job.path), axcodes=_axcodes(job))
    elif job.frame_folder:
        _save_frames(synthesize_rsfmri(job), Path(job.path))
    else:
        _anatomy._save_int16(synthesize_rsfmri(job), affine, Path(job.path), tr=job.tr,
                             axcodes=_axcodes(job))
    return job.path


def _save_frames(run: np.ndarray, final: Path) -> None:
    """SwiFT-style folder: frame_<t>.pt (float16 (X, Y, Z)) + global_stats.pt, renamed in place."""
    import torch

    from umbrella.data.volumes import brain_mask

    brain = run[brain_mask(run.mean(axis=3))]
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for t in range(run.shape[3]):
            frame = torch.from_numpy(np.ascontiguousarray(run[..., t])).to(torch.float16)
            torch.save(frame, tmp / f"frame_{t}.pt")
        torch.save({"global_mean": float(brain.mean()), "global_std": float(brain.std())},
                   tmp / "global_stats.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_file(source: Path, packed: bool, tmp: Path) -> None:
    """Copy ``source`` to ``tmp``, gzipped with mtime 0 when ``packed`` (the same bytes every time)."""
    with source.open("rb") as src, tmp.open("wb") as raw:
        if packed:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfileobj(src, raw)


def copy_real_dwi(root: Path) -> dict[str, str]:
    """dipy's packaged ``small_64D`` DWI (+ bval/bvec) -> ``dwi/real_dwi.*`` (gzip, atomic).

    Returns the relative paths. Real data of an unknown subject: never labelled.
    """
    from dipy.data import get_fnames

    nii, bval, bvec = (Path(p) for p in get_fnames(name=REAL_DWI["name"]))
    (root / "dwi").mkdir(parents=True, exist_ok=True)
    for source, rel, packed in ((nii, REAL_DWI["path"], True), (bval, REAL_DWI["bval"], False),
                                (bvec, REAL_DWI["bvec"], False)):
        atomic_write(root / rel, partial(_copy_file, source, packed))
    return {k: REAL_DWI[k] for k in ("path", "bval", "bvec")} | {
        "source": f"dipy.data.get_fnames(name={REAL_DWI['name']!r})"}
