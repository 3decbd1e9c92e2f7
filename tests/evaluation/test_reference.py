"""The classical reference: planted signals are recovered, test answers are never used, features
are cached, and evaluate / report / CLI show it (see umbrella.evaluation.reference)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from umbrella.data.inputs import ModalityInput
from umbrella.data.records import parse_record
from umbrella.data.volumes import VolumeSpec
from umbrella.errors import ConfigError
from umbrella.evaluation import reference as ref_mod
from umbrella.evaluation.reference import (
    fit_reference,
    fmri_features,
    load_truth,
    paired_comparison,
    volume_features,
)
from umbrella.task_registry import AGE, SEX
from umbrella.tasks.conversations import task_record

SIZE = 16


def _volume(rng, age_signal: float, sex_signal: float) -> np.ndarray:
    """A 16³ 'brain' (a ball of 100 + noise) with two 5³ blocks raised by the planted signals:
    linear signals in a few voxels."""
    grid = np.indices((SIZE,) * 3).astype(float) - (SIZE - 1) / 2
    ball = np.sqrt((grid ** 2).sum(0)) < SIZE / 2 - 1
    vol = np.where(ball, 100.0 + rng.normal(0, 2, (SIZE,) * 3), 0.0)
    vol[3:8, 5:10, 5:10] += age_signal  # two 5³ blocks inside the ball
    vol[8:13, 5:10, 5:10] += sex_signal
    return vol.astype(np.float32)


def _cohort(root, n=60, seed=0):
    """[(subject, age, sex, path)]: age 20-80 raises one block by 0.5/year, male another by 15."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        age = float(rng.uniform(20, 80))
        sex = ("male", "female")[i % 2]
        path = root / f"s{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(_volume(rng, 0.5 * age, 15 if sex == "male" else 0),
                                 np.eye(4)), path)
        out.append((f"s{i:03d}", age, sex, path))
    return out


def _records(cohort, task, split_of, answers=None):
    rows = []
    for subject, age, sex, path in cohort:
        answer = (answers or {}).get(subject) or (AGE.format_answer(age) if task is AGE else sex)
        rows.append(task_record(task, subject_id=subject, answer=answer,
                                images=[{"modality": "T1", "path": str(path)}], study="SYN",
                                split=split_of(subject), question=task.questions[0]))
    return [parse_record(r) for r in rows]


INPUTS = {"T1": ModalityInput("T1", VolumeSpec(image_size=(SIZE,) * 3), tokens=8)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    cohort = _cohort(root / "images")
    split = {s[0]: "train" if i < 44 else "test" for i, s in enumerate(cohort)}
    return root, cohort, split


def _split(records, split):
    return [r for r in records if r.split == split]


def test_features_have_documented_shapes():
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(24, 24, 24))
    pooled = volume_features(np.kron(blocks, np.ones((4, 4, 4))))  # 96³ -> 24³ coarse voxels
    assert pooled.shape == (24 ** 3,) and np.allclose(pooled, blocks.ravel(), atol=1e-5)
    assert volume_features(np.ones((16, 20, 16))).shape == (16 * 20 * 16,)  # never upsampled

    regions = 6 ** 3  # a 12³ window cut into the 6³ grid: 2³-voxel blocks
    series = rng.normal(size=(regions, 40))
    series[1], series[2], series[5] = series[0], -series[0], 7.0  # 5: a constant block
    window = np.kron(series.reshape(6, 6, 6, 40), np.ones((2, 2, 2, 1)))
    feats = fmri_features(window)
    assert feats.shape == (regions * (regions - 1) // 2 + regions,) and np.isfinite(feats).all()
    z = np.zeros((regions, regions))
    z[np.triu_indices(regions, k=1)] = feats[:-regions]
    assert z[0, 1] == pytest.approx(np.arctanh(0.999), abs=1e-5)
    assert z[0, 2] == pytest.approx(-np.arctanh(0.999), abs=1e-5)
    assert np.all(z[:5, 5] == 0) and np.all(z[5, 6:] == 0)  # no correlation with a constant
    r = np.corrcoef(series[3], series[4])[0, 1]
    assert z[3, 4] == pytest.approx(np.arctanh(r), abs=1e-5)
    assert np.allclose(feats[-regions:], series.mean(axis=1), atol=1e-5)


def test_planted_linear_signal_is_recovered(synthetic, tmp_path):
    root, cohort, split = synthetic
    age = _records(cohort, AGE, split.get)
    ref = fit_reference(_split(age, "train"), [(r, None) for r in _split(age, "test")], INPUTS,
                        tmp_path / "cache", progress=False)
    rows = ref.rows
    assert len(rows) == 16 and not ref.skipped
    y = np.array([r["reference_value"] for r in rows])
    f = np.array([r["prediction"] for r in rows])
    assert np.corrcoef(y, f)[0, 1] > 0.9
    train_mean = np.mean([age for s, age, _, _ in cohort if split[s] == "train"])
    assert np.mean(np.abs(f - y)) < 0.6 * np.mean(np.abs(train_mean - y))
    fit = ref.fits[("age", "T1")]
    assert fit.n_train_units == 44 and fit.n_features == SIZE ** 3 and "GroupKFold" in fit.cv
    assert fit.regularisation["alpha"] in ref_mod.ALPHAS
    assert rows[0]["scoring"] == "reference (ridge)" and rows[0]["answer"].endswith(" years")

    sex = _records(cohort, SEX, split.get)
    ref = fit_reference(_split(sex, "train"), [(r, None) for r in _split(sex, "test")], INPUTS,
                        tmp_path / "cache", progress=False)
    correct = sum(r["correct"] for r in ref.rows)
    assert correct >= 14, correct  # of 16 (the block differs by 15 on top of the age effect)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-6 for r in ref.rows)
    assert ref.fits[("sex", "T1")].regularisation["C"] in ref_mod.CS


def test_never_sees_the_evaluated_answers(synthetic, tmp_path):
    root, cohort, split = synthetic
    sex = _records(cohort, SEX, split.get)
    flipped = _records(cohort, SEX, split.get,
                       {s: ("female" if x == "male" else "male") for s, _, x, _ in cohort
                        if split[s] == "test"})
    one = fit_reference(_split(sex, "train"), [(r, None) for r in _split(sex, "test")], INPUTS,
                        tmp_path / "c", progress=False)
    two = fit_reference(_split(flipped, "train"), [(r, None) for r in _split(flipped, "test")],
                        INPUTS, tmp_path / "c", progress=False)
    assert [r["probs"] for r in one.rows] == [r["probs"] for r in two.rows]
    assert [r["reference_label"] for r in one.rows] != [r["reference_label"] for r in two.rows]
    assert sum(a["correct"] != b["correct"] for a, b in zip(one.rows, two.rows, strict=True)) == 16


def test_features_are_cached(synthetic, tmp_path, monkeypatch):
    root, cohort, split = synthetic
    age = _records(cohort, AGE, split.get)
    calls = []
    real = ref_mod.volume_features
    monkeypatch.setattr(ref_mod, "volume_features", lambda v: calls.append(1) or real(v))
    args = (_split(age, "train"), [(r, None) for r in _split(age, "test")], INPUTS, tmp_path)
    first = fit_reference(*args, progress=False)
    assert (first.computed, first.reused, len(calls)) == (60, 0, 60)
    assert len(list(tmp_path.glob("??/*.npy"))) == 60 and len(list(tmp_path.glob("??/*.json"))) == 60
    second = fit_reference(*args, progress=False)
    assert (second.computed, second.reused, len(calls)) == (0, 60, 60)
    assert [r["prediction"] for r in second.rows] == [r["prediction"] for r in first.rows]
    touched = cohort[-1][3]  # a changed file (new mtime) is recomputed, alone
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = fit_reference(*args, progress=False)
    assert (third.computed, third.reused) == (1, 59)
    other = {"T1": ModalityInput("T1", VolumeSpec(image_size=(12,) * 3), tokens=8)}
    fourth = fit_reference(args[0], args[1], other, tmp_path, progress=False)
    assert fourth.computed == 60  # other preprocessing, other features


def _rows_from(labels, preds, subjects):
    return [{"id": f"{s}_sex", "item": f"{s}_sex", "subject_id": s, "task": "sex",
             "modalities": ["T1"], "reference_label": y, "prediction": p, "correct": y == p}
            for s, y, p in zip(subjects, labels, preds, strict=True)]


def test_paired_comparison_verdicts():
    subjects = [f"s{i}" for i in range(40)]
    labels = ["male", "female"] * 20
    perfect = _rows_from(labels, labels, subjects)
    flipped = ["female" if y == "male" else "male" for y in labels]
    half = _rows_from(labels, labels[:20] + flipped[20:], subjects)
    better = paired_comparison(SEX, perfect, half, resamples=300, seed=1)
    assert better["metric"] == "accuracy" and better["advantage"] == pytest.approx(0.5)
    assert better["ci"][0] > 0 and better["verdict"] == "model better than the reference"
    worse = paired_comparison(SEX, half, perfect, resamples=300, seed=1)
    assert worse["ci"][1] < 0 and worse["verdict"].startswith("not better than the reference")
    tie = paired_comparison(SEX, half, half, resamples=300, seed=1)
    assert tie["ci"] == [0.0, 0.0] and tie["verdict"] == "not better than the reference"

    def reg(values):
        return [{"id": s, "item": s, "subject_id": s, "task": "age", "modalities": ["T1"],
                 "reference_value": 50.0, "prediction": v} for s, v in zip(subjects, values,
                                                                          strict=True)]
    close, far = reg([51.0] * 40), reg([60.0] * 40)
    mae = paired_comparison(AGE, close, far, resamples=200, seed=0)
    assert mae["metric"] == "mae" and mae["advantage"] == pytest.approx(9.0)  # lower is better
    assert mae["sign"] == "reference - model" and mae["verdict"] == "model better than the reference"
    with pytest.raises(ValueError, match="different units"):
        paired_comparison(AGE, close, close[:-1], resamples=10)


def test_truth_file_is_validated(tmp_path):
    good = tmp_path / "truth.json"
    good.write_text(json.dumps({"tasks": {"sex": {"T1": {"metric": "accuracy", "achievable": 0.89,
                                                          "note": "planted scale"}}},
                                "planted": {"sex": "scale"}}))
    assert load_truth(good)["tasks"]["sex"]["T1"]["achievable"] == 0.89
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": {"sex": {"T1": {"metric": "auc", "achievable": "high"}}}}))
    with pytest.raises(ConfigError, match=r"bad\.json.*tasks\.sex\.T1\.metric is 'auc'.*"
                                          r"tasks\.sex\.T1\.achievable is 'high', not a number"):
        load_truth(bad)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json is not readable JSON"):
        load_truth(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"list\.json: it has no 'tasks' object"):
        load_truth(tmp_path / "list.json")
    with pytest.raises(ConfigError, match=r"missing\.json does not exist"):
        load_truth(tmp_path / "missing.json")


def _truth(path, **tasks):
    path.write_text(json.dumps({"tasks": tasks, "planted": {"sex": "brain scale ±5%"}}))
    return path


def test_evaluate_reports_the_reference_and_its_verdict(trained_run, tiny_split_records,
                                                        tmp_path):
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.evaluation.report import metrics_table

    result, _ = trained_run
    truth = _truth(tmp_path / "truth.json",
                   sex={"T1": {"metric": "accuracy", "achievable": 0.97, "note": "planted scale"}},
                   age={"T1": {"metric": "mae", "achievable": 3.0}})
    kw = dict(split="test", progress=False, baseline_records=tiny_split_records["train"],
              bootstrap=200, seed=3, plots=False, run_dir=result.run_dir,
              reference_cache=tmp_path / "features")  # the run's own may be filled already
    ev = evaluate_records(result.model_dir, tiny_split_records["test"], tmp_path / "e", **kw,
                          truth=truth)
    on_disk = json.loads((tmp_path / "e" / "metrics.json").read_text())
    ref = on_disk["tasks"]["sex"]["reference"]
    assert ref["predictor"].startswith("L2 logistic regression") and ref["source"] == "train"
    fit = ref["fits"]["T1"]
    n_train = len({r.subject_id for r in tiny_split_records["train"]})
    n_images = n_train + len(tiny_split_records["test"])  # one scan per record
    assert fit["n_train"] == n_train == 14 and fit["regularisation"]["C"] in ref_mod.CS
    assert fit["n_features"] == 24 ** 3 and "average-pooled to 24x24x24" in fit["features"]
    assert ref["n"] == 6 and ref["ci"]["accuracy"][0] <= ref["accuracy"] <= ref["ci"]["accuracy"][1]
    preds = {r["subject_id"]: r["prediction"] for r in ev.predictions}
    assert set(preds) == {r.subject_id for r in tiny_split_records["test"]}
    comp = ref["comparison"]
    model_acc = on_disk["tasks"]["sex"]["accuracy"]
    assert comp["metric"] == "accuracy" and comp["sign"] == "model - reference"
    assert comp["advantage"] == pytest.approx(model_acc - ref["accuracy"])
    assert comp["ci"][0] <= comp["advantage"] <= comp["ci"][1]
    assert comp["verdict"] == ("model better than the reference" if comp["ci"][0] > 0
                               else ref_mod.verdict(comp["ci"]))
    assert on_disk["reference"]["features_computed"] == n_images
    assert on_disk["tasks"]["sex"]["achievable"] == {"metric": "accuracy", "value": 0.97,
                                                     "note": "planted scale", "source": str(truth)}
    table = metrics_table(ev.metrics)
    assert "reference (95% CI)" in table and f"verdict: {comp['verdict']} (accuracy advantage" in table
    assert "achievable: accuracy 0.970 (planted scale)" in table
    assert max(len(line) for line in table.splitlines()) < 220
    report = (tmp_path / "e" / "report.md").read_text()
    assert f"- verdict: {comp['verdict']}" in report and "- reference: L2 logistic" in report
    assert "paired bootstrap" in report and "- achievable: accuracy 0.970" in report

    again = evaluate_records(result.model_dir, tiny_split_records["test"], tmp_path / "e2", **kw)
    assert again.metrics["reference"]["features_computed"] == 0  # all read from the cache
    assert again.metrics["reference"]["features_reused"] == n_images
    assert again.metrics["tasks"]["sex"]["reference"]["accuracy"] == ref["accuracy"]
    assert "achievable" not in again.metrics["tasks"]["sex"]

    off = evaluate_records(result.model_dir, tiny_split_records["test"], tmp_path / "off", **kw,
                           with_reference=False)
    assert "reference" not in off.metrics and "reference" not in off.metrics["tasks"]["sex"]
    assert "verdict" not in metrics_table(off.metrics)
    assert "reference" not in (tmp_path / "off" / "report.md").read_text().lower()
    with pytest.raises(ConfigError, match=r"bad\.json.*tasks\.sex\.T1\.achievable"):
        evaluate_records(result.model_dir, tiny_split_records["test"], tmp_path / "x", **kw,
                         truth=_truth(tmp_path / "bad.json", sex={"T1": {"metric": "accuracy"}}))


def test_free_text_and_untrained_groups_are_named_not_dropped(trained_run, tiny_split_records,
                                                              tmp_path):
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.evaluation.report import metrics_table

    result, _ = trained_run
    test = tiny_split_records["test"]
    ev = evaluate_records(result.model_dir, test, tmp_path / "e", split="test", progress=False,
                          baseline_records=tiny_split_records["train"][:3], bootstrap=0,
                          plots=False)
    ref = ev.metrics["tasks"]["sex"]["reference"]
    assert ref == {"skipped": "T1: only 3 training subjects (at least 4 needed)"}
    assert "reference: none (T1: only 3 training subjects" in metrics_table(ev.metrics)
    none = evaluate_records(result.model_dir, test, tmp_path / "n", split="test", progress=False,
                            bootstrap=0, plots=False)
    assert none.metrics["reference"] == {"skipped": "no training split records were given to "
                                                    "fit it on"}
    assert "The reference is a linear model" not in (tmp_path / "n" / "report.md").read_text()
    assert "The reference is a linear model" in (tmp_path / "e" / "report.md").read_text()


def test_planted_connectivity_is_recovered_from_rsfmri(tmp_path, monkeypatch):
    """Sex planted in functional connectivity only (same anatomy, same mean signal): ten regions
    share a common time course in males, none in females."""
    from umbrella.data.fmri import FmriSpec

    rng = np.random.default_rng(1)
    rows, network = [], rng.choice(6 ** 3, 10, replace=False)
    for i in range(40):
        sex = ("male", "female")[i % 2]
        series = rng.normal(size=(6 ** 3, 30))
        if sex == "male":
            series[network] = 0.8 * rng.normal(size=30) + 0.6 * series[network]
        run = 100 + np.kron(series.reshape(6, 6, 6, 30), np.ones((2, 2, 2, 1)))
        run += rng.normal(0, 0.3, run.shape)
        path = tmp_path / f"r{i:02d}_bold.nii.gz"
        nib.save(nib.Nifti1Image(run.astype(np.float32), np.eye(4)), path)
        rows.append(task_record(SEX, subject_id=f"r{i:02d}", answer=sex,
                                images=[{"modality": "rsfMRI", "path": str(path)}], study="SYN",
                                split="train" if i < 28 else "test", question=SEX.questions[0]))
    records = [parse_record(r) for r in rows]
    inputs = {"rsfMRI": ModalityInput("rsfMRI", FmriSpec(image_size=(12,) * 3,
                                                         sequence_length=20), tokens=8)}
    ref = fit_reference(_split(records, "train"), [(r, None) for r in _split(records, "test")],
                        inputs, tmp_path / "cache", progress=False)
    assert sum(r["correct"] for r in ref.rows) >= 11  # of 12
    fit = ref.fits[("sex", "rsfMRI")]
    assert fit.n_features == 216 * 215 // 2 + 216 and "connectivity of 6x6x6 blocks" in fit.features

    decoded = []  # windows="all": one item per window, each run decoded once
    real = ModalityInput.preprocess
    monkeypatch.setattr(ModalityInput, "preprocess",
                        lambda self, image, rid=None: decoded.append(rid) or real(self, image, rid))
    test = _split(records, "test")[:2]
    items = [(r, s) for r in test for s in inputs["rsfMRI"].window_starts(30)]
    windows = fit_reference(_split(records, "train"), items, inputs, tmp_path / "cache",
                            progress=False)
    assert [r["item"] for r in windows.rows] == [f"{r.id}@w{s}" for r, s in items]
    assert windows.computed == len(items) - 2 and decoded == [r.id for r in test]  # w0 cached
    first = {r["id"]: r["probs"] for r in ref.rows}
    assert [r["probs"] for r in windows.rows if r["window_start"] == 0] == \
        [first[r.id] for r in test]


def test_comparison_records_use_signed_and_absolute_differences():
    from umbrella.evaluation.reference import combine

    pair = parse_record(task_record(
        SEX, subject_id="a", answer="male", images=[{"modality": "T1", "path": "a.nii.gz"}],
        study="S", split="train", question=SEX.questions[0], metadata={"subjects": ["a", "b"]}))
    a, b = np.array([1.0, 5.0]), np.array([3.0, 2.0])
    assert combine(pair, [a, b]).tolist() == [-2.0, 3.0, 2.0, 3.0]
    single = parse_record(task_record(
        SEX, subject_id="a", answer="male", images=[{"modality": "T1", "path": "a.nii.gz"}],
        study="S", split="train", question=SEX.questions[0]))
    assert combine(single, [a, b]).tolist() == [1.0, 5.0, 3.0, 2.0]  # one subject: concatenated
