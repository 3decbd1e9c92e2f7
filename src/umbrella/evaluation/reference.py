"""The classical reference: a linear model on the same preprocessed inputs the VLM saw, fitted on
the training split, scored on the evaluated split beside the model.

Per task and modality group (the records' modalities joined by "+", as the metrics group them):

    preprocessed image (ModalityInput.preprocess: resampling, cropping, normalisation; for rsfMRI
    the window the model reads) ──features──▶ one vector per image ──record──▶ one per record
    training split records ──StandardScaler + PCA + ridge / logistic regression (CV)──▶ a fit
    evaluated split records ──▶ rows in the model's format ──summary──▶ the same metrics and CIs

Features (:data:`FEATURE_VERSION`):
- T1 and dMRI maps (D, H, W): the volume average-pooled to at most :data:`VOLUME_GRID` coarse
  voxels per axis (``adaptive_avg_pool3d``; 96³ -> 24³, i.e. 4×4×4 blocks), flattened.
- rsfMRI window (D, H, W, L): the volume cut into a :data:`FMRI_GRID`³ grid of blocks; each block's
  mean time course gives a region. Features: the Fisher-z (``arctanh``, r clipped to ±0.999)
  upper triangle of the regions' correlation matrix (parcel-free connectivity), plus the window's
  mean image at the same grid. Blocks outside the brain are constant and carry no weight.
- A record with several images of one subject: the images' features concatenated in order. A
  comparison record about two subjects (``metadata.subjects``): ``[a - b, |a - b|]`` of the two
  images' features, so a linear model can answer both "which one" (sign) and "same or
  different" (magnitude) questions.
- Free-text tasks get no reference (the entry says so).

Fitting: features are standardised (the scaler is fitted on the training split: unsupervised)
and rotated onto their principal components, all of them kept (an exact rotation: ridge and L2
logistic regression give the same predictions with or without it, since both penalties are
rotation-invariant and the solution lies in the span of the training rows; it only makes every
fit n-dimensional instead of one dimension per feature). Then ridge regression (regression
tasks, ``RidgeCV``, alpha from :data:`ALPHAS`) or L2 logistic regression (classification,
``LogisticRegressionCV``, C from :data:`CS`, chosen by log-loss). The regularisation is chosen by
cross-validation on the training split only, folds grouped by subject (pair for comparison
records): GroupKFold for regression, StratifiedGroupKFold for classification, up to 5 folds.
rsfMRI training records contribute their first window; evaluated records are scored per item
(every window with ``windows="all"``) and aggregated per subject exactly as the model's answers
are. Regression predictions are clipped to the task's plausible range. The reference never sees
the evaluated split's answers: only its images.

Cache: features are computed once per image and stored in a :class:`PreprocessCache` (float16
``.npy`` + JSON sidecar, atomic writes) under ``cache_dir``, keyed by the image's identity (path,
size, mtime), its preprocessing parameters, the feature parameters and version, and the rsfMRI
window start. A second evaluation reads them back instead of decoding the images again.

Verdict: a paired bootstrap over subjects (the same resamples of units as the metrics' CIs) of the
model's *advantage* in the primary metric: accuracy (model minus reference) for classification,
MAE (reference minus model) for regression, so that a positive advantage always favours the
model. "model better than the reference" when its 95% CI lies above 0; "not better" otherwise
(with "the reference is better" when the CI lies below 0).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from umbrella.data.cache import PreprocessCache, cache_key
from umbrella.data.dataset import window_tensor
from umbrella.data.inputs import ModalityInput
from umbrella.data.records import Record
from umbrella.errors import ConfigError
from umbrella.evaluation.metrics import bootstrap_ci, encode_labels
from umbrella.evaluation.summary import (
    aggregate_classification,
    aggregate_regression,
    group_units,
    unit_key,
)
from umbrella.evaluation.summary import task_metrics as score_rows
from umbrella.task_registry import TaskSpec, task_for_record

FEATURE_VERSION = 1
VOLUME_GRID = 24  # coarse voxels per axis (at most) for T1 / dMRI
FMRI_GRID = 6  # blocks per axis whose time courses are correlated (216 regions)
ALPHAS = tuple(float(a) for a in np.logspace(-2, 8, 21))  # ridge strengths tried
CS = tuple(float(c) for c in np.logspace(-6, 4, 21))  # inverse logistic strengths tried
MAX_FOLDS = 5
MIN_SUBJECTS = 4  # fewer training subjects (pairs) than this: no reference
PRIMARY = {"classification": "accuracy", "regression": "mae"}
LOWER_IS_BETTER = ("mae", "rmse")
TRUTH_METRICS = ("accuracy", "mae")


# ------------------------------------------------------------------------------------ features

def volume_features(volume: np.ndarray) -> np.ndarray:
    """(D, H, W) -> (g_d * g_h * g_w,) float32, g = min(:data:`VOLUME_GRID`, size)."""
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
    grid = tuple(min(VOLUME_GRID, s) for s in x.shape[2:])
    return torch.nn.functional.adaptive_avg_pool3d(x, grid).flatten().numpy()


def fmri_features(window: np.ndarray) -> np.ndarray:
    """(D, H, W, L) window -> Fisher-z connectivity upper triangle (R(R-1)/2,) then the mean
    image (R,), R = regions of the :data:`FMRI_GRID`³ block grid."""
    x = torch.as_tensor(np.asarray(window, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    grid = tuple(min(FMRI_GRID, s) for s in x.shape[2:])
    series = torch.nn.functional.adaptive_avg_pool3d(x, grid)[0].flatten(1).T.double().numpy()
    centred = series - series.mean(axis=1, keepdims=True)  # (R, L)
    norms = np.linalg.norm(centred, axis=1)
    scale = np.where(norms > 1e-8, norms, np.inf)  # a constant block correlates 0 with all
    r = (centred / scale[:, None]) @ (centred / scale[:, None]).T
    upper = np.triu_indices(len(series), k=1)
    z = np.arctanh(np.clip(r[upper], -0.999, 0.999))
    return np.concatenate([z, series.mean(axis=1)]).astype(np.float32)


def feature_params(inp: ModalityInput) -> dict:
    grid = {"fmri_grid": FMRI_GRID} if inp.is_fmri else {"volume_grid": VOLUME_GRID}
    return {"version": FEATURE_VERSION, **grid}


def describe_features(inp: ModalityInput) -> str:
    size = inp.spec.image_size
    if inp.is_fmri:
        g = [min(FMRI_GRID, s) for s in size]
        n = int(np.prod(g))
        return (f"connectivity of {'x'.join(map(str, g))} blocks of the {inp.spec.sequence_length}-"
                f"frame window (Fisher-z upper triangle, {n * (n - 1) // 2} values) + their mean "
                f"image ({n} values)")
    g = [min(VOLUME_GRID, s) for s in size]
    return (f"{'x'.join(map(str, size))} volume average-pooled to {'x'.join(map(str, g))} "
            f"coarse voxels ({int(np.prod(g))} values)")


class FeatureStore:
    """Per-image features, read from the cache or computed (and stored) on a miss. The last
    preprocessed image is kept, so the windows of one rsfMRI run (consecutive items) decode it
    once."""

    def __init__(self, inputs: dict[str, ModalityInput], cache_dir: Path):
        self.inputs, self.cache = inputs, PreprocessCache(cache_dir)
        self.computed = self.reused = 0
        self._last: tuple[tuple[str, str], np.ndarray] | None = None

    def _key(self, rec: Record, j: int, start: int | None) -> str:
        image = rec.images[j]
        inp = self.inputs[image.modality]
        params = {"preprocessing": inp.cache_params(), "features": feature_params(inp),
                  "window_start": start}
        return cache_key(image.path, f"reference-{image.modality}", params,
                         inp.extra_sources(image))

    def _array(self, rec: Record, j: int) -> np.ndarray:
        """The whole preprocessed image, exactly as the evaluation dataset reads it."""
        image = rec.images[j]
        which = (image.modality, str(image.path))
        if self._last is None or self._last[0] != which:
            self._last = (which, self.inputs[image.modality].preprocess(image, rec.id))
        return self._last[1]

    def record(self, rec: Record, start: int | None = None) -> list[np.ndarray]:
        """Features of every image of ``rec``; ``start`` is the rsfMRI window (None: the first,
        which starts at frame 0)."""
        out = []
        for j, image in enumerate(rec.images):
            inp = self.inputs[image.modality]
            s = (start or 0) if inp.is_fmri else None
            key = self._key(rec, j, s)
            cached = self.cache.get(key)
            if cached is not None:
                self.reused += 1
                out.append(np.asarray(cached, dtype=np.float32))
                continue
            array = self._array(rec, j)
            if inp.is_fmri:
                feats = fmri_features(window_tensor(array, s, inp.spec)[0].numpy())
            else:
                feats = volume_features(array)
            meta = {"source": str(Path(image.path).resolve()), "kind": f"reference-{image.modality}",
                    "params": {"features": feature_params(inp), "window_start": s}}
            self.computed += 1  # stored as float16: first and later uses see the same values
            out.append(np.asarray(self.cache.put(key, feats, meta), dtype=np.float32))
        return out


def combine(rec: Record, per_image: list[np.ndarray]) -> np.ndarray:
    """One record's feature vector from its images' (see the module docstring)."""
    subjects = rec.metadata.get("subjects") if isinstance(rec.metadata, dict) else None
    if subjects and len(per_image) == 2 and per_image[0].shape == per_image[1].shape:
        diff = per_image[0] - per_image[1]
        return np.concatenate([diff, np.abs(diff)])
    return np.concatenate(per_image)


# ------------------------------------------------------------------------------------ fitting

@dataclass
class Fit:
    """One fitted reference: a task on one modality group."""
    task: str
    modalities: str
    kind: str
    model: object
    regularisation: dict
    n_train_units: int
    n_train_records: int
    n_features: int
    features: str
    cv: str


def _folds(kind: str, y: list, groups: list[str]):
    """(splitter, description) or the reason why cross-validation is impossible."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    units = dict(zip(groups, y, strict=True))
    if len(units) < MIN_SUBJECTS:
        return f"only {len(units)} training subjects (at least {MIN_SUBJECTS} needed)"
    if kind == "classification":
        counts = {c: list(units.values()).count(c) for c in sorted(set(units.values()))}
        if len(counts) < 2:
            return f"the training split holds one class only ({next(iter(counts))!r})"
        n = min(MAX_FOLDS, min(counts.values()))
        if n < 2:
            return f"a class has a single training subject ({counts})"
        return StratifiedGroupKFold(n, shuffle=True, random_state=0), \
            f"{n}-fold StratifiedGroupKFold by subject"
    n = min(MAX_FOLDS, len(units))
    return GroupKFold(n), f"{n}-fold GroupKFold by subject"


def fit_group(task: TaskSpec, modalities: str, X: np.ndarray, y: list, groups: list[str],
              features: str) -> Fit | str:
    """A cross-validated linear model on the training rows, or the reason there is none."""
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    folds = _folds(task.kind, y, groups)
    if isinstance(folds, str):
        return folds
    splitter, cv_text = folds
    splits = list(splitter.split(X, y, groups))
    if task.kind == "classification":
        head = LogisticRegressionCV(Cs=list(CS), cv=splits, scoring="neg_log_loss", max_iter=2000)
    else:
        head = RidgeCV(alphas=list(ALPHAS), cv=splits)
    model = make_pipeline(StandardScaler(), PCA(svd_solver="full"), head)
    # one BLAS thread: these are small (n x n after the PCA) problems, and on a shared machine
    # threads waiting for each other made the cross-validation several times slower.
    # FutureWarning: scikit-learn 1.8+ announces new LogisticRegressionCV defaults (l1_ratios,
    # fitted attributes) that do not change an L2 fit; C_ is read in both forms below.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(X, np.asarray(y) if task.kind == "classification" else np.asarray(y, float))
    if task.kind == "classification":
        reg = {"C": float(np.ravel(head.C_)[0])}
    else:
        reg = {"alpha": float(head.alpha_)}
    return Fit(task.name, modalities, task.kind, model, reg, len(set(groups)), len(y), X.shape[1],
               features, cv_text)


def _record_key(rec: Record) -> str:
    return unit_key({"subject_id": rec.subject_id,
                     "subjects": rec.metadata.get("subjects") if isinstance(rec.metadata, dict)
                     else None})


def _group_name(rec: Record) -> str:
    return "+".join(rec.modalities)


def _features_text(store: FeatureStore, rec: Record) -> str:
    if len(rec.images) == 1:
        return describe_features(store.inputs[rec.images[0].modality])
    parts = [f"{im.modality}: {describe_features(store.inputs[im.modality])}" for im in rec.images]
    text = "; ".join(dict.fromkeys(parts))
    if rec.metadata.get("subjects") and len(rec.images) == 2:
        return f"[a - b, |a - b|] of the two scans' features ({text})"
    return text


def _row(rec: Record, spec: TaskSpec, fit: Fit, start: int | None, x: np.ndarray) -> dict:
    """A prediction row in the format of the model's rows (see evaluate._row)."""
    row = {"id": rec.id, "item": rec.id if start is None else f"{rec.id}@w{start}",
           "subject_id": rec.subject_id, "study": rec.study, "task": rec.task,
           "modalities": list(rec.modalities), "reference": rec.answer}
    if start is not None:
        row["window_start"] = int(start)
    subjects = rec.metadata.get("subjects") if isinstance(rec.metadata, dict) else None
    if subjects:
        row["subjects"] = [str(s) for s in subjects]
    if spec.kind == "classification":
        proba = fit.model.predict_proba(x[None])[0]
        probs = {o: 0.0 for o in spec.options}
        for cls, p in zip(fit.model.classes_, proba, strict=True):
            probs[str(cls)] = float(p)
        answer = max(spec.options, key=lambda o: (probs[o], -spec.options.index(o)))
        row.update(scoring="reference (logistic regression)", answer=answer,
                   reference_label=spec.parse(rec.answer), prediction=answer, probs=probs)
        row["correct"] = answer == row["reference_label"]
    else:
        value = float(fit.model.predict(x[None])[0])
        value = float(np.clip(value, -np.inf if spec.low is None else spec.low,
                              np.inf if spec.high is None else spec.high))
        truth = spec.parse(rec.answer)
        row.update(scoring="reference (ridge)", answer=spec.format_answer(value),
                   reference_value=truth, prediction=value, abs_error=abs(value - truth))
    return row


@dataclass
class Reference:
    rows: list[dict]  # one per evaluated item that has a reference
    fits: dict[tuple[str, str], Fit] = field(default_factory=dict)  # (task, modalities) -> fit
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)  # -> reason
    computed: int = 0  # image features computed now
    reused: int = 0  # image features read from the cache
    seconds: float = 0.0


def fit_reference(train: list[Record], items: list[tuple[Record, int | None]],
                  inputs: dict[str, ModalityInput], cache_dir: Path, *,
                  progress: bool = True) -> Reference:
    """Fit on ``train`` (records of the training split, first rsfMRI window each) and predict
    every evaluated item ``(record, window start or None)``. Answers of the evaluated records are
    used only to fill the rows' reference fields, never by the fit."""
    t0 = time.time()
    store = FeatureStore(inputs, Path(cache_dir))
    groups = sorted({(r.task, _group_name(r)) for r, _ in items})
    specs = {r.task: task_for_record(r.task, r.metadata) for r, _ in items}
    out = Reference([])
    wanted = [(t, g) for t, g in groups if specs[t] is not None and specs[t].kind != "free"]
    for t, g in groups:
        if (t, g) not in wanted:
            out.skipped[(t, g)] = "free-text task: no classical reference"
    train_by = {k: [r for r in train if (r.task, _group_name(r)) == k] for k in wanted}
    eval_by = {k: [(r, s) for r, s in items if (r.task, _group_name(r)) == k] for k in wanted}
    total = sum(len(v) for v in train_by.values()) + sum(len(v) for v in eval_by.values())
    bar = tqdm(total=total, desc="reference features", disable=not progress)
    for key in wanted:
        spec = specs[key[0]]
        if not train_by[key]:
            out.skipped[key] = "no training records of this task and modality"
            bar.update(len(eval_by[key]))
            continue
        X, y, units = [], [], []
        for rec in train_by[key]:
            X.append(combine(rec, store.record(rec)))
            y.append(spec.parse(rec.answer))
            units.append(_record_key(rec))
            bar.update(1)
        fit = fit_group(spec, key[1], np.stack(X).astype(np.float64), y, units,
                        _features_text(store, train_by[key][0]))
        if isinstance(fit, str):
            out.skipped[key] = fit
            bar.update(len(eval_by[key]))
            continue
        out.fits[key] = fit
        for rec, start in eval_by[key]:
            x = combine(rec, store.record(rec, start)).astype(np.float64)
            out.rows.append(_row(rec, spec, fit, start, x))
            bar.update(1)
    bar.close()
    out.computed, out.reused, out.seconds = store.computed, store.reused, time.time() - t0
    return out


# ------------------------------------------------------------------------------------ comparison

def _unit_values(spec: TaskSpec, rows: list[dict], baseline) -> np.ndarray:
    """Per unit, in sorted order: 1/0 for a correct / wrong answer (classification) or the
    absolute error (regression); aggregation and parse failures as in the summary."""
    units = list(group_units(rows).values())
    if spec.kind == "classification":
        agg = [aggregate_classification(u, spec.options) for u in units]
        t, p = encode_labels([a["reference"] for a in agg], [a["prediction"] for a in agg],
                             list(spec.options))
        return (t == p).astype(float)
    agg = [aggregate_regression(u) for u in units]
    y = np.array([a["reference"] for a in agg])
    mean = baseline if baseline is not None else float(y.mean())
    f = np.array([mean if a["prediction"] is None else a["prediction"] for a in agg])
    return np.abs(f - y)


def verdict(advantage_ci: list[float] | None) -> str:
    if advantage_ci is None:
        return "undecided (no bootstrap CI)"
    if advantage_ci[0] > 0:
        return "model better than the reference"
    if advantage_ci[1] < 0:
        return "not better than the reference (the reference is better)"
    return "not better than the reference"


def paired_comparison(spec: TaskSpec, model_rows: list[dict], ref_rows: list[dict], *,
                      baseline=None, resamples: int = 1000, seed: int = 0) -> dict:
    """The model's advantage over the reference in the primary metric (accuracy: model minus
    reference; MAE: reference minus model), with a paired percentile bootstrap 95% CI over the
    same units (subjects, pairs; the resamples the metrics' CIs use), and the verdict."""
    keys_m, keys_r = set(group_units(model_rows)), set(group_units(ref_rows))
    if keys_m != keys_r:
        raise ValueError(f"model and reference rows cover different units ({len(keys_m)} vs "
                         f"{len(keys_r)})")
    primary = PRIMARY[spec.kind]
    sign = -1.0 if primary in LOWER_IS_BETTER else 1.0
    # per unit: + favours the model (a hit the reference missed, or a smaller error)
    gain = sign * (_unit_values(spec, model_rows, baseline) - _unit_values(spec, ref_rows, baseline))
    cis = bootstrap_ci(lambda i: {primary: float(gain[i].mean())}, len(gain),
                       resamples=resamples, seed=seed)
    ci = cis.get(primary)
    return {"metric": primary, "advantage": float(gain.mean()), "ci": ci, "verdict": verdict(ci),
            "n": len(gain), "sign": "reference - model" if sign < 0 else "model - reference"}


# ------------------------------------------------------------------------------------ metrics.json

def _fit_info(fit: Fit) -> dict:
    return {"regularisation": fit.regularisation, "n_train": fit.n_train_units,
            "n_train_records": fit.n_train_records, "n_features": fit.n_features,
            "features": fit.features, "cv": fit.cv}


def _block(spec: TaskSpec, metrics: dict, fits: list[Fit]) -> dict:
    predictor = ("L2 logistic regression" if spec.kind == "classification"
                 else "ridge regression") + " on standardised features"
    shown = {k: v for k, v in metrics.items() if k != "baseline"}
    return {"predictor": predictor, "source": "train",
            "fits": {f.modalities: _fit_info(f) for f in fits}, **shown}


def attach_reference(summary: dict, model_rows: list[dict], ref: Reference,
                     specs: dict[str, TaskSpec | None], *, baselines: dict,
                     resamples: int, seed: int) -> None:
    """Add a ``reference`` block (metrics, CIs, fits, comparison with verdict) beside each
    ``baseline`` of ``summary`` (per task, and per modality group where those exist)."""
    kw = {"resamples": resamples, "seed": seed}
    for name, task_metrics in summary["tasks"].items():
        spec = specs.get(name)
        mine = [r for r in model_rows if r["task"] == name]
        theirs = [r for r in ref.rows if r["task"] == name]
        groups = sorted({"+".join(r["modalities"]) for r in mine})
        skipped = {g: ref.skipped[(name, g)] for g in groups if (name, g) in ref.skipped}
        base = {"baseline": baselines.get(name), "source": "train" if name in baselines
                else "evaluated split"}
        if skipped:
            task_metrics["reference"] = {"skipped": "; ".join(f"{g}: {why}"
                                                              for g, why in skipped.items())}
        else:
            block = _block(spec, score_rows(spec, theirs, **base, **kw),
                           [ref.fits[(name, g)] for g in groups])
            block["comparison"] = paired_comparison(spec, mine, theirs,
                                                    baseline=baselines.get(name), **kw)
            task_metrics["reference"] = block
        for group, m in summary.get("by_modality", {}).get(name, {}).items():
            if (name, group) in ref.skipped:
                m["reference"] = {"skipped": ref.skipped[(name, group)]}
                continue
            ours = [r for r in mine if "+".join(r["modalities"]) == group]
            theirs_g = [r for r in theirs if "+".join(r["modalities"]) == group]
            block = _block(spec, score_rows(spec, theirs_g, **base, **kw),
                           [ref.fits[(name, group)]])
            block["comparison"] = paired_comparison(spec, ours, theirs_g,
                                                    baseline=baselines.get(name), **kw)
            m["reference"] = block


def add_reference(summary: dict, model_rows: list[dict], train: list[Record] | None,
                  items: list[tuple[Record, int | None]], inputs: dict[str, ModalityInput],
                  specs: dict[str, TaskSpec | None], *, cache_dir: Path, baselines: dict,
                  resamples: int, seed: int, progress: bool = True) -> dict:
    """Fit, predict and attach (see :func:`attach_reference`); returns the run-level facts for
    ``metrics.json["reference"]`` (cache folder, features computed / reused, seconds)."""
    if not train:
        return {"skipped": "no training split records were given to fit it on"}
    ref = fit_reference(train, items, inputs, cache_dir, progress=progress)
    attach_reference(summary, model_rows, ref, specs, baselines=baselines, resamples=resamples,
                     seed=seed)
    return {"cache_dir": str(cache_dir), "feature_version": FEATURE_VERSION,
            "features_computed": ref.computed, "features_reused": ref.reused,
            "seconds": round(ref.seconds, 2),
            "skipped_groups": {f"{t}/{g}": why for (t, g), why in sorted(ref.skipped.items())}}


# ------------------------------------------------------------------------------------ truth files

def load_truth(path: str | Path) -> dict:
    """A cohort's truth file: ``{"tasks": {task: {modality: {"metric": "accuracy"|"mae",
    "achievable": float, "note": str}}}, "planted": {...}}``. ConfigError naming the file and the
    problem when it is missing or malformed."""
    path = Path(path)
    fix = ('expected {"tasks": {"<task>": {"<modality>": {"metric": "accuracy"|"mae", '
           '"achievable": <number>, "note": "..."}}}, "planted": {...}}')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"truth file {path} does not exist; give an existing file to "
                          "evaluation.truth / --truth") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"truth file {path} is not readable JSON ({exc}); {fix}") from exc
    problems = []
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        problems.append("it has no 'tasks' object")
        tasks = {}
    for task, mods in tasks.items():
        if not isinstance(mods, dict):
            problems.append(f"tasks.{task} is not an object of modalities")
            continue
        for mod, entry in mods.items():
            where = f"tasks.{task}.{mod}"
            if not isinstance(entry, dict):
                problems.append(f"{where} is not an object")
                continue
            if entry.get("metric") not in TRUTH_METRICS:
                problems.append(f"{where}.metric is {entry.get('metric')!r}, not one of "
                                f"{', '.join(TRUTH_METRICS)}")
            value = entry.get("achievable")
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not np.isfinite(value):
                problems.append(f"{where}.achievable is {value!r}, not a number")
            if "note" in entry and not isinstance(entry["note"], str):
                problems.append(f"{where}.note is not a string")
    if problems:
        raise ConfigError(f"truth file {path}: " + "; ".join(problems) + f"; {fix}")
    return data


def _achievable(entry: dict, source: str) -> dict:
    return {"metric": entry["metric"], "value": float(entry["achievable"]),
            "note": entry.get("note", ""), "source": source}


def attach_achievable(summary: dict, model_rows: list[dict], truth: dict, source: str) -> None:
    """Add ``achievable`` where the truth file knows the task and modality: per task when all its
    records share one modality group, and per modality group."""
    for name, task_metrics in summary["tasks"].items():
        known = truth["tasks"].get(name, {})
        groups = sorted({"+".join(r["modalities"]) for r in model_rows if r["task"] == name})
        if len(groups) == 1 and groups[0] in known:
            task_metrics["achievable"] = _achievable(known[groups[0]], source)
        for group, m in summary.get("by_modality", {}).get(name, {}).items():
            if group in known:
                m["achievable"] = _achievable(known[group], source)


def reference_cache_dir(run_dir: Path | None, out_dir: Path) -> Path:
    """Where features are cached by default: ``<training.output_dir>/reference_features`` for a
    run folder laid out by `umbrella train` (``<output_dir>/<name>/seed_<n>``, recognised by its
    ``config.yaml`` and ``seed_`` name), so that every seed and setting trained on the same
    records computes each image's features once (the keys hold the image's identity and its
    preprocessing: runs that preprocess differently keep separate entries); else
    ``<run>/reference_features``, or beside the evaluation's outputs without a run."""
    if run_dir is None:
        return Path(out_dir) / "reference_features"
    run_dir = Path(run_dir)
    if run_dir.name.startswith("seed_") and (run_dir / "config.yaml").is_file():
        return run_dir.parent.parent / "reference_features"
    return run_dir / "reference_features"
