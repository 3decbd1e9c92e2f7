"""`umbrella demo`: build the embedded cohort, train the tiny preset on sex, evaluate, ask.

By default the demo is T1 only; ``modalities=("T1", "rsfMRI", "dMRI")`` adds the cohort's rsfMRI
runs and dMRI FA maps (:mod:`umbrella.demo.modalities`) and trains ONE model on all of them, with
the same subject-level split in every modality, then reports accuracy per modality.

``cohort="realistic"`` (``umbrella demo --cohort realistic``) builds the cohort of
:mod:`umbrella.demo.realistic` (400 subjects, overlapping effects, truth.json) and trains one model
on sex AND age from T1 (plus sex from each other modality asked for). :func:`prepare_demo` (CLI
``--build-only``) stops after the cohort, the records and demo.yaml, so that several runs
(``umbrella train -c <out>/demo.yaml training.seed=N``) can share them.

Everything lands under ``--out`` (default ``umbrella-demo/``)::

    cohort/      NIfTI images (images/, rsfmri/, dwi/), phenotype.csv, cohort.json
                 (realistic: also truth.json, planted.csv)
    records/     basic: sex_<modalities>.jsonl; realistic: <task>_<modality>.jsonl
                 (LLaVA form, subject-level splits stratified by sex, the same in every file)
    demo.yaml    the config used: rerun with `umbrella train -c <out>/demo.yaml`
    runs/...     the run folder (model, checkpoints, logs) and evaluation/
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from umbrella.config import UmbrellaConfig, load_config, save_config
from umbrella.demo.cohort import DemoCohort, build_demo_cohort, normalize_modalities
from umbrella.errors import ConfigError, UmbrellaError
from umbrella.io import atomic_write_jsonl
from umbrella.task_registry import AGE, SEX
from umbrella.tasks.conversations import (
    classification_record,
    draw_questions,
    subject_splits,
    task_record,
)

DEMO_SPLITS = (0.6, 0.2, 0.2)
FIELD_OF_VIEW_MM = 96 * 2.1  # every demo grid covers the same 201.6 mm
QUESTION_STREAM = {"T1": None, "rsfMRI": 1, "dMRI": 2}  # phrasing draws per modality
REALISTIC_FOV_MM = (224.0, 256.0, 224.0)  # the realistic cohort's field of view (every grid)
AGE_YEARS = replace(AGE, decimals=0)  # realistic ages are whole years: answers read "57 years"


@dataclass
class DemoResult:
    run_dir: Path
    model_dir: Path
    eval_dir: Path
    metrics: dict
    question: str
    answer: str
    truth: str
    seconds: float
    # {modality: {"n", "n_correct", "accuracy"}} on the evaluated split (subjects)
    per_modality: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)  # {modality: answer} for the asked subject


def _record_modalities(modalities, cohort: DemoCohort) -> tuple[str, ...]:
    names = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    mods, problems = normalize_modalities(names)
    mods = tuple(m for m in mods if m in names)
    problems += [f"the cohort at {cohort.root} has no {m} images; build it with "
                 f"modalities including {m!r}" for m in mods if m not in cohort.modalities]
    if not mods:
        problems.append("modalities is empty: give at least one of T1, rsfMRI, dMRI")
    if problems:
        raise ConfigError(problems, source="write_sex_records")
    return mods


def write_sex_records(cohort: DemoCohort, path: Path, seed: int,
                      modalities=("T1",)) -> Path:
    """One sex question per subject per modality, id ``<subject>_sex_<modality>``.

    The split is by subject and stratified by sex, and the SAME for every modality: a subject is
    in one split everywhere. Question phrasings are drawn per modality from fixed streams, so the
    T1 records do not change when modalities are added.
    """
    mods = _record_modalities(modalities, cohort)
    split = subject_splits([s.subject_id for s in cohort.subjects],
                           [s.sex for s in cohort.subjects], DEMO_SPLITS, seed=12345 + seed)
    rows = []
    for m in mods:
        stream = QUESTION_STREAM[m]
        rng = np.random.default_rng(seed if stream is None else [seed, stream])
        for s in cohort.subjects:
            rec = classification_record(SEX, subject_id=s.subject_id, answer=s.sex,
                                        images=[{"modality": m, "path": s.path(m)}],
                                        study="DEMO", split=split[s.subject_id], rng=rng,
                                        metadata={"age": s.age})
            rows.append(rec | {"id": f"{s.subject_id}_sex_{m}"})
    return atomic_write_jsonl(path, rows)


def _task_modalities(cohort: DemoCohort, tasks) -> dict[str, tuple[str, ...]]:
    """{task: modalities}; default: sex from every modality of the cohort, age from T1."""
    plan = {"sex": cohort.modalities, "age": ("T1",)} if tasks is None else \
        {t: tuple(ms) for t, ms in dict(tasks).items()}
    problems = [f"unknown task {t!r}: the demo writes sex and age" for t in plan
                if t not in ("sex", "age")]
    for t, ms in plan.items():
        problems += [f"task {t}: the cohort at {cohort.root} has no {m} images; build it with "
                     f"modalities including {m!r}" for m in ms if m not in cohort.modalities]
    if problems or not any(plan.values()):
        raise ConfigError(problems or ["tasks is empty: give e.g. {'sex': ['T1']}"],
                          source="write_records")
    return {t: ms for t, ms in plan.items() if ms}


def write_records(cohort: DemoCohort, out_dir: Path, seed: int = 0,
                  tasks: dict | None = None) -> dict[str, list[Path]]:
    """One JSONL per task and modality, ``<out_dir>/<task>_<modality>.jsonl``, one question per
    subject, id ``<subject>_<task>_<modality>``; returns {modality: [files]} for the config.

    ``tasks`` maps a task (sex, age) to its modalities; default: sex from every modality of the
    cohort, age from T1. The split is by subject (60/20/20), stratified by sex, and the same in
    every file. Age answers: whole years on the realistic cohort ("57 years", the age task with 0
    decimals, recorded in ``metadata.task_spec``), the registry's age form on the basic one.
    """
    plan = _task_modalities(cohort, tasks)
    split = subject_splits([s.subject_id for s in cohort.subjects],
                           [s.sex for s in cohort.subjects], DEMO_SPLITS, seed=12345 + seed)
    age_spec = AGE_YEARS if cohort.variant == "realistic" else AGE
    out: dict[str, list[Path]] = {}
    for task, modalities in plan.items():
        for m in modalities:
            rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{m}".encode())])
            rows = []
            for s in cohort.subjects:
                images, rid = [{"modality": m, "path": s.path(m)}], f"{s.subject_id}_{task}_{m}"
                if task == "sex":
                    rec = classification_record(SEX, subject_id=s.subject_id, answer=s.sex,
                                                images=images, study="DEMO",
                                                split=split[s.subject_id], rng=rng,
                                                metadata={"age": s.age}) | {"id": rid}
                else:
                    value = round(s.age) if age_spec.decimals == 0 else s.age
                    own = {} if age_spec == AGE else {"task_spec": age_spec.to_dict()}
                    rec = task_record(age_spec, subject_id=s.subject_id,
                                      answer=age_spec.format_answer(value), images=images,
                                      study="DEMO", split=split[s.subject_id],
                                      question=draw_questions(age_spec, 1, rng)[0],
                                      record_id=rid, metadata={"value": value, **own})
                rows.append(rec)
            path = atomic_write_jsonl(Path(out_dir) / f"{task}_{m}.jsonl", rows)
            out.setdefault(m, []).append(path)
    return out


def _triple(size) -> list[int]:
    return [int(size)] * 3 if isinstance(size, int | np.integer) else [int(n) for n in size]


def demo_config(out: Path, records, cohort_root: Path, image_size, patch: int,
                seed: int, overrides: list[str], *, modalities=("T1",), aux_size=48,
                aux_patch: int = 8, sequence_length: int = 8,
                steps: int | None = None, voxel: float | None = None,
                aux_voxel: float | None = None,
                connectivity: bool = False) -> UmbrellaConfig:
    """The demo's config: T1 ``image_size`` (an int for a cube, or 3 ints) / ``patch``; rsfMRI
    and dMRI ``aux_size`` / ``aux_patch`` (rsfMRI windows of ``sequence_length`` frames, one time
    patch per window, window starts every 4 frames); proportional modality mixing; ``steps``
    default: 200 for T1 alone, 100 per modality for several. ``records``: one file for every
    modality, or {modality: [files]}. ``voxel`` / ``aux_voxel``: read the images at this
    spacing (mm; the cohort's own), instead of the config's default field of view.
    ``connectivity``: rsfMRI is read as one window of ``sequence_length`` frames whose voxel
    series are standardised (``normalize=zscore_voxel``) and embedded by connectivity
    (``model.rsfmri_embed=connectivity``): what the realistic cohort's runs carry sex in."""
    size, aux = _triple(image_size), _triple(aux_size)
    files = records if isinstance(records, dict) else {m: [records] for m in modalities}
    sections = {
        "T1": [f"image_size=[{size[0]},{size[1]},{size[2]}]",
               f"patch_size=[{patch},{patch},{patch}]"],
        "rsfMRI": [f"image_size=[{aux[0]},{aux[1]},{aux[2]}]",
                   f"patch_size=[{aux_patch},{aux_patch},{aux_patch},{sequence_length}]",
                   f"sequence_length={sequence_length}", "stride_within_seq=1",
                   "stride_between_seq=4",
                   f"eval_windows={'all' if connectivity else 'first'}",
                   f"normalize={'zscore_voxel' if connectivity else 'zscore_run'}"],
        "dMRI": [f"image_size=[{aux[0]},{aux[1]},{aux[2]}]",
                 f"patch_size=[{aux_patch},{aux_patch},{aux_patch}]", "dmri_map=FA"],
    }
    for m, v in (("T1", voxel), ("rsfMRI", aux_voxel), ("dMRI", aux_voxel)):
        if v is not None:
            sections[m].append(f"voxel_size=[{v},{v},{v}]")
    base = []
    for m in modalities:
        listed = ",".join(str(f) for f in files[m])
        base += [f"dataset.{m}.{kv}" for kv in [f"records=[{listed}]",
                                                f"data_root={cohort_root}", "studies=[DEMO]"]
                 + sections[m]]
    if steps is None:
        steps = 200 if len(modalities) == 1 else 100 * len(modalities)
    base += ["dataset.memoize=true", "dataset.mixing=proportional",
             f"training.output_dir={out / 'runs'}", f"training.seed={seed}",
             f"training.max_steps={steps}", "training.eval_steps=50",
             "training.logging_steps=10", "evaluation.split=test"]
    if connectivity and "rsfMRI" in modalities:
        base.append("model.rsfmri_embed=connectivity")
    return load_config(None, base + list(overrides))


def per_modality_accuracy(metrics: dict, predictions: list[dict],
                          modalities, task: str = "sex") -> dict[str, dict]:
    """{modality: {"n", "n_correct", "accuracy"}}: from the evaluation's per-modality metrics
    (subjects) where present, else counted from the prediction rows (records)."""
    grouped = metrics.get("by_modality", {}).get(task, {})
    out = {}
    for m in modalities:
        if m in grouped:
            n, hits = int(grouped[m]["n"]), int(grouped[m]["n_correct"])
        elif len(modalities) == 1 and task in metrics.get("tasks", {}):
            n, hits = int(metrics["tasks"][task]["n"]), int(metrics["tasks"][task]["n_correct"])
        else:
            rows = [r for r in predictions if r.get("task") == task and r.get("modalities") == [m]]
            n, hits = len(rows), sum(bool(r.get("correct")) for r in rows)
        out[m] = {"n": n, "n_correct": hits, "accuracy": round(hits / n, 6) if n else None}
    return out


def _accuracy_line(per_modality: dict) -> str:
    parts = [f"{m} {v['n_correct']}/{v['n']} = {v['accuracy']:.3f}" if v["n"] else f"{m} -"
             for m, v in per_modality.items()]
    return "      held-out sex accuracy by modality: " + " | ".join(parts)


def _ask(model_dir: Path, test: list, modalities, log) -> tuple[str, str, str, dict]:
    """Ask one held-out subject's sex from each modality's scan (and its age, where the records
    hold an age question); returns the sex question, the first answer, its truth, all answers."""
    from umbrella.inference import BrainAssistant

    assistant, question, answers = BrainAssistant(model_dir), SEX.questions[0], {}
    subject, truth = test[0].subject_id, ""
    asks = [("sex", m, question) for m in modalities] + [("age", "T1", AGE.questions[0])]
    for task, m, text in asks:
        rec = next((r for r in test if r.subject_id == subject and r.modalities == (m,)
                    and r.task == task), None)
        if rec is None:
            continue
        try:
            answer = assistant.ask(text, [(im.modality, im.path) for im in rec.images])
        except (UmbrellaError, ValueError) as exc:
            log(f"      {m}: cannot ask yet ({type(exc).__name__}: {exc})")
            continue
        if task == "sex":
            answers[m], truth = answer, truth or rec.answer
        else:
            answers[f"{m} age"] = answer
        log(f"      {subject} [{m}]: Q: {text}  A: {answer}  (truth: {rec.answer})")
    first = next(iter(answers.values()), "")
    return question, first, truth or test[0].answer, answers


@dataclass
class DemoPlan:
    """What :func:`prepare_demo` built: enough to train (``umbrella train -c config_path``)."""

    cohort: DemoCohort
    records: dict[str, list[Path]]  # {modality: records files}
    config: UmbrellaConfig
    config_path: Path
    modalities: tuple[str, ...]  # the modalities trained on
    truth: dict | None = None  # the cohort's truth.json (realistic cohorts)


def _realistic_grid(size, default) -> tuple[tuple[int, int, int], float]:
    """A realistic-cohort grid (3 ints, or None for ``default``) over REALISTIC_FOV_MM, and its
    voxel size; the grid must cover that field of view with isotropic voxels."""
    grid = tuple(default if size is None else _triple(size))
    voxels = [fov / n for fov, n in zip(REALISTIC_FOV_MM, grid, strict=True)]
    if max(voxels) - min(voxels) > 1e-9:
        raise ConfigError(f"a realistic-cohort grid must cover {REALISTIC_FOV_MM} mm with "
                          f"isotropic voxels (e.g. [112,128,112] at 2 mm, [56,64,56] at 4 mm); "
                          f"got {list(grid)}", source="run_demo")
    return grid, voxels[0]


def prepare_demo(out: str | Path = "umbrella-demo", *, cohort: str = "basic", seed: int = 0,
                 n_subjects: int | None = None, image_size=None, patch: int | None = None,
                 overrides: Sequence[str] = (), progress: bool = True, log=print,
                 modalities=("T1",), aux_size=None, aux_patch: int | None = None,
                 n_frames: int = 24, sequence_length: int = 8, workers: int = 2,
                 csf_contrast: float = 0.0) -> DemoPlan:
    """Cohort -> records -> config (written to ``<out>/demo.yaml``), without training.

    ``cohort="basic"``: 200 subjects, T1 96^3 / patch 16, rsfMRI/dMRI 48^3 / patch 8, sex
    records. ``cohort="realistic"``: 400 subjects, T1 [112,128,112] (2 mm) / patch 16,
    rsfMRI/dMRI [56,64,56] (4 mm) / patch 8, records for sex from every modality and age from T1,
    200 training steps per records file. ``csf_contrast`` (realistic only): the spread of the
    T1 scans' CSF level (:func:`umbrella.demo.cohort.build_demo_cohort`; 0: off).
    """
    from umbrella.demo.modalities import DmriSettings, FmriSettings

    out = Path(out).resolve()
    names = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    mods, problems = normalize_modalities(names)
    if cohort not in ("basic", "realistic"):
        problems.append(f"cohort must be basic or realistic, got {cohort!r}")
    if problems:
        raise ConfigError(problems, source="run_demo")
    used = tuple(m for m in mods if m in names)
    if cohort == "basic":
        n_subjects = 200 if n_subjects is None else n_subjects
        image_size, patch = 96 if image_size is None else image_size, patch or 16
        aux_size, aux_patch = 48 if aux_size is None else aux_size, aux_patch or 8
        aux_voxel = FIELD_OF_VIEW_MM / aux_size
        log(f"[1/5] building the demo cohort ({n_subjects} subjects; {', '.join(mods)}) in "
            f"{out / 'cohort'}")
        built = build_demo_cohort(out / "cohort", n_subjects, seed=seed,
                                  image_size=(image_size,) * 3,
                                  voxel_mm=FIELD_OF_VIEW_MM / image_size, progress=progress,
                                  modalities=mods, workers=workers, csf_contrast=csf_contrast,
                                  rsfmri=FmriSettings((aux_size,) * 3, aux_voxel, n_frames),
                                  dmri=DmriSettings((aux_size,) * 3, aux_voxel))
        records = out / "records" / f"sex_{'_'.join(used)}.jsonl"
        write_sex_records(built, records, seed, modalities=used)
        files, steps, truth = {m: [records] for m in used}, None, None
    else:
        n_subjects = 400 if n_subjects is None else n_subjects
        grid, voxel = _realistic_grid(image_size, (112, 128, 112))
        aux, aux_voxel = _realistic_grid(aux_size, (56, 64, 56))
        patch, aux_patch = patch or 16, aux_patch or 8
        log(f"[1/5] building the realistic demo cohort ({n_subjects} subjects; "
            f"{', '.join(mods)}) in {out / 'cohort'}")
        built = build_demo_cohort(out / "cohort", n_subjects, variant="realistic", seed=seed,
                                  image_size=grid, voxel_mm=voxel, progress=progress,
                                  modalities=mods, workers=workers, csf_contrast=csf_contrast,
                                  # 4D NIfTI only: the config reads the runs at voxel_size,
                                  # which a frame folder (no affine) cannot be resampled to
                                  rsfmri=FmriSettings(aux, aux_voxel, n_frames, frame_folders=0),
                                  dmri=DmriSettings(aux, aux_voxel))
        files = write_records(built, out / "records", seed,
                              tasks={"sex": used, "age": ("T1",) if "T1" in used else ()})
        steps = 200 * sum(len(v) for v in files.values())
        image_size, aux_size = grid, aux
        truth = json.loads((built.root / "truth.json").read_text(encoding="utf-8"))
        for task, by in truth["tasks"].items():
            for m, t in by.items():
                if m in used:
                    log(f"      achievable {task} {t['metric']} from {m}: {t['achievable']:g} "
                        f"({t['note']})")
    # realistic rsfMRI runs carry sex in connectivity only: read each run whole, by connectivity
    # (benchmarks/README.md section 11: 8-frame windows of linear patches learned nothing)
    realistic = cohort == "realistic"
    cfg = demo_config(out, files, built.root, image_size, patch, seed, list(overrides),
                      modalities=used, aux_size=aux_size, aux_patch=aux_patch,
                      sequence_length=n_frames if realistic else sequence_length, steps=steps,
                      **({"voxel": voxel, "aux_voxel": aux_voxel, "connectivity": True}
                         if realistic else {}))
    save_config(cfg, out / "demo.yaml")
    return DemoPlan(built, files, cfg, out / "demo.yaml", used, truth)


def serve_command(run_dir: Path, eval_dir: Path, cohort_root: Path, modalities) -> str:
    """The `umbrella serve` command for a demo run: its model, evaluation and cohort."""
    roots = " ".join(f"--data-root {m}={cohort_root}" for m in modalities)
    return f"umbrella serve --model {run_dir} --eval {eval_dir} {roots}"


def run_demo(out: str | Path = "umbrella-demo", *, cohort: str = "basic", seed: int = 0,
             n_subjects: int | None = None, image_size=None, patch: int | None = None,
             overrides: list[str] = (), progress: bool = True, log=print, modalities=("T1",),
             aux_size=None, aux_patch: int | None = None, n_frames: int = 24,
             sequence_length: int = 8, csf_contrast: float = 0.0) -> DemoResult:
    """Cohort -> records -> config -> train -> evaluate -> ask. ``modalities`` picks the scans
    trained on (one model for all); rsfMRI/dMRI use ``aux_size``^3 grids over the T1's field of
    view with ``aux_patch`` patches, rsfMRI runs of ``n_frames`` frames (TR 2 s). ``cohort`` and
    the defaults of the sizes: see :func:`prepare_demo`."""
    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.evaluation.report import metrics_table
    from umbrella.training.run import train

    start, out = time.time(), Path(out).resolve()
    plan = prepare_demo(out, cohort=cohort, seed=seed, n_subjects=n_subjects,
                        image_size=image_size, patch=patch, overrides=overrides,
                        progress=progress, log=log, modalities=modalities, aux_size=aux_size,
                        aux_patch=aux_patch, n_frames=n_frames, sequence_length=sequence_length,
                        csf_contrast=csf_contrast)
    cfg, used = plan.config, plan.modalities
    tasks = "sex and age" if cohort == "realistic" else "sex"
    log(f"[2/5] training the '{cfg.model.preset}' preset on {tasks} from {', '.join(used)} for "
        f"{cfg.training.max_steps} steps (config: {plan.config_path})")
    trained = train(cfg, progress=progress)
    log(f"      trained in {trained.seconds:.0f} s, mean training loss {trained.train_loss:.3f}")
    log(f"[3/5] evaluating on the held-out '{cfg.evaluation.split}' split")
    splits = by_split(load_config_records(cfg))
    test = splits.get(cfg.evaluation.split, [])
    result = evaluate_records(trained.model_dir, test, trained.run_dir / "evaluation",
                              split=cfg.evaluation.split, scoring=cfg.evaluation.scoring,
                              batch_size=cfg.evaluation.batch_size, run_dir=trained.run_dir,
                              progress=progress, baseline_records=splits.get("train"),
                              windows=cfg.dataset.rsfMRI.eval_windows,
                              regression=cfg.evaluation.regression,
                              regression_step=cfg.evaluation.regression_step,
                              with_reference=cfg.evaluation.reference,
                              truth=cfg.evaluation.truth or (plan.cohort.root / "truth.json"
                                                             if plan.truth else None))
    log(metrics_table(result.metrics))
    per_modality = per_modality_accuracy(result.metrics, result.predictions, used)
    log(_accuracy_line(per_modality))
    log("[4/5] asking one held-out subject")
    question, answer, truth, answers = _ask(trained.model_dir, test, used, log)
    log(f"[5/5] done in {time.time() - start:.0f} s")
    log(f"      run folder: {trained.run_dir}\n      model:      {trained.model_dir}\n"
        f"      report:     {result.out_dir / 'report.md'}\n"
        f"      metrics:    {result.out_dir / 'metrics.json'}")
    serve = serve_command(trained.run_dir, result.out_dir, plan.cohort.root, used)
    log(f"      look at the scans and ask in a browser:\n        {serve}")
    return DemoResult(trained.run_dir, trained.model_dir, result.out_dir, result.metrics,
                      question, answer, truth, time.time() - start, per_modality, answers)
