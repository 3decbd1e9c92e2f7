"""The image-file half of `umbrella validate`: each distinct file is opened once, in a thread
pool, and every voxel read (see :mod:`umbrella.data.validate` for the kinds). Besides whether it
reads, each file's geometry is recorded (voxel sizes, field of view, the share of the head the
configured spatial fitting keeps) and its content hashed, so that one scan named under two
subject ids is found across records.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from tqdm.auto import tqdm

from umbrella.config import ModalityConfig
from umbrella.data.problems import Problem, split_fix
from umbrella.data.volumes import MAX_VOXELS, VolumeSpec, is_compressed, kept_fraction, read_nifti
from umbrella.errors import ConfigError, VolumeError

MIN_KEPT = 0.99  # warn when the spatial fitting keeps less of the head than this
MAX_FOV_MM = 500.0  # a wider image is not a head: its header's voxel sizes are wrong
MAX_ANISOTROPY = 3.0  # warn when the longest voxel side exceeds this many times the shortest
_VOLUME_KINDS = ((r"file not found", "missing_file"), (r"not a regular file", "missing_file"),
                 (r"image has a zero-size dimension", "zero_size"),
                 (r"expected a 3D volume", "wrong_dims"),
                 (r"\d+ of \d+ voxels are NaN or Inf", "nan_inf"),
                 (r"volume is constant", "constant"))  # read_nifti's messages, by how they start
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)
_CHUNK_VOXELS = 2**25  # 4D series are read this many voxels at a time (128 MiB of float32)
_FRAME_PATTERN = re.compile(r"^frame_(\d+)\.pt$")
_CORRUPT_FIX = ("re-download or re-convert the file (e.g. with dcm2niix); "
                "`gzip -t FILE` checks a .nii.gz")
_NAN_FIX = ("re-run the step that produced the image, or replace non-finite voxels "
            "(e.g. numpy.nan_to_num)")
_BLANK_FIX = "the image is blank; check its conversion or drop the record"
_DIMS = {"T1": ("a 3D volume", "select one 3D volume (nibabel `img.slicer[..., 0]`, `fslroi`), or "
                "list a 4D series under rsfMRI / dMRI"),
         "rsfMRI": ("a 4D series (x, y, z, time) or a frame_<i>.pt folder",
                    "point the record at the whole 4D BOLD run, not one volume or a derived map"),
         "dMRI": ("a 3D scalar map (FA, MD, ...) or a 4D DWI series",
                  "point the record at the DWI series (with bval / bvec) or at a 3D map")}


@dataclass(frozen=True)
class Rules:
    min_fmri_frames: int
    specs: dict = field(default_factory=dict)  # modality -> VolumeSpec / FmriSpec of the config
    study_tr: dict = field(default_factory=dict)  # study -> TR in s (None: unknown)


@dataclass
class ImageJob:
    order: int  # position of the first record naming the file
    modality: str
    path: Path
    record_id: str
    bval: Path | None = None
    bvec: Path | None = None
    n_refs: int = 1
    study: str = ""
    refs: list = field(default_factory=list)  # (subject, split, record id) naming this file
    info: dict = field(default_factory=dict)  # filled by the checks: shape, voxel_mm, digest


# ----------------------------------------------------------------------------- image files

def _problem(job: ImageJob, kind: str, message: str, fix: str,
             file: Path | None = None) -> Problem:
    return Problem(kind, job.record_id, str(file or job.path), message, fix)


def _header_problem(job: ImageJob, img: SpatialImage) -> Problem | None:
    """Header facts that would make reading fail badly: checked before any voxel is read."""
    shape, dtype = tuple(int(n) for n in img.shape), img.get_data_dtype()
    if any(n < 0 for n in shape):
        return _problem(job, "corrupt_file", f"header has a negative dimension, shape {shape}",
                        _CORRUPT_FIX)
    if 0 in shape:
        return _problem(job, "zero_size", f"image has a zero-size dimension, shape {shape}",
                        "the file holds no voxels; re-convert it or drop the record")
    if dtype.kind not in "biuf":
        return _problem(job, "corrupt_file", f"voxel type {dtype} is not one real number per voxel "
                        "(RGB or complex)", "convert it to a scalar integer or float image")
    if math.prod(shape[:3]) > MAX_VOXELS:
        return _problem(job, "corrupt_file", f"header declares {shape[:3]} voxels per volume, more "
                        f"than {MAX_VOXELS}: the header is surely corrupt", _CORRUPT_FIX)
    holder = img.file_map.get("image")
    offset = getattr(img.dataobj, "offset", None)
    if holder is not None and holder.filename and offset is not None \
            and not is_compressed(holder.filename):
        need = int(offset) + math.prod(shape) * dtype.itemsize
        have = Path(holder.filename).stat().st_size
        if need > have:
            return _problem(job, "corrupt_file", f"truncated: the header declares {need} bytes "
                            f"(voxels from offset {int(offset)}) but the file has {have}",
                            _CORRUPT_FIX)
    if img.affine is not None and np.isnan(nib.orientations.io_orientation(img.affine)).any():
        return _problem(job, "corrupt_file", "the voxel-to-world affine is degenerate (two axes "
                        "collapse), so the image cannot be reoriented to RAS+",
                        "repair the header's qform / sform (e.g. `fslorient`) or re-convert")
    return None


def _open_image(job: ImageJob) -> tuple[SpatialImage | None, Problem | None]:
    if not job.path.is_file():
        what = "file not found" if not job.path.exists() else "not a regular file"
        return None, _problem(job, "missing_file", f"{job.modality} image: {what}",
                              f"check the image path in the record and "
                              f"dataset.{job.modality}.data_root")
    try:
        img = nib.load(job.path, keep_file_open=True)  # one handle: 4D chunks read in one pass
    except Exception as exc:  # nibabel raises many types for garbage; all mean "not readable"
        return None, _problem(job, "corrupt_file", f"cannot read as NIfTI / MGH volume "
                              f"({type(exc).__name__}: {exc})", _CORRUPT_FIX)
    if not isinstance(img, SpatialImage):
        return None, _problem(job, "corrupt_file", f"{type(img).__name__} is not a volumetric "
                              "image", "point the record at a NIfTI image")
    try:
        return img, _header_problem(job, img)
    except (np.linalg.LinAlgError, ValueError) as exc:
        return None, _problem(job, "corrupt_file", f"unusable header ({type(exc).__name__}: "
                              f"{exc})", _CORRUPT_FIX)


def _dims_problem(job: ImageJob, shape: tuple) -> Problem:
    want, fix = _DIMS[job.modality]
    return _problem(job, "wrong_dims", f"{job.modality} image must be {want}, got shape "
                    f"{tuple(shape)}", fix)


def _core_shape(shape: tuple) -> tuple:
    """The shape without trailing singleton dims beyond the third: (8, 8, 8, 1) -> (8, 8, 8)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_3d(job: ImageJob, rules: Rules) -> list[Problem]:
    """Read every voxel with read_nifti; its VolumeError becomes a problem of the matching kind.
    A volume that reads is hashed (duplicate scans) and its cropping measured."""
    try:
        data, affine = read_nifti(job.path)
    except VolumeError as exc:
        message, fix = split_fix(str(exc).removeprefix(f"file {job.path}: "))
        kind = next((k for pattern, k in _VOLUME_KINDS if re.match(pattern, message)),
                    "corrupt_file")
        return [_problem(job, kind, message, fix or _CORRUPT_FIX)]
    job.info["digest"] = hashlib.blake2b(np.ascontiguousarray(data).tobytes(),
                                         digest_size=16).hexdigest()
    return _crop_warning(job, data, affine, rules)


def _crop_warning(job: ImageJob, data, affine, rules: Rules) -> list[Problem]:
    """head_cropped when the configured spatial fitting keeps less than MIN_KEPT of the head."""
    spec = rules.specs.get(job.modality)
    if spec is None or not isinstance(spec, VolumeSpec):
        return []
    fov = job.info.get("fov_mm", [0.0])
    if max(fov) > MAX_FOV_MM:
        return [_problem(job, "corrupt_file", f"the header's voxel sizes give a field of view of "
                         f"{'x'.join(f'{v:g}' for v in fov)} mm, more than {MAX_FOV_MM:g} mm: "
                         "not a head", "repair the voxel sizes (pixdim) in the header, or "
                         "re-convert the file")]
    try:
        kept = kept_fraction(data, affine, spec)
    except ValueError as exc:
        return [_problem(job, "corrupt_file", f"cannot be resampled for the model input ({exc})",
                         "check the header's voxel sizes and dataset.<modality>.voxel_size / "
                         "field_of_view")]
    job.info["kept"] = round(kept, 4)
    if kept >= MIN_KEPT:
        return []
    spacing = spec.target_spacing()
    where = (f"{'x'.join(f'{v:g}' for v in spacing)} mm voxels" if spacing else
             "the file's own spacing")
    cover = [n * (spacing[i] if spacing else job.info["voxel_mm"][i])
             for i, n in enumerate(spec.image_size)]
    return [_problem(job, "head_cropped", f"the {job.modality} input ({spec.image_size[0]}x"
                     f"{spec.image_size[1]}x{spec.image_size[2]} at {where}, "
                     f"{'x'.join(f'{c:.0f}' for c in cover)} mm) keeps {100 * kept:.1f}% of "
                     f"the head (image {'x'.join(f'{c:.0f}' for c in job.info['fov_mm'])} mm)",
                     f"set dataset.{job.modality}.field_of_view (default 201.6 mm) and leave "
                     f"dataset.{job.modality}.voxel_size unset, or raise "
                     f"dataset.{job.modality}.image_size")]


def _header_facts(job: ImageJob, img: SpatialImage, rules: Rules) -> list[Problem]:
    """Geometry of the file (for the per-study spread) and the header faults that do not stop
    reading: no orientation, extreme anisotropy, an rsfMRI run without TR."""
    shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    order = [int(a) for a in nib.orientations.io_orientation(affine)[:, 0]]
    voxel, size = [0.0] * 3, [0] * 3
    for i, axis in enumerate(order):  # in RAS+ axis order, as the reader returns the data
        voxel[axis], size[axis] = float(spacing[i]), shape[i]
    job.info.update(voxel_mm=[round(v, 3) for v in voxel],
                    fov_mm=[round(v * n, 1) for v, n in zip(voxel, size, strict=True)])
    out = []
    header = img.header
    if "sform_code" in header and int(header["sform_code"]) == 0 \
            and int(header["qform_code"]) == 0:
        out.append(_problem(job, "no_orientation", "sform_code and qform_code are both 0: the "
                            "header holds no orientation, so left/right and the axes are "
                            "guessed", "re-convert from DICOM (dcm2niix writes both), or set "
                            "the codes once the affine is known good (`fslorient "
                            "-setsformcode 1`, nibabel `img.set_sform(affine, code=1)`)"))
    if min(voxel) > 0 and max(voxel) / min(voxel) > MAX_ANISOTROPY:
        out.append(_problem(job, "extreme_anisotropy", f"voxels are {'x'.join(f'{v:g}' for v in voxel)} "
                            f"mm ({max(voxel) / min(voxel):.1f}:1): thick slices blur the "
                            "input along one axis", "use an isotropic (e.g. 3D) acquisition for "
                            "this record, or drop it; resampling cannot restore the detail"))
    if job.modality == "rsfMRI" and len(shape) >= 4:
        tr = float(header.get_zooms()[3]) if len(header.get_zooms()) > 3 else 0.0
        out += _tr_problem(job, tr, rules)
    return out


def _tr_problem(job: ImageJob, tr: float, rules: Rules) -> list[Problem]:
    if math.isfinite(tr) and tr > 0:
        return []
    if rules.study_tr.get(job.study) is not None:
        return []
    name = job.study or "<STUDY>"
    source = "a frame folder has no header" if math.isnan(tr) else f"header pixdim[4] is {tr:g}"
    study = job.study or "(none named in the record)"
    return [_problem(job, "fmri_no_tr", f"the run has no TR ({source}) and study {study}'s TR "
                     "is unknown, so its windows have no known duration",
                     f"set studies.{name}.tr (seconds) in the config, or write the TR into "
                     "the header (dcm2niix does)")]


def _value_problems(job: ImageJob, n_bad: int, total: int, lo: float, hi: float,
                    what: str = "series", file: Path | None = None) -> list[Problem]:
    if n_bad:
        return [_problem(job, "nan_inf", f"{n_bad} of {total} voxels are NaN or Inf", _NAN_FIX,
                         file)]
    if lo == hi:
        return [_problem(job, "constant", f"{what} is constant (every voxel is {lo:g})",
                         _BLANK_FIX, file)]
    return []


def _scan_4d(job: ImageJob, img: SpatialImage) -> list[Problem]:
    """Read a 4D series a chunk of frames at a time; count non-finite voxels, track min / max."""
    shape = tuple(img.shape)
    step = max(1, _CHUNK_VOXELS // math.prod(shape[:3]))
    n_bad, lo, hi = 0, math.inf, -math.inf
    try:
        for start in range(0, shape[3], step):
            block = np.asarray(img.dataobj[:, :, :, start:start + step], dtype=np.float32)
            n_bad += block.size - int(np.count_nonzero(np.isfinite(block)))
            if not n_bad:
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    except _READ_ERRORS as exc:
        return [_problem(job, "corrupt_file", f"cannot read voxel data ({type(exc).__name__}: "
                         f"{exc})", _CORRUPT_FIX)]
    return _value_problems(job, n_bad, math.prod(shape), lo, hi)


def _nifti_stem(path: Path) -> str:
    for suffix in (".nii.gz", ".nii"):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _read_table(path: Path) -> np.ndarray:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError("the file is empty")
    return np.loadtxt(io.StringIO(text), ndmin=2, dtype=np.float64)


def _gradient_problems(job: ImageJob, n_volumes: int) -> list[Problem]:
    """bval / bvec: keys on the image entry, else ``<stem>.bval`` / ``bvals`` beside the image."""
    stem, found, missing = _nifti_stem(job.path), {}, []
    for name, given in (("bval", job.bval), ("bvec", job.bvec)):
        candidates = [given] if given is not None else [
            job.path.with_name(f"{stem}.{name}"), job.path.with_name(f"{name}s")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(" or ".join(str(c) for c in candidates))
        found[name] = hit
    if missing:
        return [_problem(job, "dmri_no_gradients", f"4D diffusion series without gradients: "
                         f"{'; '.join(missing)} not found",
                         f"put {stem}.bval and {stem}.bvec next to the image (as dcm2niix writes "
                         "them), or name them with 'bval' / 'bvec' keys on the image entry")]
    try:
        bvals, bvecs = _read_table(found["bval"]).ravel(), _read_table(found["bvec"])
    except (OSError, ValueError) as exc:
        return [_problem(job, "dmri_bad_gradients", f"cannot read the gradient table ({exc})",
                         "bval: one row of N b-values; bvec: 3 rows of N vectors (FSL format)",
                         found["bval"])]
    if bvals.size != n_volumes or bvecs.shape not in ((3, n_volumes), (n_volumes, 3)):
        return [_problem(job, "dmri_bad_gradients", f"the series has {n_volumes} volumes but "
                         f"{found['bval'].name} holds {bvals.size} b-values and "
                         f"{found['bvec'].name} a {bvecs.shape[0]}x{bvecs.shape[1]} table",
                         "use the bval / bvec written with this image (e.g. by dcm2niix)",
                         found["bval"])]
    if not (np.isfinite(bvals).all() and np.isfinite(bvecs).all()):
        return [_problem(job, "dmri_bad_gradients", "the gradient table holds NaN or Inf",
                         "use the bval / bvec written with this image", found["bval"])]
    return []


def _frame_files(job: ImageJob) -> tuple[list[Path], Problem | None]:
    frames = {int(m.group(1)): p for p in job.path.iterdir()
              if (m := _FRAME_PATTERN.match(p.name))}
    fix = "a frame folder holds frame_0.pt, frame_1.pt, ... (one 3D tensor each)"
    if not frames:
        return [], _problem(job, "missing_file", "rsfMRI folder holds no frame_<i>.pt files", fix)
    gaps = sorted(set(range(max(frames) + 1)) - set(frames))
    if gaps:
        return [], _problem(job, "missing_file", f"frames are not contiguous: {len(gaps)} "
                            f"missing, first frame_{gaps[0]}.pt", fix)
    return [frames[i] for i in range(len(frames))], None


def _check_frame_folder(job: ImageJob, rules: Rules) -> list[Problem]:
    """A SwiFT-style rsfMRI folder: contiguous frame_<i>.pt 3D tensors of one shape."""
    import torch

    files, problem = _frame_files(job)
    if problem is not None:
        return [problem]
    out = [_too_short(job, len(files), rules)] if len(files) < rules.min_fmri_frames else []
    shape, n_bad, lo, hi = None, 0, math.inf, -math.inf
    for file in files:
        try:
            frame = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch.load raises many types for a bad file
            return out + [_problem(job, "corrupt_file", f"cannot read with torch.load("
                                   f"weights_only=True) ({type(exc).__name__})",
                                   "re-save it as a plain tensor with torch.save", file)]
        if not isinstance(frame, torch.Tensor) or frame.ndim != 3 or 0 in frame.shape:
            got = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
            return out + [_problem(job, "wrong_dims", f"a frame must be a non-empty 3D tensor, "
                                   f"got {got}", "each frame file holds one (X, Y, Z) tensor",
                                   file)]
        if shape is not None and tuple(frame.shape) != shape:
            return out + [_problem(job, "wrong_dims", f"frame has shape {tuple(frame.shape)}, "
                                   f"frame_0.pt has {shape}", "re-export the run on one grid",
                                   file)]
        shape, data = tuple(frame.shape), frame.detach().to(torch.float32).numpy()
        n_bad += data.size - int(np.count_nonzero(np.isfinite(data)))
        if not n_bad:
            lo, hi = min(lo, float(data.min())), max(hi, float(data.max()))
    return out + _value_problems(job, n_bad, math.prod(shape) * len(files), lo, hi, "run")


def _too_short(job: ImageJob, n_frames: int, rules: Rules) -> Problem:
    return _problem(job, "fmri_too_short", f"run has {n_frames} frames; one window needs "
                    f"{rules.min_fmri_frames}", "drop the record, or lower "
                    "dataset.rsfMRI.sequence_length / stride_within_seq (a window spans "
                    "(sequence_length - 1) * stride_within_seq + 1 frames)")


def _check_t1(job: ImageJob, rules: Rules) -> list[Problem]:
    img, problem = _open_image(job)
    if problem is not None:
        return [problem]
    if len(_core_shape(img.shape)) != 3:
        return [_dims_problem(job, img.shape)]
    return _header_facts(job, img, rules) + _read_3d(job, rules)


def _check_fmri(job: ImageJob, rules: Rules) -> list[Problem]:
    if job.path.is_dir():
        return _check_frame_folder(job, rules) + _tr_problem(job, math.nan, rules)
    img, problem = _open_image(job)
    if problem is not None:
        return [problem]
    shape = tuple(img.shape)
    if len(shape) < 4 or any(n != 1 for n in shape[4:]):
        return [_dims_problem(job, shape)]
    out = [_too_short(job, shape[3], rules)] if shape[3] < rules.min_fmri_frames else []
    job.info["digest"] = _file_digest(job.path)
    return _header_facts(job, img, rules) + out + _scan_4d(job, img)


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dmri(job: ImageJob, rules: Rules) -> list[Problem]:
    img, problem = _open_image(job)
    if problem is not None:
        return [problem]
    core = _core_shape(img.shape)
    if len(core) == 3:
        return _header_facts(job, img, rules) + _read_3d(job, rules)
    if len(core) != 4:
        return [_dims_problem(job, img.shape)]
    job.info["digest"] = _file_digest(job.path)
    return _header_facts(job, img, rules) + _gradient_problems(job, core[3]) + \
        _scan_4d(job, img)


_CHECKS = {"T1": _check_t1, "rsfMRI": _check_fmri, "dMRI": _check_dmri}


def _check_image(job: ImageJob, rules: Rules) -> list[Problem]:
    """Every problem of one image file; never raises."""
    try:
        problems = _CHECKS[job.modality](job, rules)
    except Exception as exc:  # one odd file must not stop the report on all the others
        problems = [_problem(job, "corrupt_file", f"unexpected {type(exc).__name__} while reading: "
                             f"{exc}", _CORRUPT_FIX + "; if other tools read it, report an "
                             "umbrella bug")]
    if job.n_refs > 1:
        problems = [replace(p, message=f"{p.message} (file named by {job.n_refs} records)")
                    for p in problems]
    return problems


def check_images(jobs: list[ImageJob], rules: Rules, workers: int,
                  progress: bool) -> list[list[Problem]]:
    results: list[list[Problem]] = [[] for _ in jobs]
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        bar = tqdm(total=len(jobs), desc="validate images", unit="file", disable=not progress)
        with bar:
            futures = {pool.submit(_check_image, job, rules): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    finally:  # on Ctrl-C, files not yet started are dropped instead of read to the end
        pool.shutdown(wait=True, cancel_futures=True)
    return results


class StudyTr(dict):
    """study -> TR from the registry with the config's overrides; None when unknown."""

    def __init__(self, overrides: dict):
        super().__init__()
        self.overrides = overrides

    def get(self, study, default=None):
        from umbrella.data.studies import get_study

        if study not in self:
            given = self.overrides.get(study) or {}
            try:
                self[study] = get_study(study, given).tr if study else None
            except ConfigError:
                tr = given.get("tr") if isinstance(given, dict) else None
                self[study] = tr
        return dict.get(self, study, default)


def default_specs(specs: dict | None) -> dict:
    if specs is not None:
        return dict(specs)
    from umbrella.data.catalog import volume_spec

    section = ModalityConfig()
    return {"T1": volume_spec(section), "dMRI": volume_spec(section)}


def duplicate_scans(jobs: list[ImageJob]) -> list[tuple[int, Problem]]:
    """One scan named under two subject ids: the same file, or files with the same voxels
    (3D) / bytes (4D). A leak when the two subjects sit in different splits."""
    groups: dict[str, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.info.get("digest") or f"path:{job.path}", []).append(job)
    out = []
    for group in groups.values():
        refs = [(s, split, rid, job) for job in group for s, split, rid in job.refs]
        if not refs:
            continue
        first = refs[0]
        for subject, split, rid, job in refs[1:]:
            if subject == first[0]:
                continue
            leak = f"; a leak: split {first[1]!r} vs {split!r}" if split != first[1] else ""
            same = "the same file" if job.path == first[3].path else \
                f"the same voxels as {first[3].path}"
            out.append((job.order, Problem(
                "duplicate_scan", rid, str(job.path), f"subject {subject!r} names {same}, also "
                f"named for subject {first[0]!r} in record {first[2]!r}{leak}",
                "keep each scan under its one subject (check the id mapping and copied "
                "files); splits are by subject")))
            break
    return out


def geometry_spread(jobs: list[ImageJob]) -> dict[str, dict]:
    """{"<study> <modality>": {images, voxel_mm: (min, max), fov_mm: (min, max)}} per axis."""
    grouped: dict[str, list[dict]] = {}
    for job in jobs:
        if "voxel_mm" in job.info:
            grouped.setdefault(f"{job.study or '-'} {job.modality}", []).append(job.info)
    out = {}
    for name, infos in sorted(grouped.items()):
        voxel = np.array([i["voxel_mm"] for i in infos])
        fov = np.array([i["fov_mm"] for i in infos])
        out[name] = {"images": len(infos),
                     "voxel_mm": (voxel.min(0).round(3).tolist(), voxel.max(0).round(3).tolist()),
                     "fov_mm": (fov.min(0).round(1).tolist(), fov.max(0).round(1).tolist())}
    return out
