"""The embedded demo cohort: synthetic-but-realistic T1 images built from the MNI152 template.

Every subject's T1 is the real MNI152 (2 mm, skull-stripped) template shipped inside nilearn,
seen through a random per-subject transform and intensity change, plus planted phenotype
effects that a tiny model can learn:

* **sex -> global brain scale.** Males are scaled by ``1 + sex_scale``, females by
  ``1 - sex_scale`` (default 0.05), each times a per-subject jitter drawn from N(1, 0.01).
  The expected male/female brain-volume ratio is therefore ``((1+s)/(1-s))**3`` (1.35 at 0.05).
* **age -> ventricle enlargement.** A smooth radial displacement centred on the lateral
  ventricles (MNI ``VENTRICLE_CENTRE_MM``, Gaussian profile with sigma ``VENTRICLE_SIGMA_MM``)
  pulls sampling points towards the centre by the fraction ``VENTRICLE_GAIN * (age-20)/60``
  (0 at 20 y, 0.25 at 80 y): dark CSF spaces grow, up to ~1.33x in radius at the core.
* **age -> grey-matter thinning.** Template intensity is moved towards the CSF level in
  proportion to the GM probability: ``t1 -= GM_THINNING * (age-20)/60 * p_gm * (t1 - csf)``
  (0 at 20 y, 15 % of the GM-CSF contrast at 80 y).
* **nuisance.** Rotation uniform +-5 deg per axis, translation uniform +-4 mm per axis, global
  gain uniform x[0.9, 1.1], a smooth multiplicative bias field (2nd-order polynomial, peak
  deviation uniform in [0, 10 %]) and Gaussian noise with sd 2 % of the white-matter level
  (magnitude image: ``abs(signal + noise)``).

All geometric terms are composed into one coordinate map and applied with a single
``scipy.ndimage.map_coordinates(order=1)`` call. Each subject is drawn from
``np.random.SeedSequence([seed, subject_index])``, so images do not depend on worker count or
order. Images are written as int16 NIfTI with scl_slope/scl_inter (readers must apply them).

``modalities=("T1", "rsfMRI", "dMRI")`` adds, per subject, an rsfMRI run (4D, BOLD-like networks
with a planted sex difference in DMN-FPN connectivity) and a dMRI FA-like map, both built on the
same subject's anatomy (so the sex -> brain-scale effect is present too), plus dipy's small real
DWI series for the tensor-fit path; see :mod:`umbrella.demo.modalities`. The default (T1 only)
writes exactly what it always did, and its manifest keeps its original parameters.

``variant="realistic"`` builds another cohort with the same machinery (one coordinate map and one
``map_coordinates`` per volume, the same workers): effects that overlap as real ones do (sex as a
Gaussian brain-scale difference with Bayes accuracy 0.89, age through a noisy brain age acting on
ventricles, cortex and sulci, sex in rsfMRI connectivity only), native-space nuisance, 2 mm LAS
images over a 224 x 256 x 224 mm field of view, and ``truth.json`` / ``planted.csv`` beside the
phenotype table; see :mod:`umbrella.demo.realistic`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import numbers
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from umbrella.demo import realistic
from umbrella.demo.anatomy import (
    AGE_RANGE,
    BIAS_MAX,
    GAIN_RANGE,
    GM_THINNING,
    NOISE_SD,
    ROTATION_DEG,
    SCALE_JITTER_SD,
    TRANSLATION_MM,
    VENTRICLE_CENTRE_MM,
    VENTRICLE_GAIN,
    VENTRICLE_SIGMA_MM,
    WM_LEVEL,
    _age_fraction,
    _bias_field,
    _draw_nuisance,
    _Job,
    _save_int16,
    _set_template,
    _source_coords,
    _template,
    output_affine,
)
from umbrella.errors import ConfigError, VolumeError
from umbrella.io import atomic_write_text

GENERATOR = "umbrella.demo.cohort"
GENERATOR_VERSION = 1
MANIFEST = "cohort.json"
PHENOTYPE = "phenotype.csv"
STUDY = "DEMO"


@dataclass(frozen=True)
class DemoSubject:
    subject_id: str  # "sub-0001" ...
    sex: str  # "male" | "female"
    age: float  # years, 1 decimal
    t1_path: str  # path RELATIVE to the cohort root, e.g. "images/sub-0001_T1w.nii.gz"
    rsfmri_path: str = ""  # "rsfmri/sub-0001_bold.nii.gz" (or a frame folder); "" if not built
    dmri_path: str = ""  # "dwi/sub-0001_FA.nii.gz"; "" if not built

    def path(self, modality: str) -> str:
        """This subject's image of ``modality`` (relative to the cohort root)."""
        return {"T1": self.t1_path, "rsfMRI": self.rsfmri_path, "dMRI": self.dmri_path}[modality]


@dataclass(frozen=True)
class DemoCohort:
    root: Path
    phenotype_csv: Path  # columns: subject_id, sex, age, study  (study = "DEMO")
    subjects: tuple[DemoSubject, ...]
    modalities: tuple[str, ...] = ("T1",)
    real_dwi: dict | None = None  # {"path", "bval", "bvec"} relative to root (dMRI cohorts)
    variant: str = "basic"  # "basic" | "realistic" (see umbrella.demo.realistic)


def planted_effects() -> dict:
    """Describe the planted effects (words and numbers) for reports."""
    from umbrella.demo.modalities import planted_effects as session_effects

    return session_effects() | {
        "sex": {"effect": "global brain scale about the field-of-view centre",
                "male_scale": "1 + sex_scale", "female_scale": "1 - sex_scale",
                "per_subject_jitter": f"N(1, {SCALE_JITTER_SD})",
                "expected_volume_ratio_male_over_female": "((1 + sex_scale) / (1 - sex_scale)) ** 3"},
        "age": {"range_years": list(AGE_RANGE),
                "ventricle_enlargement": {"centre_mni_mm": list(VENTRICLE_CENTRE_MM),
                                          "sigma_mm": VENTRICLE_SIGMA_MM,
                                          "radial_pull_at_80": VENTRICLE_GAIN,
                                          "law": "pull = gain * (age-20)/60 * exp(-r^2 / 2 sigma^2)"},
                "grey_matter_thinning": {"fraction_of_gm_csf_contrast_at_80": GM_THINNING,
                                         "law": "t1 -= k*(age-20)/60 * p_gm * (t1 - csf)"}},
        "nuisance": {"rotation_deg": ROTATION_DEG, "translation_mm": TRANSLATION_MM,
                     "gain": [1 - GAIN_RANGE, 1 + GAIN_RANGE],
                     "bias_field": f"2nd-order polynomial, peak deviation U(0, {BIAS_MAX})",
                     "noise_sd_fraction_of_wm": NOISE_SD},
        "intensity": {"white_matter_level": WM_LEVEL, "dtype_on_disk": "int16 with scl_slope"},
    }


# ----------------------------------------------------------------------------- synthesis

def synthesize_subject(job: _Job) -> np.ndarray:
    """Float32 T1 volume for one subject (deterministic from ``[seed, index]``)."""
    from scipy.ndimage import map_coordinates

    if job.variant == "realistic":
        from umbrella.demo.realistic import synthesize_t1

        return synthesize_t1(job)
    tpl = _template()
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    draw = _draw_nuisance(rng, job.sex, job.sex_scale)
    thin = GM_THINNING * _age_fraction(job.age)
    source = tpl.t1 - thin * tpl.gm * (tpl.t1 - tpl.csf_level)
    coords = _source_coords(job, draw, tpl)
    vol = map_coordinates(source, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    vol *= WM_LEVEL * draw["gain"]
    vol *= _bias_field(job.image_size, draw["bias_coef"], draw["bias_amp"])
    noise = rng.standard_normal(job.image_size) * (NOISE_SD * WM_LEVEL * draw["gain"])
    return np.abs(vol + noise).astype(np.float32)


# ----------------------------------------------------------------------------- writing

def _write_subject(job: _Job) -> str:
    """Synthesize one subject and write it atomically as int16 NIfTI; returns the path."""
    axcodes = realistic.ORIENTATION if job.variant == "realistic" else None
    _save_int16(synthesize_subject(job), output_affine(job.image_size, job.voxel_mm),
                Path(job.path), axcodes=axcodes)
    return job.path


def _write_job(job) -> str:
    """A T1 ``_Job`` or an rsfMRI/dMRI ``SessionJob`` -> its file (picklable for the pool)."""
    if isinstance(job, _Job):
        return _write_subject(job)
    from umbrella.demo.modalities import write_session

    return write_session(job)


def _run_jobs(jobs: list, workers: int, progress: bool, desc: str = "demo cohort") -> None:
    from tqdm.auto import tqdm

    if any(not isinstance(job, _Job) for job in jobs):  # built once here; fork workers inherit
        from umbrella.demo.modalities import template_maps

        template_maps()
    if any(job.variant == "realistic" for job in jobs):
        from umbrella.demo.realistic import sulcal_map

        sulcal_map()
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                with _write_errors(job):
                    _write_job(job)
                bar.update()
            return
        with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_set_template,
                                 initargs=(_template(),)) as pool:
            futures = {pool.submit(_write_job, job): job for job in jobs}
            try:
                for fut in as_completed(futures):
                    with _write_errors(futures[fut]):
                        fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise


def _mp_context():
    """fork on Linux: workers inherit the loaded template and scripts need no ``__main__`` guard
    (spawn re-imports the caller's main module and hangs when that fails); spawn elsewhere."""
    fork_ok = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if fork_ok else "spawn")


@contextmanager
def _write_errors(job):
    """Turn an OSError while writing one image into a VolumeError naming the file."""
    try:
        yield
    except OSError as exc:
        raise VolumeError(f"cannot write demo image: {exc}", path=job.path,
                          fix="check free disk space and write permission on the output folder") from exc


# ----------------------------------------------------------------------------- cohort

def _validate(n_subjects, seed, image_size, voxel_mm, sex_scale, workers,
              extra: Sequence[str] = ()) -> tuple[int, int, int]:
    problems = list(extra)
    if not isinstance(n_subjects, int) or isinstance(n_subjects, bool) or n_subjects < 2:
        problems.append(f"n_subjects must be an integer >= 2, got {n_subjects!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    size = tuple(image_size) if isinstance(image_size, Sequence | np.ndarray) else ()
    if len(size) != 3 or not all(isinstance(n, numbers.Integral) and n >= 8 for n in size):
        problems.append(f"image_size must be three integers >= 8, got {image_size!r}")
    if not isinstance(voxel_mm, int | float) or not math.isfinite(voxel_mm) or voxel_mm <= 0:
        problems.append(f"voxel_mm must be a positive number, got {voxel_mm!r}")
    if not isinstance(sex_scale, int | float) or not 0 <= sex_scale < 0.5:
        problems.append(f"sex_scale must be in [0, 0.5), got {sex_scale!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        problems.append(f"workers must be a non-negative integer, got {workers!r}")
    if problems:
        raise ConfigError(problems, source="build_demo_cohort")
    return tuple(int(n) for n in size)


def normalize_modalities(modalities) -> tuple[tuple[str, ...], list[str]]:
    """("rsfMRI", "T1") or "T1,rsfMRI" -> (("T1", "rsfMRI"), problems): canonical order
    T1, rsfMRI, dMRI, duplicates dropped; T1 is always built (the other sessions reuse its
    anatomy, and records may still leave it out)."""
    from umbrella.demo.modalities import MODALITIES

    items = modalities.split(",") if isinstance(modalities, str) else modalities
    if not isinstance(items, Sequence) or not all(isinstance(m, str) for m in items):
        return ("T1",), [f"modalities must be a list of names from {MODALITIES}, "
                         f"got {modalities!r}"]
    names = [m.strip() for m in items if m.strip()]
    unknown = [m for m in names if m not in MODALITIES]
    problems = [f"unknown modality {m!r}: choose from {', '.join(MODALITIES)}" for m in unknown]
    return tuple(m for m in MODALITIES if m == "T1" or m in names), problems


def _draw_phenotypes(n_subjects: int, seed: int, variant: str = "basic") -> list[DemoSubject]:
    """Exactly balanced sex (one extra, drawn, when n is odd) and age ~ U[20, 80], 1 decimal
    (realistic: whole years uniform on realistic.AGE_RANGE, from a stream of their own)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xC0,)))
    sexes = ["male", "female"] * (n_subjects // 2)
    if n_subjects % 2:
        sexes.append(str(rng.choice(["male", "female"])))
    rng.shuffle(sexes)
    if variant == "realistic":
        from umbrella.demo.realistic import draw_ages

        ages = draw_ages(n_subjects, seed).astype(float)
    else:
        ages = np.round(rng.uniform(*AGE_RANGE, n_subjects), 1)
    width = max(4, len(str(n_subjects)))
    return [DemoSubject(f"sub-{i + 1:0{width}d}", sex, float(age),
                        f"images/sub-{i + 1:0{width}d}_T1w.nii.gz")
            for i, (sex, age) in enumerate(zip(sexes, ages, strict=True))]


def _with_sessions(subjects: list[DemoSubject], modalities: tuple[str, ...],
                   fmri) -> tuple[DemoSubject, ...]:
    """Fill in the rsfMRI/dMRI paths of the modalities that are built."""
    from umbrella.demo.modalities import session_path

    n = len(subjects)
    return tuple(replace(s, **{field: session_path(s.subject_id, i, n, m, fmri)
                               for m, field in (("rsfMRI", "rsfmri_path"), ("dMRI", "dmri_path"))
                               if m in modalities})
                 for i, s in enumerate(subjects))


def _phenotype_text(subjects: Sequence[DemoSubject]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["subject_id", "sex", "age", "study"])
    for s in subjects:
        writer.writerow([s.subject_id, s.sex, f"{s.age:.1f}", STUDY])
    return buf.getvalue()


def _read_manifest(root: Path) -> dict | None:
    """The existing manifest, None if absent; refuses a cohort.json this module did not write."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        data = {"error": str(exc)}
    if not isinstance(data, dict) or data.get("generator") != GENERATOR:
        raise ConfigError(f"{path} exists but was not written by build_demo_cohort; "
                          "pick an empty output folder (nothing was changed)")
    return data


_BASE_KEYS = ("n_subjects", "seed", "image_size", "voxel_mm", "sex_scale", "generator_version",
              "umbrella_version", "variant", "planted")  # the last two: realistic cohorts only


def _present(root: Path, rel: str, n_frames: int) -> bool:
    path = root / rel
    if rel.startswith("rsfmri/") and not rel.endswith(".nii.gz"):  # frame folder
        return all((path / name).is_file()
                   for name in ("frame_0.pt", f"frame_{n_frames - 1}.pt", "global_stats.pt"))
    return path.is_file()


def _part_files(subjects, modality: str, real_dwi: dict | None, variant: str = "basic") -> list[str]:
    files = [s.path(modality) for s in subjects]
    if modality == "T1":
        files.append(PHENOTYPE)
        if variant == "realistic":
            from umbrella.demo.realistic import PLANTED, TRUTH

            files += [TRUTH, PLANTED]
    if modality == "dMRI" and real_dwi:
        files += [real_dwi[k] for k in ("path", "bval", "bvec")]
    return files


def _reusable_parts(root: Path, manifest: dict | None, params: dict, subjects,
                    real_dwi: dict | None) -> set[str]:
    """Modalities whose files a previous build with the same settings left complete."""
    old = manifest.get("parameters") if manifest else None
    if not isinstance(old, dict) or any(old.get(k) != params.get(k) for k in _BASE_KEYS):
        return set()
    built = old.get("modalities", ["T1"])
    n_frames = params.get("rsfMRI", {}).get("n_frames", 0)
    return {m for m in params.get("modalities", ["T1"])
            if m in built and old.get(m) == params.get(m)
            and all(_present(root, f, n_frames)
                    for f in _part_files(subjects, m, real_dwi, params.get("variant", "basic")))}


def _unchanged(manifest: dict | None, params: dict, subjects) -> bool:
    if manifest is None or manifest.get("parameters") != params:
        return False
    try:
        return tuple(DemoSubject(**s) for s in manifest["subjects"]) == subjects
    except (KeyError, TypeError):
        return False


def build_demo_cohort(out_dir, n_subjects: int | None = None, *, variant: str = "basic",
                      seed: int = 0, image_size=None, voxel_mm: float | None = None,
                      sex_scale: float | None = None, workers: int = 2, progress: bool = True,
                      modalities=("T1",), rsfmri=None, dmri=None,
                      csf_contrast: float = 0.0) -> DemoCohort:
    """Build (or reuse) the demo cohort under ``out_dir``; see the module docstring for effects.

    Writes ``images/sub-XXXX_T1w.nii.gz``, ``phenotype.csv`` and, last, ``cohort.json``.
    ``modalities`` adds rsfMRI runs (``rsfmri/``) and dMRI FA maps plus dipy's real DWI series
    (``dwi/``), configured by ``rsfmri`` (:class:`~umbrella.demo.modalities.FmriSettings`) and
    ``dmri`` (:class:`~umbrella.demo.modalities.DmriSettings`); see that module for their effects.
    An existing cohort with identical parameters and all files present is reused untouched; when
    only the set of modalities or one modality's settings changed, the complete parts are kept.

    ``variant="realistic"`` builds the cohort of :mod:`umbrella.demo.realistic` (overlapping
    effects, native-space nuisance; also ``truth.json`` and ``planted.csv``). Defaults per
    variant: basic 200 subjects, 96^3 at 2.1 mm, ``sex_scale`` 0.05, rsfMRI/dMRI 48^3 at 4.2 mm;
    realistic 400 subjects, 112 x 128 x 112 at 2 mm, rsfMRI/dMRI 56 x 64 x 56 at 4 mm.
    ``csf_contrast`` (realistic only, in [0, 0.5); 0: off): every T1 scan's CSF level is the
    template's times U[1 - c, 1 + c] (:mod:`umbrella.demo.realistic`, "scanner contrast").
    """
    import umbrella
    from umbrella.demo import realistic
    from umbrella.demo.modalities import REAL_DWI, DmriSettings, FmriSettings

    real_variant = variant == "realistic"
    problems = [] if variant in realistic.VARIANTS else \
        [f"variant must be one of {', '.join(realistic.VARIANTS)}, got {variant!r}"]
    if real_variant and sex_scale is not None:
        problems.append("sex_scale applies to the basic cohort only (the realistic cohort's "
                        "planted model is fixed: see umbrella.demo.realistic)")
    if csf_contrast and not real_variant:
        problems.append("csf_contrast (--csf-contrast) applies to the realistic cohort only")
    elif problem := realistic.csf_contrast_problem(csf_contrast):
        problems.append(problem)
    session = {"image_size": realistic.SESSION_IMAGE_SIZE,
               "voxel_mm": realistic.SESSION_VOXEL_MM} if real_variant else {}
    fmri, dmri = rsfmri or FmriSettings(**session), dmri or DmriSettings(**session)
    n_subjects = (400 if real_variant else 200) if n_subjects is None else n_subjects
    image_size = (realistic.IMAGE_SIZE if real_variant else (96, 96, 96)) \
        if image_size is None else image_size
    voxel_mm = (realistic.VOXEL_MM if real_variant else 2.1) if voxel_mm is None else voxel_mm
    sex_scale = 0.05 if sex_scale is None else sex_scale
    mods, more = normalize_modalities(modalities)
    problems += more + (fmri.problems() if "rsfMRI" in mods else []) + \
        (dmri.problems() if "dMRI" in mods else [])
    size = _validate(n_subjects, seed, image_size, voxel_mm, sex_scale, workers, problems)
    root = Path(out_dir).resolve()
    params = {"n_subjects": n_subjects, "seed": seed, "image_size": list(size),
              "voxel_mm": float(voxel_mm), "sex_scale": float(sex_scale),
              "generator_version": GENERATOR_VERSION, "umbrella_version": umbrella.__version__}
    if real_variant:  # no sex_scale: its planted model is written out instead
        del params["sex_scale"]
        params |= {"variant": "realistic",
                   "planted": realistic.planted_parameters(float(csf_contrast))}
        _check_field_of_view(mods, size, float(voxel_mm), {"rsfMRI": fmri, "dMRI": dmri})
    if mods != ("T1",) or real_variant:  # a basic T1-only manifest keeps its original form
        params["modalities"] = list(mods)
        params |= {m: {"rsfMRI": fmri, "dMRI": dmri}[m].to_dict() for m in mods[1:]}
    subjects = _with_sessions(_draw_phenotypes(n_subjects, seed, variant), mods, fmri)
    real = {k: REAL_DWI[k] for k in ("path", "bval", "bvec")} \
        if "dMRI" in mods and dmri.real_dwi else None
    manifest = _read_manifest(root) if root.is_dir() else None
    keep = _reusable_parts(root, manifest, params, subjects, real)
    if keep != set(mods) or not _unchanged(manifest, params, subjects):
        _generate(root, subjects, params, [m for m in mods if m not in keep],
                  stale_manifest=manifest is not None, workers=workers, progress=progress,
                  settings={"rsfMRI": fmri, "dMRI": dmri})
    return DemoCohort(root=root, phenotype_csv=root / PHENOTYPE, subjects=subjects,
                      modalities=mods, real_dwi=real, variant=variant)


def _check_field_of_view(mods, size, voxel_mm: float, settings: dict) -> None:
    """Realistic cohorts: refuse a grid on which the largest, most rotated and shifted brain
    would be clipped (the check maps the template brain's surface forward)."""
    from umbrella.demo.realistic import fov_slack_mm, max_scale

    problems = []
    for m in mods:
        grid, voxel = (size, voxel_mm) if m == "T1" else \
            (tuple(settings[m].image_size), float(settings[m].voxel_mm))
        slack = fov_slack_mm(grid, voxel, max_scale(m))
        if slack < 0:
            fov = " x ".join(f"{n * voxel:g}" for n in grid)
            problems.append(f"{m}: a {fov} mm field of view clips the largest brain of the "
                            f"realistic cohort by {-slack:.1f} mm; use at least 224 x 256 x 224 "
                            "mm (the default grids)")
    if problems:
        raise ConfigError(problems, source="build_demo_cohort")


def _latents(subjects, seed: int) -> list:
    from umbrella.demo.realistic import subject_latents

    return [subject_latents(seed, i, s.sex, s.age) for i, s in enumerate(subjects)]


def _csf_contrast(params: dict) -> float:
    """The realistic T1 scans' CSF-contrast spread recorded in a cohort's parameters (0: off)."""
    nuisance = params.get("planted", {}).get("nuisance", {})
    return float(nuisance.get("T1_csf_contrast", {}).get("spread", 0.0))


def _jobs(root: Path, subjects, params: dict, todo: list[str], settings: dict) -> list:
    from umbrella.demo.modalities import SessionJob
    from umbrella.demo.realistic import csf_contrast

    seed, scale = params["seed"], params.get("sex_scale", 0.0)
    variant = params.get("variant", "basic")
    hidden = _latents(subjects, seed) if variant == "realistic" else [None] * len(subjects)
    spread = _csf_contrast(params)
    jobs: list = []
    for m in ("rsfMRI", "T1", "dMRI"):  # the heaviest first: better balanced workers
        if m not in todo:
            continue
        if m == "T1":
            jobs += [_Job(i, seed, s.sex, s.age, tuple(params["image_size"]), params["voxel_mm"],
                          scale, str(root / s.t1_path),
                          **({} if lat is None else {
                              "variant": variant, "scale": lat.scale,
                              "brain_age": lat.brain_age,
                              "csf_factor": csf_contrast(seed, i, spread)}))
                     for i, (s, lat) in enumerate(zip(subjects, hidden, strict=True))]
            continue
        cfg = settings[m]
        extra = {"n_frames": cfg.n_frames, "tr": float(cfg.tr)} if m == "rsfMRI" else {}
        for i, (s, lat) in enumerate(zip(subjects, hidden, strict=True)):
            rel = s.path(m)
            if lat is not None:
                extra |= {"variant": variant, "brain_age": lat.brain_age,
                          "scale": lat.rsfmri_scale if m == "rsfMRI" else lat.scale,
                          "coupling": lat.coupling if m == "rsfMRI" else 0.0}
            jobs.append(SessionJob(m, i, seed, s.sex, s.age, scale, tuple(cfg.image_size),
                                   float(cfg.voxel_mm), str(root / rel),
                                   frame_folder=not rel.endswith(".nii.gz"), **extra))
    return jobs


def _generate(root: Path, subjects: tuple[DemoSubject, ...], params: dict, todo: list[str], *,
              stale_manifest: bool, workers: int, progress: bool, settings: dict) -> None:
    from umbrella.demo.modalities import REAL_DWI, copy_real_dwi

    root.mkdir(parents=True, exist_ok=True)
    if stale_manifest:  # ours (checked); drop it first so a crash cannot leave it describing new files
        (root / MANIFEST).unlink(missing_ok=True)
    for m, folder in (("T1", "images"), ("rsfMRI", "rsfmri"), ("dMRI", "dwi")):
        if m in todo:
            (root / folder).mkdir(parents=True, exist_ok=True)
    jobs = _jobs(root, subjects, params, todo, settings)
    _run_jobs(jobs, workers, progress, desc=f"demo cohort ({', '.join(todo)})" if todo
              else "demo cohort")
    real = "dMRI" in params.get("modalities", ()) and settings["dMRI"].real_dwi
    if real and "dMRI" in todo:
        copy_real_dwi(root)
    atomic_write_text(root / PHENOTYPE, _phenotype_text(subjects))
    realistic = params.get("variant") == "realistic"
    if realistic:
        from umbrella.demo import realistic as model

        spread = _csf_contrast(params)
        factors = ([model.csf_contrast(params["seed"], i, spread) for i in range(len(subjects))]
                   if spread else None)
        atomic_write_text(root / model.PLANTED,
                          model.planted_text(subjects, _latents(subjects, params["seed"]), factors))
        atomic_write_text(root / model.TRUTH,
                          json.dumps(model.truth(params["modalities"], spread), indent=2) + "\n")
    effects = {"realistic": params["planted"]} if realistic else planted_effects()
    manifest = {"generator": GENERATOR, "parameters": params, "planted_effects": effects,
                "subjects": [asdict(s) for s in subjects]}
    if real:
        manifest["real_dwi"] = {k: REAL_DWI[k] for k in ("path", "bval", "bvec")} | {
            "source": f"dipy.data.get_fnames(name={REAL_DWI['name']!r})",
            "note": "real scan of an unknown subject: never labelled"}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
