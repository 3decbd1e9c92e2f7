"""scale: the data path's cost at UK Biobank size, 4,000 against 40,000 subjects in the same run.

A synthetic UKB-style cohort (phenotype CSV with ``eid``, ``31-0.0`` sex, ``21003-2.0`` age) with
one T1 per subject and an rsfMRI run for one subject in eight (5,000 at 40,000). Images are tiny
but real NIfTI files: one 8³ int16 T1 and one 8³ x F rsfMRI run (F = one window of the default
``dataset.rsfMRI``) written once and copied under every subject's name with its first voxels
set to the subject's index (distinct content: the validator reports one scan under two subject
ids), so every record points at its own file, every stat and header read happens, and building
45,000 files takes seconds. What is timed, per scale, each stage in its own forked process (its peak RSS is that
process's ``ru_maxrss``):

    prepare          tasks.prepare.prepare: CSV + image patterns -> records, splits
    validate         data.validate.validate_config: every record and image header (2 threads)
    cache_index      training.run.data_source: cache key of every referenced image (empty cache)
    dataset_start    records loaded, split, InstructionDataset of the training split built
    sampler_epoch    one epoch of ModalityBatchSampler (batch 16) over that dataset (median of
                     SAMPLER_EPOCHS epochs in the process: one epoch is milliseconds)
    train_to_step_1  (--train) `umbrella train` with max_steps=1, tiny preset, wall to exit

Ratios are 40k / 4k of the same run (10 = linear). Targets: every stage within 12x; the train run
at 40k (an upper bound of the time to its first step) within 60 s.

Repeats (``--reps``, 3; 1 with ``--smoke``): each cheap stage (``REPEATED``, under ~20 s at 40k)
runs that many times, each time in a fresh forked process; its ``seconds`` is the median, and
``repeats_s`` / ``repeats_peak_rss_mib`` hold every run, so one run slowed by another job on the
machine does not decide a ratio. Validate, the frame cache build and train run once.

Frame folders (``--frames 20,200,1200``, the default; ``--frames ""`` skips them): a fixed number
of rsfMRI runs (``--frame-runs``, 100) stored as SwiFT-style folders of ``frame_<i>.pt`` files
(8³ float32 tensors, the same bytes in every frame), once per frame count. Per frame count,
each in its own forked process:

    frame_identity       training.run.data_source over the runs (every frame's stat; empty cache)
    frame_dataset_start  the training InstructionDataset of the runs (random windows)
    frame_cache_build    umbrella's cache build of every run (reads every frame; 1 process)
    frame_loader_epoch   one epoch of the training dataset from the cache, batch 4, 0 workers

Their ratios are largest / smallest frame count. Target: the loader's memory does not grow with
the frames on disk (peak RSS of frame_loader_epoch over the process's RSS when it started, at
the largest frame count, within 8 MiB of that at the smallest).

Usage: python -m benchmarks.scale [--smoke] [--subjects 4000,40000] [--train] [--reps 3]
       [--frames 20,200,1200] [--frame-runs 100] [--quiet]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

FMRI_EVERY = 8  # one subject in eight has rsfMRI: 5,000 of 40,000
STAGES = ("prepare", "validate", "cache_index", "dataset_start", "sampler_epoch")
# stages cheap enough to run --reps times (each well under 20 s at 40,000 subjects)
REPEATED = frozenset({"prepare", "cache_index", "dataset_start", "sampler_epoch",
                      "frame_identity", "frame_dataset_start", "frame_loader_epoch"})


def _write_distinct(blob: bytearray, offset: int, index: int, path: Path) -> None:
    """The source image's bytes with its first two int16 voxels set to ``index``: every subject
    has its own content (the validator reports one scan under two subject ids as a leak)."""
    blob[offset:offset + 4] = struct.pack("<hh", index & 0x7FFF, index >> 15)
    path.write_bytes(blob)


def build_cohort(root: Path, n: int) -> Path:
    """phenotype.csv + t1/<eid>.nii (+ func/<eid>.nii for every FMRI_EVERY-th subject)."""
    import nibabel as nib
    import numpy as np

    from umbrella.config import ModalityConfig
    from umbrella.data.validate import fmri_window_frames

    rng = np.random.default_rng(0)
    frames = fmri_window_frames(ModalityConfig())
    for sub in ("t1", "func"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    t1 = root / "t1_source.nii"
    fmri = root / "fmri_source.nii"
    nib.save(nib.Nifti1Image(rng.integers(0, 1000, (8, 8, 8), dtype=np.int16), np.eye(4) * 12),
             t1)
    nib.save(nib.Nifti1Image(rng.integers(0, 1000, (8, 8, 8, frames), dtype=np.int16),
                             np.diag([12, 12, 12, 1])), fmri)
    rows = ["eid,31-0.0,21003-2.0"]
    t1_blob, fmri_blob = bytearray(t1.read_bytes()), bytearray(fmri.read_bytes())
    offset = int(nib.load(t1).dataobj.offset)
    for i in range(n):
        eid = str(1_000_000 + i)
        _write_distinct(t1_blob, offset, i, root / "t1" / f"{eid}.nii")
        if i % FMRI_EVERY == 0:
            _write_distinct(fmri_blob, offset, i, root / "func" / f"{eid}.nii")
        rows.append(f"{eid},{i % 2},{45 + i % 35}")
    (root / "phenotype.csv").write_text("\n".join(rows) + "\n")
    return root


def _config(root: Path, records: dict, out: Path):
    from umbrella.config import load_config

    over = [f"dataset.T1.records=[{records['T1']}]", f"dataset.T1.data_root={root}",
            "dataset.T1.image_size=[8,8,8]", "dataset.T1.patch_size=[4,4,4]",
            f"dataset.rsfMRI.records=[{records['rsfMRI']}]", f"dataset.rsfMRI.data_root={root}",
            "dataset.rsfMRI.image_size=[8,8,8]", "dataset.rsfMRI.patch_size=[4,4,4]",
            f"dataset.cache_dir={out / 'cache'}", f"training.output_dir={out / 'runs'}",
            "training.max_steps=1", "training.batch_size=4", "training.eval_steps=0",
            "training.warmup_steps=0", "training.threads=2", "model.vocab_size=300"]
    return load_config(None, over)


def _records_files(out: Path) -> dict:
    """The records file prepare wrote per modality (sex task)."""
    files = {}
    for modality in ("T1", "rsfMRI"):
        found = sorted(out.glob(f"*{modality}*.jsonl")) or sorted(out.glob(f"*{modality}*.json"))
        if not found:
            raise SystemExit(f"prepare wrote no {modality} records in {out}")
        files[modality] = found[0]
    return files


def stage_prepare(root: Path, out: Path) -> dict:
    from umbrella.tasks.prepare import prepare

    t = time.perf_counter()
    summary = prepare(root / "phenotype.csv", out, tasks=["sex"], study="UKB",
                      images={"T1": "t1/{subject}.nii", "rsfMRI": "func/{subject}.nii"})
    return {"seconds": time.perf_counter() - t, "records": summary.records}


def stage_validate(root: Path, out: Path) -> dict:
    from umbrella.data.validate import validate_config

    cfg = _config(root, _records_files(out), out)
    t = time.perf_counter()
    report = validate_config(cfg, workers=2, progress=False)
    return {"seconds": time.perf_counter() - t, "problems": len(report.problems),
            "records": report.n_records}


def stage_cache_index(root: Path, out: Path) -> dict:
    from umbrella.data.catalog import load_config_records
    from umbrella.training.run import data_source

    cfg = _config(root, _records_files(out), out)
    records = load_config_records(cfg)
    t = time.perf_counter()
    line = data_source(cfg, records)
    return {"seconds": time.perf_counter() - t, "line": line[:160]}


def _dataset(cfg):
    from umbrella.data.catalog import by_split, load_config_records, modality_inputs
    from umbrella.data.dataset import InstructionDataset
    encoder = common.prompt_encoder()
    records = load_config_records(cfg)
    train = by_split(records)["train"]
    return InstructionDataset(train, encoder, modality_inputs(cfg), seed=0)


def stage_dataset_start(root: Path, out: Path) -> dict:
    cfg = _config(root, _records_files(out), out)
    t = time.perf_counter()  # includes training the 300-entry tokenizer (a fixed cost)
    ds = _dataset(cfg)
    return {"seconds": time.perf_counter() - t, "items": len(ds)}


SAMPLER_EPOCHS = 7  # epochs timed per process: one epoch is 1-10 ms, one preemption is as long


def stage_sampler_epoch(root: Path, out: Path) -> dict:
    """Median over SAMPLER_EPOCHS epochs (0, 1, ...) of: sampler built, every batch drawn."""
    from umbrella.data.sampling import ModalityBatchSampler

    ds = _dataset(_config(root, _records_files(out), out))
    epochs, counts = [], set()
    for epoch in range(SAMPLER_EPOCHS):
        t = time.perf_counter()
        sampler = ModalityBatchSampler(ds.item_groups(), 16, seed=0)
        sampler.set_epoch(epoch)
        counts.add(sum(len(b) for b in sampler))
        epochs.append(time.perf_counter() - t)
    (n,) = counts
    return {"seconds": statistics.median(epochs), "samples": n, "epochs_s": epochs}


def stage_train(root: Path, out: Path) -> dict:
    from umbrella.config import save_config

    cfg = _config(root, _records_files(out), out)
    save_config(cfg, out / "train.yaml")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "umbrella.cli", "train", "-c",
                          str(out / "train.yaml"), "--quiet"], env=env, capture_output=True,
                         text=True, cwd=common.REPO)
    if run.returncode:
        raise SystemExit(f"umbrella train failed:\n{run.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    return {"seconds": time.perf_counter() - t, "child_peak_rss_mib": peak}


# ------------------------------------------------------------------------------------ frame folders

FRAME_STAGES = ("frame_identity", "frame_dataset_start", "frame_cache_build",
                "frame_loader_epoch")
LOADER_GROWTH_MIB = 8.0  # allowed difference in the loader's RSS growth, largest vs smallest


def build_frame_cohort(root: Path, runs: int, frames: int) -> Path:
    """runs/<eid>/frame_<i>.pt (one 8³ float32 tensor per frame) + records.jsonl (all train)."""
    import io
    import json

    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    torch.save(torch.from_numpy(rng.normal(100, 20, (8, 8, 8)).astype(np.float32)), buf)
    blob = buf.getvalue()
    lines = []
    for i in range(runs):
        eid = str(2_000_000 + i)
        folder = root / "runs" / eid
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            (folder / f"frame_{f}.pt").write_bytes(blob)
        lines.append(json.dumps({
            "id": f"{eid}_sex_rsfMRI", "subject_id": eid, "study": "UKB", "task": "sex",
            "split": "train", "images": [{"modality": "rsfMRI", "path": f"runs/{eid}"}],
            "conversations": [{"from": "human", "value": "<image>\nWhat is the sex of this subject?"},
                              {"from": "gpt", "value": ("female", "male")[i % 2]}]}))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _frame_config(root: Path, out: Path):
    from umbrella.config import load_config

    over = [f"dataset.rsfMRI.records=[{root / 'records.jsonl'}]",
            f"dataset.rsfMRI.data_root={root}", "dataset.rsfMRI.image_size=[8,8,8]",
            "dataset.rsfMRI.patch_size=[4,4,4]", f"dataset.cache_dir={out / 'cache'}",
            f"training.output_dir={out / 'runs'}", "training.threads=2", "model.vocab_size=300"]
    return load_config(None, over)


def _rss_now_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**10
    return 0.0


def stage_frame_identity(root: Path, out: Path) -> dict:
    from umbrella.data.catalog import load_config_records
    from umbrella.training.run import data_source

    cfg = _frame_config(root, out)
    records = load_config_records(cfg)
    t = time.perf_counter()
    line = data_source(cfg, records)
    return {"seconds": time.perf_counter() - t, "line": line[:160]}


def stage_frame_dataset_start(root: Path, out: Path) -> dict:
    cfg = _frame_config(root, out)
    t = time.perf_counter()
    ds = _dataset(cfg)
    return {"seconds": time.perf_counter() - t, "items": len(ds)}


def stage_frame_cache_build(root: Path, out: Path) -> dict:
    from umbrella.data.cache import PreprocessCache, build_cache
    from umbrella.data.catalog import cache_jobs

    cfg = _frame_config(root, out)
    jobs = cache_jobs(cfg)
    t = time.perf_counter()
    report = build_cache(PreprocessCache(cfg.dataset.cache_dir), jobs, workers=1, progress=False)
    if report.failed:
        raise SystemExit(f"cache build failed: {report.failed[:3]}")
    return {"seconds": time.perf_counter() - t, "built": report.built + report.reused}


def stage_frame_loader_epoch(root: Path, out: Path) -> dict:
    from torch.utils.data import DataLoader

    from umbrella.data.cache import PreprocessCache
    from umbrella.data.catalog import by_split, load_config_records, modality_inputs
    from umbrella.data.collate import BrainCollator
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.sampling import ModalityBatchSampler

    cfg = _frame_config(root, out)
    start_rss = _rss_now_mib()
    t = time.perf_counter()
    train = by_split(load_config_records(cfg))["train"]
    ds = InstructionDataset(train, common.prompt_encoder(), modality_inputs(cfg), seed=0,
                            cache=PreprocessCache(cfg.dataset.cache_dir), windows="random")
    loader = DataLoader(ds, batch_sampler=ModalityBatchSampler(ds.item_groups(), 4, seed=0),
                        collate_fn=BrainCollator(common.prompt_encoder().tok.pad_token_id),
                        num_workers=0)
    n = sum(len(batch["ids"]) for batch in loader)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - start_rss
    return {"seconds": time.perf_counter() - t, "samples": n, "start_rss_mib": start_rss,
            "rss_growth_mib": growth}


def _child(fn, root, out, queue):
    try:
        result = fn(root, out)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        queue.put(result)
    except BaseException as exc:  # reported by the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_stage(name: str, root: Path, out: Path, repeat: int = 1) -> dict:
    """The stage ``repeat`` times (1 unless it is in REPEATED), each in its own forked process: a
    fresh peak RSS per run. The result is the run of median time (for an even count the lower
    middle run's fields, with ``seconds`` the mean of the middle two), with every run's seconds
    and peak RSS in ``repeats_s`` and ``repeats_peak_rss_mib``."""
    runs = [_run_once(name, root, out) for _ in range(repeat if name in REPEATED else 1)]
    ranked = sorted(runs, key=lambda r: r["seconds"])
    result = dict(ranked[(len(ranked) - 1) // 2])
    result["seconds"] = statistics.median(r["seconds"] for r in runs)
    result["repeats_s"] = [r["seconds"] for r in runs]
    result["repeats_peak_rss_mib"] = [r["peak_rss_mib"] for r in runs]
    return result


def _run_once(name: str, root: Path, out: Path) -> dict:
    fn = globals()[f"stage_{name}"]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, root, out, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise SystemExit(f"stage {name} failed: {result['error']}")
    return result


def _preload() -> None:
    """Import what the stages use once, before forking: no stage's clock includes imports."""
    import umbrella.data.dataset  # noqa: F401
    import umbrella.data.sampling  # noqa: F401
    import umbrella.data.validate  # noqa: F401
    import umbrella.tasks.prepare  # noqa: F401
    import umbrella.training.run  # noqa: F401

    common.prompt_encoder()


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--subjects", default=None, help="two scales, e.g. 4000,40000 (the default)")
    p.add_argument("--train", action="store_true", help="also time `umbrella train` (1 step)")
    p.add_argument("--frames", default=None,
                   help="frames per rsfMRI frame folder, e.g. 20,200,1200 (the default); '' skips")
    p.add_argument("--frame-runs", type=int, default=None, help="frame folders per count (100)")
    args = p.parse_args(argv)
    opts = common.options(args)
    # --reps: runs of each cheap stage, each in a fresh process, median kept (3 here; smoke 1)
    repeat = args.reps if args.reps is not None else (1 if opts.mode == "smoke" else 3)
    common.setup(opts.threads)
    small, large = (int(x) for x in (args.subjects or
                                     ("400,4000" if opts.mode == "smoke" else "4000,40000")).split(","))
    stages = STAGES + (("train",) if args.train else ())
    smoke = opts.mode == "smoke"
    frame_counts = [int(x) for x in (args.frames if args.frames is not None else
                                     ("20,40" if smoke else "20,200,1200")).split(",") if x]
    frame_runs = args.frame_runs or (6 if smoke else 100)
    _preload()
    base = Path(tempfile.mkdtemp(prefix="umbrella-scale-"))
    results: dict = {}
    try:
        for n in (small, large):
            root, out = base / f"cohort{n}", base / f"records{n}"
            t = time.perf_counter()
            build_cohort(root, n)
            results[n] = {"build_cohort_s": time.perf_counter() - t}
            for stage in stages:
                results[n][stage] = run_stage(stage, root, out, repeat)
            shutil.rmtree(root, ignore_errors=True)  # frees the disk before the next cohort
            shutil.rmtree(out, ignore_errors=True)
        frame_results: dict = {}
        for f in frame_counts:
            root, out = base / f"frames{f}", base / f"frame_out{f}"
            t = time.perf_counter()
            build_frame_cohort(root, frame_runs, f)
            frame_results[f] = {"build_cohort_s": time.perf_counter() - t}
            for stage in FRAME_STAGES:
                frame_results[f][stage] = run_stage(stage, root, out, repeat)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratios = {s: results[large][s]["seconds"] / results[small][s]["seconds"] for s in stages}
    rss = {s: results[large][s]["peak_rss_mib"] / results[small][s]["peak_rss_mib"]
           for s in stages}
    factor = large / small
    checks = {f"{s}_within_{1.2 * factor:g}x": ratios[s] <= 1.2 * factor for s in stages}
    if "train" in stages:
        checks["train_to_step_1_under_60s"] = results[large]["train"]["seconds"] <= 60
    frame_summary = {}
    if len(frame_counts) >= 2:
        lo, hi = min(frame_counts), max(frame_counts)
        fr = frame_results
        frame_summary = {
            "frames": frame_counts, "runs": frame_runs,
            "time_ratio": {s: fr[hi][s]["seconds"] / fr[lo][s]["seconds"] for s in FRAME_STAGES},
            "loader_rss_growth_mib": {str(f): fr[f]["frame_loader_epoch"]["rss_growth_mib"]
                                      for f in frame_counts}}
        growth = (fr[hi]["frame_loader_epoch"]["rss_growth_mib"]
                  - fr[lo]["frame_loader_epoch"]["rss_growth_mib"])
        frame_summary["loader_rss_growth_difference_mib"] = growth
        checks[f"frame_loader_memory_flat_within_{LOADER_GROWTH_MIB:g}mib"] = \
            growth <= LOADER_GROWTH_MIB
        ds_ratio = frame_summary["time_ratio"]["frame_dataset_start"]
        checks["frame_dataset_start_flat_within_2x"] = ds_ratio <= 2.0
    targets = {f"{s}_time_ratio": {"value": ratios[s], "met": ratios[s] <= 1.2 * factor}
               for s in stages}
    rows = [[s, results[small][s]["seconds"], results[large][s]["seconds"], ratios[s],
             results[small][s]["peak_rss_mib"], results[large][s]["peak_rss_mib"], rss[s]]
            for s in stages]
    config = {"mode": opts.mode, "subjects": [small, large], "fmri_every": FMRI_EVERY,
              "repeat": repeat, "repeated_stages": sorted(REPEATED),
              "images": "tiny real NIfTI (8^3 T1, 8^3 x one-window rsfMRI), copies of one file with distinct first voxels",
              "frame_folders": {"frames": frame_counts, "runs": frame_runs,
                                "frame": "8^3 float32 torch.save, the same bytes in every frame"}}
    payload = {"stages": {str(n): r for n, r in results.items()}, "time_ratio": ratios,
               "peak_rss_ratio": rss, "checks": checks, "targets": targets}
    if frame_counts:
        payload["frame_folders"] = {"stages": {str(f): r for f, r in frame_results.items()},
                                    **frame_summary}
        for f in frame_counts:
            rows += [[f"{s} ({frame_runs} runs x {f} frames)", frame_results[f][s]["seconds"],
                      "", "", frame_results[f][s]["peak_rss_mib"], "", ""] for s in FRAME_STAGES]
    return common.emit("scale", config, payload,
                       ["stage", f"{small} s", f"{large} s", "time x", f"{small} MiB",
                        f"{large} MiB", "RSS x"], rows,
                       [f"ratios: {large} / {small} subjects of the same run ({factor:g} = linear)",
                        f"seconds: median of {repeat} runs (fresh processes) for "
                        f"{', '.join(sorted(REPEATED))}; one run for the others"],
                       opts.quiet)


if __name__ == "__main__":
    main()
