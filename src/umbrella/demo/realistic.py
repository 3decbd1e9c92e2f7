"""The ``realistic`` demo cohort: planted effects that overlap as real ones do, with their truth.

The ``basic`` cohort (:mod:`umbrella.demo.cohort`) plants effects a tiny model cannot miss (the
sexes' brain scales do not overlap). This variant plants them as a researcher meets them, so that
a model's score can be read against the best score the planted variables allow. Every subject has
three hidden variables, drawn from ``SeedSequence([seed, index, LATENT_STREAM])`` in a fixed
order that does not depend on sex (sex only shifts their means):

* **sex -> global brain scale (T1, dMRI).** ``scale = 1 + d + s*z`` for males and ``1 - d + s*z``
  for females, ``z`` standard normal truncated at +-4 (the field of view is bounded), with
  ``d = SEX_SCALE_SHIFT = 0.018`` and ``s = SEX_SCALE_SD = 0.0147``: a male/female brain-volume
  ratio of ``((1+d)/(1-d))**3 = 1.114`` (real intracranial volumes differ by ~10-12 %). The
  Bayes-optimal rule from the scale alone (male iff scale > 1) is right with probability
  ``(Phi(d/s) - Phi(-4)) / (1 - 2 Phi(-4)) = 0.8895``.
* **age -> brain age -> ventricles and cortex (T1; ventricles also in rsfMRI and dMRI).** Age is
  a whole number of years, uniform on ``AGE_RANGE = 40..85``. The brain ages as ``b = age +
  N(0, BRAIN_AGE_SD = 4 y)``; with ``f = clip((b - 20) / 65, 0, 1.4)`` (0 at 20 y, 1 at 85 y):
  the lateral ventricles grow by the radial pull ``VENTRICLE_GAIN * f**2`` (accelerating: 0.04
  at 40 y, 0.30 at 85 y, up to ~1.4x in radius at the core), the cortex thins (``GM_THINNING * f``
  of the GM-CSF contrast lost in grey matter) and the sulci widen (``SULCAL_WIDENING * f`` more
  of it lost where grey matter borders CSF in the outer ``SULCAL_DEPTH_MM`` of the brain). The
  best achievable mean absolute error from ``b`` is that of the posterior median of the age
  given ``b`` under the uniform prior (:func:`achievable_age_mae`, about ``0.798 * 4`` y away from
  the range ends, less near them).
* **sex -> DMN-FPN connectivity (rsfMRI only).** The Fisher-z coupling ``c = +mu + s_c*z`` for
  males, ``-mu + s_c*z`` for females (``mu = 0.30, s_c = 0.25``), sets the exact sample
  correlation ``tanh(c)`` of the two networks' series (see :func:`umbrella.demo.modalities.
  network_signals`). Bayes accuracy from ``c``: ``Phi(mu / s_c) = 0.885``. The rsfMRI run's
  anatomy does NOT depend on sex: its brain scale is ``1 + sqrt(d^2 + s^2) * z'`` (one
  sex-independent distribution with the population's spread), so only connectivity tells sex.

Individual anatomy (all modalities, no planted variable): every subject's brain is the aged
template deformed by a smooth random map of its own, drawn from ``SeedSequence([seed, index,
ANATOMY_STREAM = 4])`` (the hidden variables, ages and nuisance streams are untouched), so that
voxels at a fixed place do not hold the same tissue in every subject, as in real brains. The map
is the flow over unit time of a divergence-free velocity ``v = curl A`` (``A``: three fields of
white noise on a coarse ``ANATOMY_GRID_MM`` grid in template space, each smoothed by a Gaussian of
sigma ``ANATOMY_SMOOTH_MM``), scaled to an rms of ``ANATOMY_RMS_MM`` over the brain and then
down, where needed, until no point near the brain's surface moves more than ``ANATOMY_MAX_MM``.
The flow of a divergence-free field preserves volume (Jacobian determinant 1 up to the
discretisation, see :func:`individual_anatomy`), so the ventricles' volume and the amount of grey
matter, which carry the planted age effects, do not change and the achievable figures stay those
of the planted variables. It acts before the ventricle warp: ventricles enlarge on the template,
then the whole brain is deformed. This stops a voxel-wise linear model from reading the
ventricles at a fixed place, but not the cortical effects: they darken every cortical voxel, and a
volume-preserving deformation keeps such sums (benchmarks/README.md section 11, "Individual
anatomy": the classical reference's age MAE hardly moves).

Nuisance, as in native-space scans: rotation uniform +-8 deg per axis, translation uniform
+-8 mm, gain uniform x[0.85, 1.15], a smooth 2nd-order polynomial bias field with peak deviation
uniform in [0, 20 %], Gaussian noise of sd 3 % of the white-matter level (magnitude image).
Optionally (``build_demo_cohort(..., csf_contrast=c)``, ``umbrella demo --csf-contrast c``; off
by default) T1 scans also differ in their contrast, as scans from different scanners and
sequences do (CSF has by far the longest T1, so its level in a T1-weighted image moves most
with the sequence): the CSF level is the template's times ``U[1 - c, 1 + c]``, drawn from
``SeedSequence([seed, index, CONTRAST_STREAM = 5])``, applied to the aged template by a
piecewise-linear contrast curve (0 -> 0, CSF -> the scan's CSF level, GM -> GM, unchanged
above; :func:`with_csf_contrast`). A voxel between CSF and GM keeps its mixing fraction, so the
planted cortical effects stay readable once the scan's CSF level is read (from the ventricles'
CSF); the images depend on age only through the brain age, so the achievable figures remain
the limits. But the brain's intensity histogram now moves with the contrast as well as with age,
and a linear read of it loses the brain age (benchmarks/README.md section 11, "Scanner
contrast").

T1 images are 112 x 128 x 112 voxels at 2 mm (224 x 256 x 224 mm: the largest brain under the
largest rotation and translation and the individual anatomy's largest move stays inside, checked
by :func:`fov_slack_mm` when a cohort is built), rsfMRI runs and dMRI maps 56 x 64 x 56 at 4 mm
over the same field of view; all are stored in LAS orientation (x flipped: radiological, as FSL
writes) as int16 NIfTI with scl_slope. Frame-folder rsfMRI runs stay RAS (their format has no
affine).

The cohort root gets ``truth.json`` (the achievable score per task and modality, and every
planted parameter) and ``planted.csv`` (each subject's hidden variables; with scanner contrast, each
T1 scan's CSF factor too).
"""

from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import asdict, dataclass

import numpy as np

from umbrella.demo import anatomy as _anatomy

VARIANTS = ("basic", "realistic")
LATENT_STREAM = 3  # SeedSequence([seed, index, 3]): the hidden variables (1, 2: rsfMRI, dMRI)
TRUTH = "truth.json"
PLANTED = "planted.csv"

SEX_SCALE_SHIFT = 0.018  # d: male scale 1 + d, female 1 - d
SEX_SCALE_SD = 0.0147  # s: within-sex sd of the scale (d/s = 1.224)
TRUNCATE_SD = 4.0  # scale latents are truncated at +-4 sd (a bounded field of view)
RSFMRI_SCALE_SD = math.hypot(SEX_SCALE_SHIFT, SEX_SCALE_SD)  # sex-independent rsfMRI anatomy
AGE_RANGE = (40, 85)  # whole years, uniform, both ends included
BRAIN_AGE_SD = 4.0  # b = age + N(0, sd)
AGE_ORIGIN, AGE_SPAN, AGE_FRACTION_MAX = 20.0, 65.0, 1.4  # f = clip((b - 20) / 65, 0, 1.4)
VENTRICLE_GAIN = 0.30  # radial pull = gain * f**2
GM_THINNING = 0.20  # fraction of the GM-CSF contrast lost = k * f * p_gm
SULCAL_WIDENING = 0.35  # more of it lost = k * f * sulcal map
SULCAL_DEPTH_MM = 12.0  # the sulcal map lives within this distance of the brain's surface
SULCAL_SMOOTH_MM = 2.0  # sigma of the CSF neighbourhood that defines "borders CSF"
COUPLING_MEAN = 0.30  # Fisher z of the DMN-FPN correlation: male +mu, female -mu
COUPLING_SD = 0.25
ROTATION_DEG = 8.0
TRANSLATION_MM = 8.0
GAIN_RANGE = 0.15
BIAS_MAX = 0.20
NOISE_SD = 0.03  # times the (gained) white-matter level
IMAGE_SIZE = (112, 128, 112)  # T1 grid at VOXEL_MM
VOXEL_MM = 2.0
SESSION_IMAGE_SIZE = (56, 64, 56)  # rsfMRI / dMRI grid at SESSION_VOXEL_MM
SESSION_VOXEL_MM = 4.0
ORIENTATION = ("L", "A", "S")  # axis codes of the stored images
ANATOMY_STREAM = 4  # SeedSequence([seed, index, 4]): the subject's individual anatomy
ANATOMY_RMS_MM = 3.5  # rms over the brain of the velocity whose flow is the deformation
ANATOMY_SMOOTH_MM = 10.0  # Gaussian sigma smoothing the white-noise vector potential
ANATOMY_GRID_MM = 6.0  # spacing of the coarse grid the field lives on (then trilinear)
ANATOMY_MARGIN_MM = 16.0  # the coarse grid covers the template's array plus this on every side
ANATOMY_STEPS = 5  # scaling and squaring: the flow as 2**5 composed small steps
ANATOMY_MAX_MM = 8.0  # no surface point moves farther (the velocity is scaled down if one would)
CONTRAST_STREAM = 5  # SeedSequence([seed, index, 5]): the T1 scan's CSF contrast
MAX_CSF_CONTRAST = 0.5  # csf_contrast must lie in [0, this): the CSF level stays below GM's


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


# ----------------------------------------------------------------------------- latent variables

@dataclass(frozen=True)
class Latents:
    """One subject's hidden variables (the planted causes of what the images show)."""

    scale: float  # T1 / dMRI global brain scale (depends on sex)
    brain_age: float  # years; drives ventricles, cortical thinning, sulcal widening
    rsfmri_scale: float  # rsfMRI run's brain scale (does NOT depend on sex)
    coupling: float  # Fisher z of the DMN-FPN correlation in the rsfMRI run (depends on sex)


def _truncated_normal(rng: np.random.Generator) -> float:
    """N(0, 1) truncated to +-TRUNCATE_SD, by inverse CDF: exactly one draw."""
    from scipy.special import ndtr, ndtri

    lo = ndtr(-TRUNCATE_SD)
    return float(ndtri(lo + rng.uniform() * (1 - 2 * lo)))


def subject_latents(seed: int, index: int, sex: str, age: float) -> Latents:
    """The hidden variables of subject ``index``; the random draws do not depend on ``sex``."""
    if sex not in ("male", "female"):
        raise ValueError(f"sex must be 'male' or 'female', got {sex!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, LATENT_STREAM]))
    z_scale, e_age = _truncated_normal(rng), float(rng.standard_normal())
    z_rsfmri, z_coupling = _truncated_normal(rng), float(rng.standard_normal())
    sign = 1.0 if sex == "male" else -1.0
    return Latents(scale=1 + sign * SEX_SCALE_SHIFT + SEX_SCALE_SD * z_scale,
                   brain_age=float(age) + BRAIN_AGE_SD * e_age,
                   rsfmri_scale=1 + RSFMRI_SCALE_SD * z_rsfmri,
                   coupling=sign * COUPLING_MEAN + COUPLING_SD * z_coupling)


def draw_ages(n_subjects: int, seed: int) -> np.ndarray:
    """Whole years, uniform on AGE_RANGE (both ends included)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xC1,)))
    return rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1, n_subjects)


def age_fraction(brain_age: float) -> float:
    return float(np.clip((brain_age - AGE_ORIGIN) / AGE_SPAN, 0.0, AGE_FRACTION_MAX))


def ventricle_pull(brain_age: float) -> float:
    """Radial pull towards the ventricle centre at its core (accelerating with brain age)."""
    return VENTRICLE_GAIN * age_fraction(brain_age) ** 2


# ----------------------------------------------------------------------------- what is achievable

def achievable_sex_accuracy_scale() -> float:
    """Bayes accuracy of sex from the brain scale (equal priors, threshold at 1), exact: the
    truncation is symmetric about each mean and wider than the gap, so the rule stays 'scale > 1'."""
    tail = _phi(-TRUNCATE_SD)
    return (_phi(SEX_SCALE_SHIFT / SEX_SCALE_SD) - tail) / (1 - 2 * tail)


def achievable_sex_accuracy_coupling() -> float:
    """Bayes accuracy of sex from the rsfMRI coupling (equal priors, threshold at 0)."""
    return _phi(COUPLING_MEAN / COUPLING_SD)


def achievable_age_mae(age_range=AGE_RANGE, sd: float = BRAIN_AGE_SD, step: float = 0.005) -> float:
    """Mean absolute error of the Bayes estimator of age from the brain age ``b``.

    Ages are whole years uniform on ``age_range``; ``b = age + N(0, sd)``. For absolute error the
    Bayes estimator is the posterior median of age given ``b``; its expected error is integrated
    over ``b`` on a grid of ``step`` years (exact up to that quadrature).
    """
    ages = np.arange(age_range[0], age_range[1] + 1, dtype=np.float64)
    b = np.arange(ages[0] - 8 * sd, ages[-1] + 8 * sd + step, step)
    lik = np.exp(-0.5 * ((b[:, None] - ages[None, :]) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    p_b = lik.mean(axis=1)  # density of b (uniform prior over the ages)
    post = lik / lik.sum(axis=1, keepdims=True)
    median = ages[np.argmax(np.cumsum(post, axis=1) >= 0.5, axis=1)]
    loss = (post * np.abs(ages[None, :] - median[:, None])).sum(axis=1)
    return float((p_b * loss).sum() * step)


def bayes_age(brain_age: np.ndarray, age_range=AGE_RANGE, sd: float = BRAIN_AGE_SD) -> np.ndarray:
    """The posterior median of age given brain age (the estimator behind achievable_age_mae)."""
    ages = np.arange(age_range[0], age_range[1] + 1, dtype=np.float64)
    b = np.atleast_1d(np.asarray(brain_age, dtype=np.float64))
    lik = np.exp(-0.5 * ((b[:, None] - ages[None, :]) / sd) ** 2)
    post = lik / lik.sum(axis=1, keepdims=True)
    return ages[np.argmax(np.cumsum(post, axis=1) >= 0.5, axis=1)]


def planted_parameters(csf_contrast: float = 0.0) -> dict:
    """Every parameter of the planted model (truth.json "planted", manifest "planted");
    ``csf_contrast`` > 0 adds the T1 scans' CSF contrast to the nuisance."""
    planted = {
        "sex": {"T1_dMRI_brain_scale": {
                    "male": f"1 + {SEX_SCALE_SHIFT} + {SEX_SCALE_SD} * z",
                    "female": f"1 - {SEX_SCALE_SHIFT} + {SEX_SCALE_SD} * z",
                    "shift": SEX_SCALE_SHIFT, "sd": SEX_SCALE_SD,
                    "z": f"N(0, 1) truncated at +-{TRUNCATE_SD}",
                    "volume_ratio_male_over_female":
                        round(((1 + SEX_SCALE_SHIFT) / (1 - SEX_SCALE_SHIFT)) ** 3, 4)},
                "rsfMRI_connectivity": {
                    "networks": ["DMN", "FPN"], "fisher_z_male": f"+{COUPLING_MEAN} + "
                    f"{COUPLING_SD} * N(0, 1)", "fisher_z_female": f"-{COUPLING_MEAN} + "
                    f"{COUPLING_SD} * N(0, 1)", "mean": COUPLING_MEAN, "sd": COUPLING_SD,
                    "law": "exact sample correlation of the two networks' series = tanh(z)"},
                "rsfMRI_brain_scale": {"law": f"1 + {RSFMRI_SCALE_SD:.5f} * z, z N(0, 1) "
                                              f"truncated at +-{TRUNCATE_SD}, same for both sexes",
                                       "sd": RSFMRI_SCALE_SD},
                "balance": "exactly n/2 of each sex (one extra drawn when n is odd)"},
        "age": {"range_years": list(AGE_RANGE), "distribution": "whole years, uniform",
                "brain_age": f"age + N(0, {BRAIN_AGE_SD})", "brain_age_sd": BRAIN_AGE_SD,
                "age_fraction": f"f = clip((b - {AGE_ORIGIN}) / {AGE_SPAN}, 0, {AGE_FRACTION_MAX})",
                "ventricle_enlargement": {
                    "law": f"pull = {VENTRICLE_GAIN} * f^2 * exp(-r^2 / 2 sigma^2)",
                    "gain": VENTRICLE_GAIN, "centre_mni_mm": list(_anatomy.VENTRICLE_CENTRE_MM),
                    "sigma_mm": _anatomy.VENTRICLE_SIGMA_MM, "modalities": ["T1", "rsfMRI", "dMRI"]},
                "grey_matter_thinning": {"law": f"t1 -= {GM_THINNING} * f * p_gm * (t1 - csf)",
                                         "gain": GM_THINNING, "modalities": ["T1"]},
                "sulcal_widening": {"law": f"t1 -= {SULCAL_WIDENING} * f * sulcal * (t1 - csf)",
                                    "gain": SULCAL_WIDENING,
                                    "sulcal": "p_gm * CSF neighbourhood (Gaussian sigma "
                                              f"{SULCAL_SMOOTH_MM} mm, scaled to max 1) within "
                                              f"{SULCAL_DEPTH_MM} mm of the brain surface",
                                    "modalities": ["T1"]}},
        "individual_anatomy": {
            "law": "the template (aged) sampled at y + u(y): u the flow over unit time of a "
                   "divergence-free velocity v = curl A, A three fields of white noise smoothed "
                   f"by a Gaussian of sigma {ANATOMY_SMOOTH_MM} mm, v scaled to rms "
                   f"{ANATOMY_RMS_MM} mm over the template brain; the velocity is scaled down "
                   f"until no point near the brain's surface moves more than {ANATOMY_MAX_MM} mm",
            "velocity_rms_mm": ANATOMY_RMS_MM, "potential_sigma_mm": ANATOMY_SMOOTH_MM,
            "max_displacement_mm": ANATOMY_MAX_MM, "grid_mm": ANATOMY_GRID_MM,
            "interpolation": "trilinear", "flow": f"scaling and squaring, {ANATOMY_STEPS} steps",
            "order": "output grid -> inverse head position and scale -> individual anatomy -> "
                     "ventricle warp -> template",
            "volume_preserving": "Jacobian determinant 1 up to the discretisation: ventricle "
                                 "volume and grey-matter amount (the planted age effects) are "
                                 "kept, so the achievable figures do not change",
            "modalities": ["T1", "rsfMRI", "dMRI"]},
        "nuisance": {"rotation_deg": ROTATION_DEG, "translation_mm": TRANSLATION_MM,
                     "gain": [1 - GAIN_RANGE, 1 + GAIN_RANGE],
                     "bias_field": f"2nd-order polynomial, peak deviation U(0, {BIAS_MAX})",
                     "noise_sd_fraction_of_wm": NOISE_SD},
        "geometry": {"orientation": "".join(ORIENTATION), "dtype_on_disk": "int16 with scl_slope",
                     "white_matter_level": _anatomy.WM_LEVEL},
        "seeds": {"hidden_variables": f"SeedSequence([seed, index, {LATENT_STREAM}])",
                  "individual_anatomy": f"SeedSequence([seed, index, {ANATOMY_STREAM}])",
                  "T1_nuisance": "SeedSequence([seed, index])",
                  "ages": "SeedSequence(seed, spawn_key=(0xC1,))"},
    }
    if csf_contrast:
        csf_contrast = float(csf_contrast)
        planted["nuisance"]["T1_csf_contrast"] = {
            "law": f"CSF level = template CSF level * U[{1 - csf_contrast:g}, "
                   f"{1 + csf_contrast:g}] per T1 scan, by a piecewise-linear contrast curve "
                   "(0 -> 0, CSF -> the scan's CSF level, GM -> GM, unchanged above)",
            "spread": csf_contrast, "modalities": ["T1"]}
        planted["seeds"]["T1_csf_contrast"] = f"SeedSequence([seed, index, {CONTRAST_STREAM}])"
    return planted


def truth(modalities, csf_contrast: float = 0.0) -> dict:
    """truth.json: the achievable score per task and modality, and the planted model. The T1
    scans' CSF contrast (``csf_contrast``) leaves the achievable figures unchanged: it acts after
    the planted variables and is read from the scan's own CSF (module docstring)."""
    scale = {"metric": "accuracy", "achievable": round(achievable_sex_accuracy_scale(), 6),
             "note": "Bayes-optimal from the planted brain scale"}
    age = {"metric": "mae", "achievable": round(achievable_age_mae(), 4),
           "note": "Bayes-optimal (posterior median) from the planted brain age "
                   f"b = age + N(0, {BRAIN_AGE_SD}) under the uniform prior on "
                   f"{AGE_RANGE[0]}..{AGE_RANGE[1]} years"}
    sex = {"T1": scale}
    ages = {"T1": age}
    if "rsfMRI" in modalities:
        sex["rsfMRI"] = {"metric": "accuracy",
                         "achievable": round(achievable_sex_accuracy_coupling(), 6),
                         "note": "Bayes-optimal from the planted DMN-FPN coupling; the run's "
                                 "anatomy carries no sex"}
        ages["rsfMRI"] = age | {"note": age["note"] + " (ventricles only in this modality)"}
    if "dMRI" in modalities:
        sex["dMRI"] = dict(scale)
        ages["dMRI"] = age | {"note": age["note"] + " (ventricles only in this modality)"}
    return {"variant": "realistic", "tasks": {"sex": sex, "age": ages},
            "planted": planted_parameters(csf_contrast)}


def planted_text(subjects, latents, csf_factors=None) -> str:
    """planted.csv: subject_id, sex, age and the subject's hidden variables; with
    ``csf_factors`` (a cohort with scanner contrast) one more column, ``T1_csf_factor``: the
    factor on the CSF level of each subject's T1 scan (:func:`csf_contrast`)."""
    header = ["subject_id", "sex", "age", *(asdict(latents[0]) if latents else [])]
    rows = [[s.subject_id, s.sex, f"{s.age:g}", *(f"{v:.6f}" for v in asdict(lat).values())]
            for s, lat in zip(subjects, latents, strict=True)]
    if csf_factors is not None:
        header.append("T1_csf_factor")
        for row, factor in zip(rows, csf_factors, strict=True):
            row.append(f"{factor:.6f}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


# ----------------------------------------------------------------------------- template maps

_SULCAL: tuple[int, np.ndarray] | None = None  # (id of the template it was built from, map)


def _build_sulcal(tpl) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    if tpl.wm is None or tpl.mask is None:
        raise RuntimeError("the demo template lacks WM/mask maps; reload it with _load_template")
    voxel = float(abs(np.linalg.inv(tpl.inv_affine)[0, 0]))
    mask = tpl.mask
    csf = np.clip(1 - tpl.gm - tpl.wm, 0, 1) * mask
    near = gaussian_filter(csf.astype(np.float32), SULCAL_SMOOTH_MM / voxel)
    depth = distance_transform_edt(mask) * voxel
    sulcal = tpl.gm * near * (depth <= SULCAL_DEPTH_MM)
    return (sulcal / max(float(sulcal.max()), 1e-6)).astype(np.float32)


def sulcal_map() -> np.ndarray:
    """GM next to CSF in the outer cortex, in [0, 1]; built once per process (~0.5 s)."""
    global _SULCAL
    tpl = _anatomy._template()
    if _SULCAL is None or _SULCAL[0] != id(tpl):
        _SULCAL = (id(tpl), _build_sulcal(tpl))
    return _SULCAL[1]


# ----------------------------------------------------------------------------- synthesis

def draw_position(rng: np.random.Generator) -> dict:
    """Head rotation and translation of one scan."""
    angles = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))
    return {"rotation": _anatomy._rotation(angles),
            "translation": rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3)}


def aged_t1(brain_age: float) -> np.ndarray:
    """The template T1 (WM = 1) with cortical thinning and sulcal widening of ``brain_age``."""
    tpl = _anatomy._template()
    f = age_fraction(brain_age)
    loss = (GM_THINNING * f) * tpl.gm + (SULCAL_WIDENING * f) * sulcal_map()
    return (tpl.t1 - loss * (tpl.t1 - tpl.csf_level)).astype(np.float32)


def csf_contrast_problem(spread) -> str | None:
    """Why ``spread`` cannot be a cohort's CSF-contrast spread, or None when it can."""
    if isinstance(spread, int | float) and 0 <= spread < MAX_CSF_CONTRAST:
        return None
    return (f"csf_contrast must be a number in [0, {MAX_CSF_CONTRAST}) (the spread of the T1 "
            f"scans' CSF level), got {spread!r}")


def csf_contrast(seed: int, index: int, spread: float) -> float:
    """The factor on the CSF level of subject ``index``'s T1 scan: U[1 - spread, 1 + spread]
    from ``SeedSequence([seed, index, CONTRAST_STREAM])`` (1.0 when ``spread`` is 0)."""
    problem = csf_contrast_problem(spread)
    if problem:
        raise ValueError(problem)
    if spread == 0:
        return 1.0
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, CONTRAST_STREAM]))
    return float(rng.uniform(1 - spread, 1 + spread))


def with_csf_contrast(t1: np.ndarray, factor: float) -> np.ndarray:
    """The T1 contrast curve of a scan whose CSF level is ``factor`` times the template's.

    Piecewise linear on the WM = 1 scale: 0 -> 0, the template CSF level -> ``factor`` times it,
    the template GM level -> itself, and unchanged above it. Voxels between CSF and GM (partial
    volume, the aged cortex's GM-to-CSF mixture) keep their mixing fraction, so the planted
    cortical effects stay readable once the CSF level is known (from the ventricles)."""
    tpl = _anatomy._template()
    csf, gm = tpl.csf_level, tpl.gm_level
    return np.interp(t1, [0.0, csf, gm, 1e3], [0.0, csf * factor, gm, 1e3]).astype(np.float32)


def synthesize_t1(job) -> np.ndarray:
    """Float32 T1 (RAS+ grid) of one realistic subject; job is a cohort ``_Job`` carrying the
    subject's ``scale`` and ``brain_age``. Nuisance from ``SeedSequence([seed, index])``, the
    individual anatomy from :func:`individual_anatomy`."""
    from scipy.ndimage import map_coordinates

    tpl = _anatomy._template()
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    draw = draw_position(rng) | {"scale": job.scale}
    gain = rng.uniform(1 - GAIN_RANGE, 1 + GAIN_RANGE)
    bias_coef, bias_amp = rng.normal(size=9), rng.uniform(0.0, BIAS_MAX)
    coords = _anatomy._source_coords(job, draw, tpl, pull=ventricle_pull(job.brain_age),
                                     displace=individual_anatomy(job.seed, job.index).displace_grid)
    t1 = aged_t1(job.brain_age)
    if job.csf_factor != 1.0:
        t1 = with_csf_contrast(t1, job.csf_factor)
    vol = map_coordinates(t1, coords, order=1, mode="constant", cval=0.0,
                          prefilter=False)
    vol *= _anatomy.WM_LEVEL * gain
    vol *= _anatomy._bias_field(job.image_size, bias_coef, bias_amp)
    noise = rng.standard_normal(job.image_size) * (NOISE_SD * _anatomy.WM_LEVEL * gain)
    return np.abs(vol + noise).astype(np.float32)


# ----------------------------------------------------------------------------- individual anatomy

@dataclass(frozen=True)
class _AnatomyGrid:
    """The coarse grid of the individual-anatomy fields (template space, MNI mm)."""

    origin: np.ndarray  # MNI mm of node (0, 0, 0)
    shape: tuple[int, int, int]
    near_surface: np.ndarray  # bool (shape): nodes whose displacement moves the brain's surface
    brain: np.ndarray  # bool (shape): nodes inside the template brain mask


_ANATOMY_GRID: tuple[int, _AnatomyGrid] | None = None


def _anatomy_grid() -> _AnatomyGrid:
    """Built once per template: covers its array plus ANATOMY_MARGIN_MM at ANATOMY_GRID_MM."""
    global _ANATOMY_GRID
    from scipy.ndimage import distance_transform_edt, map_coordinates

    tpl = _anatomy._template()
    if _ANATOMY_GRID is not None and _ANATOMY_GRID[0] == id(tpl):
        return _ANATOMY_GRID[1]
    affine = np.linalg.inv(tpl.inv_affine)
    lo = affine[:3, 3] - ANATOMY_MARGIN_MM
    hi = affine[:3, :3] @ (np.asarray(tpl.mask.shape) - 1) + affine[:3, 3] + ANATOMY_MARGIN_MM
    shape = tuple(int(n) for n in np.ceil((hi - lo) / ANATOMY_GRID_MM).astype(int) + 1)
    nodes = np.indices(shape).reshape(3, -1) * ANATOMY_GRID_MM + lo[:, None]
    vox = tpl.inv_affine[:3, :3] @ nodes + tpl.inv_affine[:3, 3:]
    brain = map_coordinates(tpl.mask.astype(np.float32), vox, order=1).reshape(shape) > 0.5
    # the nodes that move the brain's surface (the brain's image is bounded by its surface's):
    # those one trilinear cell plus the largest move away from it, inside or outside
    reach = ANATOMY_MAX_MM + math.sqrt(3) * ANATOMY_GRID_MM
    depth = np.where(brain, distance_transform_edt(brain), distance_transform_edt(~brain))
    near = depth * ANATOMY_GRID_MM <= reach
    grid = _AnatomyGrid(lo, shape, near, brain)
    _ANATOMY_GRID = (id(tpl), grid)
    return grid


def _sample(field: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Trilinear samples (3, n) of a (3, *shape) field at grid indices (3, n); edge-clamped."""
    from scipy.ndimage import map_coordinates

    return np.stack([map_coordinates(f, index, order=1, mode="nearest", prefilter=False)
                     for f in field])


def _flow(velocity: np.ndarray, steps: int = ANATOMY_STEPS) -> np.ndarray:
    """Displacement (mm) of the flow of a stationary velocity field (mm per unit time) over unit
    time, by scaling and squaring: u <- v / 2**steps, then ``steps`` times u <- u + u(x + u)."""
    shape = velocity.shape[1:]
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    u = velocity.reshape(3, -1) / 2.0 ** steps
    for _ in range(steps):
        u = u + _sample(u.reshape(3, *shape), index + u / ANATOMY_GRID_MM)
    return u.reshape(velocity.shape)


def _curl(a: np.ndarray) -> np.ndarray:
    """Curl (central differences, mm) of a (3, *shape) vector potential on the coarse grid."""
    g = [np.gradient(c, ANATOMY_GRID_MM) for c in a]  # g[i][j] = d a_i / d x_j
    return np.stack([g[2][1] - g[1][2], g[0][2] - g[2][0], g[1][0] - g[0][1]])


@dataclass(frozen=True)
class Anatomy:
    """One subject's individual anatomy: a smooth, volume-preserving deformation of template
    space. ``forward`` (3, *grid) mm: a point ``y`` samples the template at ``y + forward(y)``
    (before the ventricle warp); ``velocity``: the divergence-free field whose flow it is."""

    velocity: np.ndarray  # (3, *grid) mm
    forward: np.ndarray  # (3, *grid) mm
    velocity_scale: float  # < 1 when the velocity was scaled down to keep ANATOMY_MAX_MM

    def _index(self, points: np.ndarray) -> np.ndarray:
        origin = _anatomy_grid().origin.reshape(3, *([1] * (points.ndim - 1)))
        return (points - origin) / ANATOMY_GRID_MM

    def displace(self, points: np.ndarray) -> np.ndarray:
        """Template-space points (3, ...) MNI mm -> the template points they sample."""
        shape = points.shape
        flat = points.reshape(3, -1)
        return (flat + _sample(self.forward, self._index(flat))).reshape(shape)

    def displace_grid(self, points: np.ndarray) -> np.ndarray:
        """:meth:`displace` for points (3, X, Y, Z) that are an affine function of their grid
        index (a sampling grid). Where every second point is at most ANATOMY_GRID_MM apart, the
        displacement is sampled there only and interpolated linearly between, 8x cheaper (on
        the T1's 2 mm grid: 0.07 mm rms from :meth:`displace`); otherwise it is :meth:`displace`."""
        shape = points.shape[1:]
        origin = points[:, :1, :1, :1]
        step = [points[(slice(None), *[slice(1, 2) if a == b else slice(0, 1) for b in range(3)])]
                - origin if shape[a] > 1 else np.zeros_like(origin) for a in range(3)]
        if min(shape) < 3 or 2 * max(float(np.linalg.norm(v)) for v in step) > ANATOMY_GRID_MM:
            return self.displace(points)
        half = [n // 2 + 1 for n in shape]  # every second index, one past the last when odd
        index = np.ix_(*(2 * np.arange(m, dtype=np.float64) for m in half))
        coarse = origin + sum(step[a][..., 0, 0, 0][:, None, None, None] * index[a]
                              for a in range(3))
        u = self.displace(coarse) - coarse
        for axis in (1, 2, 3):
            m = u.shape[axis]
            fine = np.empty((*u.shape[:axis], 2 * m - 1, *u.shape[axis + 1:]), dtype=u.dtype)
            even, odd, lo, hi = ([slice(None)] * 4 for _ in range(4))
            even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            fine[tuple(even)] = u
            fine[tuple(odd)] = 0.5 * (u[tuple(lo)] + u[tuple(hi)])
            keep = [slice(None)] * 4
            keep[axis] = slice(0, shape[axis - 1])
            u = fine[tuple(keep)]
        return points + u

    def undisplace(self, points: np.ndarray) -> np.ndarray:
        """The inverse map, (n, 3) MNI mm: where template points land (the flow of -velocity,
        exact up to the discretisation)."""
        inverse = _flow(-self.velocity)
        flat = points.T
        return (flat + _sample(inverse, self._index(flat))).T


def individual_anatomy(seed: int, index: int) -> Anatomy:
    """Subject ``index``'s deformation, from ``SeedSequence([seed, index, ANATOMY_STREAM])``.

    The velocity is the curl of a vector potential (three fields of white noise on the coarse
    grid, each smoothed by a Gaussian of sigma ANATOMY_SMOOTH_MM), so it is divergence-free; it
    is scaled to an rms of ANATOMY_RMS_MM over the template brain. The deformation is its flow
    over unit time, whose Jacobian determinant is 1 (volumes, e.g. the ventricles' and the grey
    matter's, are kept up to the discretisation). Should any point near the brain's surface move
    farther than ANATOMY_MAX_MM, the velocity is scaled down until none does (a bounded field of
    view).
    """
    from scipy.ndimage import gaussian_filter

    grid = _anatomy_grid()
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, ANATOMY_STREAM]))
    noise = rng.standard_normal((3, *grid.shape))
    potential = np.stack([gaussian_filter(n, ANATOMY_SMOOTH_MM / ANATOMY_GRID_MM, mode="wrap")
                          for n in noise])
    velocity = _curl(potential)
    velocity *= ANATOMY_RMS_MM / math.sqrt(float((velocity[:, grid.brain] ** 2).sum(0).mean()))
    scale = 1.0
    while True:
        forward = _flow(velocity)
        reach = float(np.sqrt((forward[:, grid.near_surface] ** 2).sum(0)).max())
        if reach <= ANATOMY_MAX_MM:
            return Anatomy(velocity, forward, scale)
        shrink = 0.98 * ANATOMY_MAX_MM / reach
        velocity, scale = velocity * shrink, scale * shrink


# ----------------------------------------------------------------------------- field of view

def _mask_surface_mm() -> np.ndarray:
    """(n, 3) MNI mm of the template brain mask's surface voxels (the ones that could leave)."""
    from scipy.ndimage import binary_erosion

    tpl = _anatomy._template()
    surface = tpl.mask & ~binary_erosion(tpl.mask)
    idx = np.argwhere(surface).astype(np.float64)
    affine = np.linalg.inv(tpl.inv_affine)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _unwarp_ventricles(points: np.ndarray, pull: float) -> np.ndarray:
    """Inverse of the ventricle warp (output-side point -> where it lands), by bisection on the
    radius: r (1 - pull g(r)) = rho is increasing in r, so the root is unique."""
    vc = np.asarray(_anatomy.VENTRICLE_CENTRE_MM)
    d = points - vc
    rho = np.linalg.norm(d, axis=1)
    if pull <= 0:
        return points.copy()
    lo, hi = rho.copy(), rho / (1 - pull)
    for _ in range(60):
        mid = (lo + hi) / 2
        h = mid * (1 - pull * np.exp(-0.5 * (mid / _anatomy.VENTRICLE_SIGMA_MM) ** 2))
        below = h < rho
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    ratio = np.divide(hi, rho, out=np.ones_like(rho), where=rho > 0)
    return vc + d * ratio[:, None]


def brain_in_fov_mm(points: np.ndarray, scale: float, rotation: np.ndarray,
                    translation, pull: float, anatomy: Anatomy | None = None) -> np.ndarray:
    """Where template points (n, 3; MNI mm) land in the subject's scan (world mm): the forward
    map of the one that :func:`umbrella.demo.anatomy._source_coords` samples backwards
    (``anatomy``: the subject's individual anatomy, None: none)."""
    centre = np.asarray(_anatomy.FOV_CENTRE_MM)
    x = _unwarp_ventricles(points, pull)
    if anatomy is not None:
        x = anatomy.undisplace(x)
    return centre + np.asarray(translation) + scale * (x - centre) @ np.asarray(rotation).T


@functools.lru_cache(maxsize=16)
def fov_slack_mm(image_size: tuple[int, int, int], voxel_mm: float, max_scale: float,
                 n_random: int = 200, seed: int = 0) -> float:
    """Smallest margin (mm) between the brain and the outermost voxel centres of the grid over
    the worst draws: the largest scale, rotations at every corner of +-ROTATION_DEG (and
    ``n_random`` random ones inside), the largest translation on every axis, no or the largest
    ventricle pull, and the largest move of the individual anatomy (ANATOMY_MAX_MM, scaled)
    in the worst direction; each template voxel counted with its half-diagonal. Negative:
    clipped."""
    points = _mask_surface_mm()
    half_voxel = max_scale * math.sqrt(3) * float(abs(np.linalg.inv(
        _anatomy._template().inv_affine)[0, 0])) / 2
    corners = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    rng = np.random.default_rng(seed)
    angles = np.concatenate([corners, rng.uniform(-1, 1, (n_random, 3)), np.zeros((1, 3))])
    affine = _anatomy.output_affine(image_size, voxel_mm)
    lo = affine[:3, 3]
    hi = lo + voxel_mm * (np.asarray(image_size) - 1)
    centre, slack = np.asarray(_anatomy.FOV_CENTRE_MM), math.inf
    reach = TRANSLATION_MM + half_voxel + max_scale * ANATOMY_MAX_MM
    for pull in (0.0, VENTRICLE_GAIN * AGE_FRACTION_MAX ** 2):
        x = max_scale * (_unwarp_ventricles(points, pull) - centre)
        for a in angles:  # brain_in_fov_mm without translation, the unwarp done once per pull
            p = centre + x @ _anatomy._rotation(np.deg2rad(a * ROTATION_DEG)).T
            slack = min(slack, float((p.min(axis=0) - reach - lo).min()),
                        float((hi - p.max(axis=0) - reach).min()))
    return slack


def max_scale(modality: str) -> float:
    """The largest brain scale a realistic scan of ``modality`` can draw."""
    if modality == "rsfMRI":
        return 1 + RSFMRI_SCALE_SD * TRUNCATE_SD
    return 1 + SEX_SCALE_SHIFT + SEX_SCALE_SD * TRUNCATE_SD
