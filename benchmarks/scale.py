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
    sampler_epoch    one epoch of ModalityBatchSampler (batch 16) over that dataset
    train_to_step_1  (--train) `umbrella train` with max_steps=1, tiny preset, wall to exit

Ratios are 40k / 4k of the same run (10 = linear). Targets: every stage within 12x; the train run
at 40k (an upper bound of the time to its first step) within 60 s.

Usage: python -m benchmarks.scale [--smoke] [--subjects 4000,40000] [--train] [--quiet]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
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


def stage_sampler_epoch(root: Path, out: Path) -> dict:
    from umbrella.data.sampling import ModalityBatchSampler

    ds = _dataset(_config(root, _records_files(out), out))
    t = time.perf_counter()
    sampler = ModalityBatchSampler(ds.item_groups(), 16, seed=0)
    n = sum(len(b) for b in sampler)
    return {"seconds": time.perf_counter() - t, "samples": n}


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


def _child(fn, root, out, queue):
    try:
        result = fn(root, out)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        queue.put(result)
    except BaseException as exc:  # reported by the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_stage(name: str, root: Path, out: Path) -> dict:
    """One stage in a forked process: a fresh peak RSS per stage."""
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
    args = p.parse_args(argv)
    opts = common.options(args)
    common.setup(opts.threads)
    small, large = (int(x) for x in (args.subjects or
                                     ("400,4000" if opts.mode == "smoke" else "4000,40000")).split(","))
    stages = STAGES + (("train",) if args.train else ())
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
                results[n][stage] = run_stage(stage, root, out)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratios = {s: results[large][s]["seconds"] / results[small][s]["seconds"] for s in stages}
    rss = {s: results[large][s]["peak_rss_mib"] / results[small][s]["peak_rss_mib"]
           for s in stages}
    factor = large / small
    checks = {f"{s}_within_{1.2 * factor:g}x": ratios[s] <= 1.2 * factor for s in stages}
    if "train" in stages:
        checks["train_to_step_1_under_60s"] = results[large]["train"]["seconds"] <= 60
    targets = {f"{s}_time_ratio": {"value": ratios[s], "met": ratios[s] <= 1.2 * factor}
               for s in stages}
    rows = [[s, results[small][s]["seconds"], results[large][s]["seconds"], ratios[s],
             results[small][s]["peak_rss_mib"], results[large][s]["peak_rss_mib"], rss[s]]
            for s in stages]
    config = {"mode": opts.mode, "subjects": [small, large], "fmri_every": FMRI_EVERY,
              "images": "tiny real NIfTI (8^3 T1, 8^3 x one-window rsfMRI), copies of one file with distinct first voxels"}
    payload = {"stages": {str(n): r for n, r in results.items()}, "time_ratio": ratios,
               "peak_rss_ratio": rss, "checks": checks, "targets": targets}
    return common.emit("scale", config, payload,
                       ["stage", f"{small} s", f"{large} s", "time x", f"{small} MiB",
                        f"{large} MiB", "RSS x"], rows,
                       [f"ratios: {large} / {small} subjects of the same run ({factor:g} = linear)"],
                       opts.quiet)


if __name__ == "__main__":
    main()
