"""data_path: samples/s of one T1 volume and one rsfMRI window through each way of reading it.

All variants read the same files, written into one temp folder, and are timed interleaved
(medians over repetitions). The baseline is decode-per-access; the limit is a plain numpy copy
of the same bytes from the page cache.

T1 (96³ from the demo cohort builder):
    cache (dataset)      InstructionDataset[i] with a PreprocessCache: one copy of the float16 entry
    decode               InstructionDataset[i] without cache: nibabel load + z-score each access
    decode + resample    the same from a 1.2 mm 168³ image, resampled to 2.1 mm (MONAI-style)
    limit: numpy copy    np.array(memmap) of the entry's float16 bytes (a fresh array)

rsfMRI window (20 frames of a 96³ x 60-frame run):
    cache (dataset)      InstructionDataset[i]: one float16 copy of the memmap slice, handed
                         over as a (1, D, H, W, T) view (the collator casts while batching)
    cache, f32 no transpose   memmap slice -> float32 kept in (T, D, H, W) memory order (what a
                         float32 cast here would cost)
    cache, f16 no transpose   the dataset's path without the dataset around it
    frame folder         torch.load(weights_only=True) of 20 frame_<i>.pt (float16, as SwiFT
                         stored them) + stack + float32
    decode .nii.gz       InstructionDataset[i] without cache: preprocess_fmri (int16 .nii.gz)
    decode .nii          the same from an uncompressed float32 .nii
    limit: numpy copy    np.array(memmap[t0:t1]) of the window's float16 bytes (a fresh array)

Usage: python -m benchmarks.data_path [--quick | --smoke] [--reps N] [--profile]
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    side: int  # T1 and rsfMRI spatial size (cubic)
    frames: int  # frames of the synthetic run
    window: int  # frames per window
    items: int  # distinct dataset items cycled through (windows differ per item)
    calls: int  # calls per repetition of the fast variants
    slow_calls: int  # calls per repetition of the decode variants


SIZES = {"full": Sizes(96, 60, 20, 8, 8, 1), "quick": Sizes(96, 60, 20, 8, 4, 1),
         "smoke": Sizes(16, 6, 3, 3, 1, 1)}


def make_inputs(root: Path, s: Sizes) -> dict:
    """Demo T1 volumes (2.1 mm and 1.2 mm grids), a 4D run as .nii.gz (int16) and .nii (float32),
    and the run's preprocessed frames as a float16 frame folder."""
    import nibabel as nib
    import torch

    from umbrella.data.fmri import FmriSpec, preprocess_fmri
    from umbrella.demo.cohort import build_demo_cohort

    vox = 2.1 * 96 / s.side
    low = build_demo_cohort(root / "t1", 2, image_size=(s.side,) * 3, voxel_mm=vox, workers=1,
                            progress=False)
    high = build_demo_cohort(root / "t1_hi", 2, image_size=(s.side * 7 // 4,) * 3,
                             voxel_mm=vox * 4 / 7, workers=1, progress=False)
    t1 = low.root / low.subjects[0].t1_path
    img = nib.load(t1)
    base = img.get_fdata(dtype=np.float32)
    rng = np.random.default_rng(0)
    drift = 1 + 0.01 * np.sin(np.arange(s.frames, dtype=np.float32) / 3)
    run = base[..., None] * drift + rng.standard_normal((*base.shape, s.frames), np.float32) * 10
    run = np.abs(run, out=run)
    gz, plain = root / "bold.nii.gz", root / "bold.nii"
    out = nib.Nifti1Image(run, img.affine)
    out.set_data_dtype(np.int16)  # as scanners write it; nibabel sets scl_slope
    out.to_filename(gz)
    nib.Nifti1Image(run, img.affine).to_filename(plain)
    del run, out
    frames = root / "frames"
    frames.mkdir()
    pre = preprocess_fmri(gz, FmriSpec(image_size=(s.side,) * 3, sequence_length=s.window))
    for t in range(pre.shape[0]):
        torch.save(torch.from_numpy(pre[t].astype(np.float16)), frames / f"frame_{t}.pt")
    return {"t1": t1, "t1_hi": high.root / high.subjects[0].t1_path, "bold_gz": gz,
            "bold_nii": plain, "frames": frames, "vox": vox}


def build_variants(root: Path, s: Sizes, files: dict) -> tuple[dict, dict, dict]:
    """(T1 variants, rsfMRI variants, checks): each variant maps a call index to one sample."""
    import torch

    from umbrella.data.cache import PreprocessCache
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.fmri import FmriSpec
    from umbrella.data.inputs import ModalityInput
    from umbrella.data.volumes import VolumeSpec

    enc = common.prompt_encoder()
    cache = PreprocessCache(root / "cache")
    side = (s.side,) * 3
    t1_in = {"T1": ModalityInput("T1", VolumeSpec(image_size=side), 8)}
    t1_rs = {"T1": ModalityInput("T1", VolumeSpec(image_size=side, voxel_size=(files["vox"],) * 3), 8)}
    spec = FmriSpec(image_size=side, sequence_length=s.window)
    fm_in = {"rsfMRI": ModalityInput("rsfMRI", spec, 8)}

    def dataset(modality, path, inputs, **kw):
        recs = [common.sex_record(i, modality, path) for i in range(s.items)]
        return InstructionDataset(recs, enc, inputs, **kw)

    def image_of(ds):
        return lambda i: ds[i % len(ds)]["images"][0][1]

    t1_cache = dataset("T1", files["t1"], t1_in, cache=cache)
    fm_cache = dataset("rsfMRI", files["bold_gz"], fm_in, cache=cache)
    t1_entry = t1_cache.load_array(t1_cache.records[0], 0)  # builds the entries once
    run_entry = fm_cache.load_array(fm_cache.records[0], 0)
    mod = fm_in["rsfMRI"]
    starts = mod.window_starts(run_entry.shape[0])
    image = fm_cache.records[0].images[0]

    def entry():
        return cache.get_or_build(image.path, "rsfMRI", mod.cache_params(), None)

    def stored_order(i, dtype=np.float32):
        t0 = starts[(i * 7) % len(starts)]
        window = np.array(entry()[t0:t0 + s.window], dtype=dtype)  # (T, D, H, W)
        return torch.from_numpy(window).permute(1, 2, 3, 0)[None]  # (1, D, H, W, T) view

    def frame_folder(i):
        t0 = starts[(i * 7) % len(starts)]
        frames = [torch.load(files["frames"] / f"frame_{t}.pt", weights_only=True)
                  for t in range(t0, t0 + s.window)]
        return torch.stack(frames, dim=-1).float()[None]

    def run_copy(i):
        t0 = starts[(i * 7) % len(starts)]
        return np.array(run_entry[t0:t0 + s.window])

    t1 = {"cache (dataset)": image_of(t1_cache),
          "decode": image_of(dataset("T1", files["t1"], t1_in)),
          "decode + resample": image_of(dataset("T1", files["t1_hi"], t1_rs)),
          "limit: numpy copy": lambda i: np.array(t1_entry)}
    fm = {"cache (dataset)": image_of(fm_cache),
          "cache, f32 no transpose": stored_order,
          "cache, f16 no transpose": lambda i: stored_order(i, np.float16),
          "frame folder": frame_folder,
          "decode .nii.gz": image_of(dataset("rsfMRI", files["bold_gz"], fm_in)),
          "decode .nii": image_of(dataset("rsfMRI", files["bold_nii"], fm_in)),
          "limit: numpy copy": run_copy}
    checks = _checks(fm_cache, dataset("rsfMRI", files["bold_gz"], fm_in), t1_cache,
                     dataset("T1", files["t1"], t1_in), stored_order, frame_folder, starts, s)
    return t1, fm, checks


def _checks(fm_cache, fm_decode, t1_cache, t1_decode, stored_order, frame_folder, starts,
            s: Sizes) -> dict:
    """Every way of reading gives the same sample (float16 rounding allowed)."""
    import torch

    cached = fm_cache[0]["images"][0][1].float()
    decoded = fm_decode[0]["images"][0][1].float()
    start = fm_cache._window_start(0, 0, np.zeros((s.frames, 1, 1, 1)), fm_cache.inputs["rsfMRI"])
    i = next(k for k in range(len(starts) * 7) if starts[(k * 7) % len(starts)] == start)
    shape = (1, s.side, s.side, s.side, s.window)
    return {
        "rsfmri_shape": tuple(cached.shape) == shape,
        "rsfmri_cache_matches_decode": bool(torch.allclose(cached, decoded, atol=0.02, rtol=0.01)),
        "rsfmri_no_transpose_equals_dataset": bool(torch.equal(stored_order(i), cached)),
        "rsfmri_frames_equal_dataset": bool(torch.equal(frame_folder(i), cached)),
        "t1_cache_matches_decode": bool(torch.allclose(t1_cache[0]["images"][0][1].float(),
                                                       t1_decode[0]["images"][0][1].float(),
                                                       atol=0.02, rtol=0.01)),
    }


def _rows(name: str, timings: dict, baseline: str, limit: str, window_mb: float) -> tuple:
    results, rows = {}, []
    base, lim = common.median(timings[baseline]), common.median(timings[limit])
    for variant, secs in timings.items():
        med = common.median(secs)
        results[variant] = {**common.summary(secs), "speedup_vs_decode": base / med,
                            "times_the_limit": med / lim}
        rows.append([name, variant, 1 / med, med * 1e3, base / med, med / lim])
    results["_bytes_read_mb"] = window_mb
    return results, rows


def run(opts: common.Options, profile: bool = False) -> dict:
    common.setup(opts.threads)
    s = SIZES[opts.mode]
    with tempfile.TemporaryDirectory(prefix="umbrella-bench-data-") as tmp:
        root = Path(tmp)
        files = make_inputs(root, s)
        t1, fm, checks = build_variants(root, s, files)
        fast = {n: s.calls for n in t1} | {"decode": s.slow_calls, "decode + resample": s.slow_calls}
        t1_times = common.time_interleaved(t1, opts.reps, fast)
        fast = {n: s.calls for n in fm} | {"decode .nii.gz": s.slow_calls,
                                            "decode .nii": s.slow_calls}
        fm_times = common.time_interleaved(fm, opts.reps, fast)
        floor = _memcpy_floor(root, s, opts.reps)
        profiles = ({"T1 cache (dataset)": common.profile_calls(t1["cache (dataset)"], 50),
                     "rsfMRI cache (dataset)": common.profile_calls(fm["cache (dataset)"], 8)}
                    if profile else {})
    t1_res, t1_rows = _rows("T1", t1_times, "decode", "limit: numpy copy", s.side ** 3 * 2 / 1e6)
    fm_res, fm_rows = _rows("rsfMRI", fm_times, "decode .nii.gz", "limit: numpy copy",
                            s.side ** 3 * s.window * 2 / 1e6)
    current = fm_res["cache (dataset)"]
    targets = {
        "rsfmri_cache_vs_decode_at_least_20x": {"value": current["speedup_vs_decode"],
                                                "met": current["speedup_vs_decode"] >= 20},
        "rsfmri_cache_within_3x_of_copy": {"value": current["times_the_limit"],
                                           "met": current["times_the_limit"] <= 3},
    }
    results = {"T1": t1_res, "rsfMRI": fm_res, "memcpy_into_reused_buffer_ms": floor,
               "checks": checks, "targets": targets, "profiles": profiles}
    notes = [f"window = {s.window} frames of {s.side}³ ({s.side ** 3 * s.window * 2 / 1e6:.1f} MB "
             f"float16 read, {s.side ** 3 * s.window * 4 / 1e6:.1f} MB float32 out); "
             f"reps={opts.reps}, median",
             f"memcpy of the window's float16 bytes into a reused buffer: {floor:.2f} ms "
             "(no page faults: the floor below the 'limit' row)",
             f"checks: {checks}",
             *(f"target {k}: {v['value']:.3g} -> {'met' if v['met'] else 'NOT met'}"
               for k, v in targets.items()),
             *(f"profile {name}: " + "; ".join(f"{r['function']} {r['share']:.0%}" for r in rows[:6])
               for name, rows in profiles.items())]
    return common.emit("data_path", {"mode": opts.mode, "reps": opts.reps, **vars(s)}, results,
                       ["modality", "variant", "samples/s", "ms/sample", "x vs decode",
                        "x limit time"], t1_rows + fm_rows, notes, opts.quiet)


def _memcpy_floor(root: Path, s: Sizes, reps: int) -> float:
    """ms to copy a window's float16 bytes from an open memmap into a reused array."""
    from umbrella.data.cache import PreprocessCache

    entry = max(PreprocessCache(root / "cache").entries(), key=lambda e: e["file_bytes"])
    run = np.load(entry["path"], mmap_mode="r")
    out = np.empty((s.window, *run.shape[1:]), dtype=run.dtype)
    times = common.time_interleaved({"copy": lambda i: np.copyto(out, run[:s.window])}, max(reps, 5),
                                    s.calls)
    return common.median(times["copy"]) * 1e3


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true",
                   help="also cProfile the dataset's cache path (own time per function)")
    args = p.parse_args(argv)
    return run(common.options(args), profile=args.profile)


if __name__ == "__main__":
    main()
