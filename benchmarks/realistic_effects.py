"""realistic_effects: which planted effect does the classical reference read? A fast ablation.

Synthesizes the realistic cohort's T1 directly on a 3 mm grid (75 x 85 x 75 over the realistic
field of view, in memory: no NIfTI round trip, no 2 -> 3 mm resampling, so figures differ a
little from :mod:`benchmarks.realistic_reference`), preprocesses it as the 3 mm experiments do
(``voxel_size=[3,3,3]``, ``image_size=[64,80,64]``, z-score over the brain), takes the reference's
features (:func:`umbrella.evaluation.reference.volume_features`) and fits its age model
(:func:`umbrella.evaluation.reference.fit_group`) on subjects 0-239, scored on the last 80. Ages
and hidden variables are the cohort's (seed 0, sexes alternating). ``--without`` switches planted
effects or the individual anatomy off, e.g. ``--without cortex`` (no GM thinning or sulcal
widening: ventricles only), ``--without ventricles``, ``--without anatomy``; ``NAME=VALUE`` sets a
constant of :mod:`umbrella.demo.realistic` (e.g. ``ANATOMY_RMS_MM=6``) before anything is drawn.

Usage: python -m benchmarks.realistic_effects [--subjects 400] [--without anatomy,cortex]
                                              [--csf-contrast C] [NAME=VALUE ...]
Prints one JSON line: the reference's age MAE on the 80 test subjects, its ridge alpha, and the
Bayes estimator's MAE from the planted brain age on the same subjects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

GRID, VOXEL = (75, 85, 75), 3.0


class _NoAnatomy:
    @staticmethod
    def displace(points):
        return points

    displace_grid = displace


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=400)
    p.add_argument("--without", default="", help="comma list: anatomy, cortex, ventricles")
    p.add_argument("--csf-contrast", type=float, default=0.0, metavar="C",
                   help="T1 scans' CSF level varies by U[1-C, 1+C] (default 0: off)")
    p.add_argument("constants", nargs="*", help="NAME=VALUE constants of umbrella.demo.realistic")
    args = p.parse_args(argv)
    common.setup(threads=1)
    from umbrella.data.volumes import VolumeSpec, finish_volume
    from umbrella.demo import anatomy as A
    from umbrella.demo import realistic as R
    from umbrella.evaluation.reference import fit_group, volume_features
    from umbrella.task_registry import AGE

    for item in args.constants:
        name, value = item.split("=", 1)
        if not hasattr(R, name):
            raise SystemExit(f"umbrella.demo.realistic has no {name}")
        setattr(R, name, float(value))
    off = {w for w in args.without.split(",") if w}
    if "anatomy" in off:
        R.individual_anatomy = lambda seed, index: _NoAnatomy()
    if "cortex" in off:
        R.GM_THINNING = R.SULCAL_WIDENING = 0.0
    if "ventricles" in off:
        R.VENTRICLE_GAIN = 0.0
    n = args.subjects
    ages = R.draw_ages(n, 0)
    spec = VolumeSpec(image_size=(64, 80, 64), voxel_size=(VOXEL,) * 3)
    X, brain_age = [], []
    t0 = time.time()
    for i in range(n):
        sex = "male" if i % 2 else "female"
        lat = R.subject_latents(0, i, sex, float(ages[i]))
        job = A._Job(i, 0, sex, float(ages[i]), GRID, VOXEL, 0.0, "", variant="realistic",
                     scale=lat.scale, brain_age=lat.brain_age,
                     csf_factor=R.csf_contrast(0, i, args.csf_contrast))
        vol = finish_volume(R.synthesize_t1(job), A.output_affine(GRID, VOXEL), spec)
        X.append(volume_features(np.asarray(vol)))
        brain_age.append(lat.brain_age)
    X, y = np.stack(X).astype(np.float64), ages.astype(np.float64)
    train, test = np.arange(0, min(240, n - 80)), np.arange(n - 80, n)
    fit = fit_group(AGE, "T1", X[train], list(y[train]), [str(i) for i in train], "")
    pred = fit.model.predict(X[test])
    bayes = R.bayes_age(np.asarray(brain_age)[test])
    result = {"without": sorted(off), "constants": args.constants, "subjects": n,
              "csf_contrast": args.csf_contrast,
              "reference_age_mae": round(float(np.abs(pred - y[test]).mean()), 3),
              "alpha": fit.regularisation["alpha"],
              "bayes_from_planted_age_mae": round(float(np.abs(bayes - y[test]).mean()), 3),
              "s_per_subject": round((time.time() - t0) / n, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
