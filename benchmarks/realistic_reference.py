"""realistic_reference: how far the classical reference gets on the realistic demo cohort, and
whether the planted age signal is still there for a nonlinear reader.

Builds the realistic cohort (T1 only; reused when already built in the work folder) and its
records exactly as ``umbrella demo --cohort realistic --build-only`` does, reads the images with
the experiments' 3 mm configuration (``dataset.T1.voxel_size=[3,3,3]``, ``image_size=[64,80,64]``,
the rest the demo config's defaults), then on the held-out test split:

- **reference**: :func:`umbrella.evaluation.reference.fit_reference`, as ``umbrella evaluate``
  fits it (24³-pooled voxels of the preprocessed inputs, ridge / L2 logistic regression, CV on the
  training split); age MAE and sex accuracy on the test subjects.
- **nonlinear check**: a few hand-made features of the same preprocessed images that a
  volume-preserving deformation leaves unchanged to first order (the brain's voxel count, the
  histogram of the brain's intensities, the count of CSF-dark voxels in a central box around the
  ventricles), standardised, with their squares, and a cross-validated ridge on the training
  split: age MAE on the test subjects. It is a rough reader, not an optimal one.
- **oracle**: the Bayes estimator from the planted brain age (planted.csv) on the same test
  subjects, and truth.json's achievable figures.

Usage: python -m benchmarks.realistic_reference [--subjects 400] [--seed 0] [--workdir DIR]
                                                [--workers 1]
Prints one JSON object (also written to ``<workdir>/realistic_<n>/reference.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

THREE_MM = ["dataset.T1.voxel_size=[3,3,3]", "dataset.T1.image_size=[64,80,64]"]
HIST_EDGES = np.linspace(-2.5, 2.0, 19)  # z-scored brain intensities (CSF dark, WM bright)


def hand_features(vol: np.ndarray, voxel_mm: float = 3.0) -> np.ndarray:
    """Brain voxel count, the brain's intensity histogram (fractions), and the counts of dark
    voxels in a central box (the ventricles' neighbourhood, wide enough for any head position)."""
    background = float(np.median(vol[:4]))  # the first slices hold no brain
    brain = vol > background + 0.5
    shape = np.asarray(vol.shape)
    centre = (shape - 1) / 2 + np.array([0.0, 16.0, 10.0]) / voxel_mm  # ventricle centre, RAS
    half = np.array([32.0, 40.0, 28.0]) / voxel_mm
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    box = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    box_brain = brain[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    hist = np.histogram(vol[brain], HIST_EDGES)[0] / max(int(brain.sum()), 1)
    dark = [float(((box < t) & box_brain).sum()) for t in (-1.5, -1.0, -0.5, 0.0)]
    return np.array([float(brain.sum()), *hist, *dark], dtype=np.float64)


def _ridge_cv(X_train, y_train, X_test):
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    model = make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False),
                          StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 29)))
    model.fit(X_train, y_train)
    return model.predict(X_test)


def _logistic_cv(X_train, y_train, X_test):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 3, 15).tolist(),
                                                                 max_iter=2000))
    model.fit(X_train, y_train)
    return model.predict(X_test)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    common.setup(threads=1)
    from umbrella.data.catalog import by_split, load_config_records, modality_inputs
    from umbrella.demo.realistic import bayes_age
    from umbrella.demo.run import prepare_demo
    from umbrella.evaluation.reference import fit_reference

    work = Path(args.workdir or "/tmp/umbrella-realistic-reference")
    out = work / f"realistic_{args.subjects}"
    t0 = time.time()
    plan = prepare_demo(out, cohort="realistic", seed=args.seed, n_subjects=args.subjects,
                        overrides=THREE_MM, modalities=("T1",), workers=args.workers,
                        progress=False, log=lambda *a, **k: None)
    build_s = time.time() - t0
    splits = by_split(load_config_records(plan.config))
    inputs = modality_inputs(plan.config)
    t0 = time.time()
    result = {"subjects": args.subjects, "seed": args.seed, "build_s": round(build_s, 1),
              "config": THREE_MM, "machine": common.machine()}
    for task in ("age", "sex"):
        train = [r for r in splits["train"] if r.task == task]
        test = [r for r in splits["test"] if r.task == task]
        ref = fit_reference(train, [(r, None) for r in test], inputs, out / "reference_cache",
                            progress=False)
        rows = ref.rows
        fit = ref.fits[(task, "T1")]
        if task == "age":
            value = float(np.mean([r["abs_error"] for r in rows]))
            result["reference_age_mae"] = round(value, 3)
            result["reference_age_alpha"] = fit.regularisation["alpha"]
        else:
            value = float(np.mean([r["correct"] for r in rows]))
            result["reference_sex_accuracy"] = round(value, 4)
    result["reference_s"] = round(time.time() - t0, 1)

    # the nonlinear check on hand-made features of the same preprocessed images
    t0 = time.time()
    feats, sex, age, planted_b = {}, {}, {}, {}
    with open(plan.cohort.root / "planted.csv", encoding="utf-8") as f:
        planted = {row["subject_id"]: row for row in csv.DictReader(f)}
    for split in ("train", "test"):
        for rec in splits[split]:
            if rec.task != "age" or rec.subject_id in feats:
                continue
            vol = inputs["T1"].preprocess(rec.images[0], record_id=rec.id)
            feats[rec.subject_id] = hand_features(np.asarray(vol))
            row = planted[rec.subject_id]
            age[rec.subject_id], sex[rec.subject_id] = float(row["age"]), row["sex"]
            planted_b[rec.subject_id] = float(row["brain_age"])
    ids = {s: sorted({r.subject_id for r in splits[s] if r.task == "age"})
           for s in ("train", "test")}
    X = {s: np.stack([feats[i] for i in ids[s]]) for s in ids}
    y = {s: np.array([age[i] for i in ids[s]]) for s in ids}
    pred = np.clip(_ridge_cv(X["train"], y["train"], X["test"]), 0, 120)
    result["hand_features_age_mae"] = round(float(np.mean(np.abs(pred - y["test"]))), 3)
    sexes = {s: np.array([sex[i] for i in ids[s]]) for s in ids}
    guess = _logistic_cv(X["train"][:, :1], sexes["train"], X["test"][:, :1])
    result["brain_count_sex_accuracy"] = round(float(np.mean(guess == sexes["test"])), 4)
    oracle = bayes_age(np.array([planted_b[i] for i in ids["test"]]))
    result["bayes_from_planted_age_mae_test"] = round(float(np.mean(np.abs(oracle - y["test"]))), 3)
    result["hand_features_s"] = round(time.time() - t0, 1)
    truth = json.loads((plan.cohort.root / "truth.json").read_text(encoding="utf-8"))
    result["achievable"] = {t: truth["tasks"][t]["T1"]["achievable"] for t in ("age", "sex")}
    result["n_train"], result["n_test"] = len(ids["train"]), len(ids["test"])
    text = json.dumps(result, indent=1)
    (out / "reference.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return result


if __name__ == "__main__":
    main()
