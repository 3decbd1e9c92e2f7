"""unseen_layout: a cohort laid out as this project never writes one, through the public CLI with
the config `umbrella prepare` writes.

The realistic demo cohort of ``benchmarks/learning.py`` (the same generator and planted effects,
2,000 subjects, T1 with scanner contrast) is rendered at another resolution, 3 mm (75 x 86 x 75
voxels; the learning benchmark writes 4 mm and the recipe reads 4 mm, so every scan is
downsampled, as a real cohort's 1 mm scans would be), then handed over as another site would: a
BIDS tree with a session (``sub-XXXX/ses-01/anat/sub-XXXX_ses-01_T1w.nii.gz``), every scan
reoriented exactly (axes permuted and flipped, no interpolation) to a sagittal-first PIR
orientation, intensities rescaled to int16 0..4095 by each scan's 99.9th percentile, and
``participants.tsv`` coding sex as F / M with the age under another column name
(``age_at_scan``). Then, per seed, exactly what a researcher types (each a subprocess of
``python -m umbrella``)::

    umbrella prepare --phenotype bids/participants.tsv --bids bids --study UNSEEN \\
        --tasks sex,age --age-column age_at_scan --out records
    umbrella train -c records/train.yaml training.seed=N
    umbrella evaluate --model records/runs/<run>/seed_N --truth cohort/truth.json

No setting is chosen here: train.yaml names the recipe (``recipe: t1_two_stage``) and the
preprocessing cache ``records/cache`` as prepare wrote them. ``records/`` (records, runs,
cache) is removed first, so every call times the whole path from a fresh prepare; the cohort and
the BIDS tree are reused. The table is the learning benchmark's (model mean +- sd over seeds, the reference of the same
evaluation, the training-split baseline, the cohort's achievable value and issue 10's targets).
The split is prepare's own (70 / 15 / 15 by subject), not the learning benchmark's 60 / 20 / 20.

Usage: python -m benchmarks.unseen_layout [--seeds 0,1,2] [--subjects 2000] [--workdir DIR]
                                          [--smoke] [KEY=VALUE ...]
KEY=VALUE overrides go to every `umbrella train` (none by default).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, learning  # noqa: E402
from umbrella.demo.cohort import build_demo_cohort  # noqa: E402

GRID, VOXEL_MM, ORIENTATION = (75, 86, 75), 3.0, "PIR"
STUDY = "UNSEEN"


def rewrite_scan(job: tuple[Path, Path]) -> None:
    """One T1 scan reoriented exactly to ORIENTATION and rescaled to int16 (see the module
    docstring), written at ``dest`` (through a temporary name: a cut-short rewrite is redone)."""
    import nibabel as nib
    import numpy as np
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    src, dest = job
    img = nib.load(src)
    img = img.as_reoriented(ornt_transform(io_orientation(img.affine),
                                           axcodes2ornt(tuple(ORIENTATION))))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = np.clip(data / np.percentile(data, 99.9) * 3000, 0, 4095).astype(np.int16)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part.nii.gz")
    nib.save(out, tmp)
    os.replace(tmp, dest)


def rewrite_cohort(cohort_root: Path, bids: Path, workers: int = 2, quiet: bool = False) -> Path:
    """The demo cohort under ``cohort_root`` as a BIDS tree at ``bids`` (reused when complete:
    participants.tsv is written last)."""
    table = bids / "participants.tsv"
    if table.is_file():
        return table
    rows = list(csv.DictReader((cohort_root / "phenotype.csv").open()))
    jobs = [(cohort_root / "images" / f"{r['subject_id']}_T1w.nii.gz",
             bids / r["subject_id"] / "ses-01" / "anat" / f"{r['subject_id']}_ses-01_T1w.nii.gz")
            for r in rows]
    start = time.time()
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(rewrite_scan, jobs, chunksize=16):
            pass
    lines = ["participant_id\tsex\tage_at_scan"] + [
        f"{r['subject_id']}\t{'M' if r['sex'] == 'male' else 'F'}\t{float(r['age']):g}"
        for r in rows]
    tmp = table.with_name(".participants.tsv.part")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, table)
    if not quiet:
        print(f"rewrote {len(rows)} scans into {bids} ({time.time() - start:.0f} s)")
    return table


def umbrella(args: list[str], log: Path) -> float:
    """``python -m umbrella ARGS`` with its output in ``log``; returns the seconds it took."""
    start = time.time()
    with log.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "umbrella", *args], stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"umbrella {args[0]} failed (exit {code}); see {log}")
    return time.time() - start


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--subjects", type=int, default=learning.SUBJECTS, help="cohort size")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every `umbrella train`")
    args = p.parse_args(argv)
    opts = common.options(args)
    common.setup(opts.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    extra, n_subjects = list(args.overrides), args.subjects
    if opts.mode == "quick":
        seeds = seeds[:1]
    if opts.mode == "smoke":  # tiny cohort, few steps: checks that the benchmark runs
        n_subjects, seeds = 40, seeds[:1]
        extra += ["pretrain.epochs=1", "training.max_steps=4", "training.eval_steps=2",
                  "evaluation.regression_step=5"]
    opts.workdir.mkdir(parents=True, exist_ok=True)
    root = opts.workdir / f"unseen_{n_subjects}_{VOXEL_MM:g}mm_csf{learning.CSF_CONTRAST:g}"
    cohort = build_demo_cohort(root / "cohort", n_subjects, variant="realistic", image_size=GRID,
                               voxel_mm=VOXEL_MM, csf_contrast=learning.CSF_CONTRAST,
                               progress=not opts.quiet)
    table = rewrite_cohort(cohort.root, root / "bids", quiet=opts.quiet)
    records = root / "records"  # prepare's output, its runs and its cache: new for every call,
    shutil.rmtree(records, ignore_errors=True)  # so that nothing of an earlier call is reused
    prepare_s = umbrella(["prepare", "--phenotype", str(table), "--bids", str(root / "bids"),
                          "--study", STUDY, "--tasks", "sex,age", "--age-column", "age_at_scan",
                          "--out", str(records)], root / "prepare.log")
    summary = json.loads((records / "prepare_summary.json").read_text())
    truth = cohort.root / "truth.json"
    runs = []
    for seed in seeds:
        train_s = umbrella(["train", "-c", str(records / "train.yaml"), "--quiet",
                            f"training.seed={seed}", *extra], root / f"train_seed{seed}.log")
        run_dir = next((records / "runs").glob(f"age+sex__*/seed_{seed}"))
        eval_s = umbrella(["evaluate", "--model", str(run_dir), "--truth", str(truth),
                           "--out", str(run_dir / "evaluation")], root / f"evaluate_seed{seed}.log")
        metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
        runs.append({"seed": seed, "run_dir": str(run_dir), "train_s": round(train_s, 1),
                     "eval_s": round(eval_s, 1), "tasks": learning.task_facts(metrics)})
    tasks, rows = learning.summarise("T1", runs, json.loads(truth.read_text()))
    notes = [f"seeds {seeds}; `umbrella train -c {records / 'train.yaml'}` (recipe "
             f"{summary['recipe']}), then `umbrella evaluate`; splits {summary['subjects']}",
             f"scans: BIDS, {ORIENTATION}, {VOXEL_MM:g} mm, int16; logs under {root}"]
    return common.emit("unseen_layout", {"mode": opts.mode, "seeds": seeds,
                                         "subjects": n_subjects, "overrides": extra,
                                         "recipe": summary["recipe"]},
                       {"T1": {"runs": runs, "tasks": tasks}, "prepare_s": round(prepare_s, 1),
                        "splits": summary["subjects"],
                        "checks": {f"T1.{t}": v["met"] for t, v in tasks.items() if "met" in v}},
                       ["task", "model", "reference", "baseline", "achievable", "target"],
                       rows, notes, quiet=opts.quiet)


if __name__ == "__main__":
    main()
