"""`umbrella demo`: build the embedded cohort, train the tiny preset on sex, evaluate, ask.

By default the demo is T1 only; ``modalities=("T1", "rsfMRI", "dMRI")`` adds the cohort's rsfMRI
runs and dMRI FA maps (:mod:`umbrella.demo.modalities`) and trains ONE model on all of them, with
the same subject-level split in every modality, then reports accuracy per modality.

Everything lands under ``--out`` (default ``umbrella-demo/``)::

    cohort/      NIfTI images (images/, rsfmri/, dwi/), phenotype.csv, cohort.json
    records/     sex_<modalities>.jsonl (LLaVA form, subject-level stratified splits)
    demo.yaml    the config used: rerun with `umbrella train -c <out>/demo.yaml`
    runs/...     the run folder (model, checkpoints, logs) and evaluation/
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from umbrella.config import UmbrellaConfig, load_config, save_config
from umbrella.demo.cohort import DemoCohort, build_demo_cohort, normalize_modalities
from umbrella.errors import ConfigError, UmbrellaError
from umbrella.io import atomic_write_jsonl
from umbrella.tasks.conversations import classification_record, subject_splits
from umbrella.tasks.registry import SEX

DEMO_SPLITS = (0.6, 0.2, 0.2)
FIELD_OF_VIEW_MM = 96 * 2.1  # every demo grid covers the same 201.6 mm
QUESTION_STREAM = {"T1": None, "rsfMRI": 1, "dMRI": 2}  # phrasing draws per modality


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


def demo_config(out: Path, records: Path, cohort_root: Path, image_size: int, patch: int,
                seed: int, overrides: list[str], *, modalities=("T1",), aux_size: int = 48,
                aux_patch: int = 8, sequence_length: int = 8) -> UmbrellaConfig:
    """The demo's config: T1 ``image_size``^3 / ``patch``; rsfMRI and dMRI ``aux_size``^3 /
    ``aux_patch`` (rsfMRI windows of ``sequence_length`` frames, one time patch per window,
    window starts every 4 frames); proportional modality mixing; 200 steps for T1 alone,
    100 per modality for several."""
    sections = {
        "T1": [f"image_size=[{image_size},{image_size},{image_size}]",
               f"patch_size=[{patch},{patch},{patch}]"],
        "rsfMRI": [f"image_size=[{aux_size},{aux_size},{aux_size}]",
                   f"patch_size=[{aux_patch},{aux_patch},{aux_patch},{sequence_length}]",
                   f"sequence_length={sequence_length}", "stride_within_seq=1",
                   "stride_between_seq=4", "eval_windows=first", "normalize=zscore_run"],
        "dMRI": [f"image_size=[{aux_size},{aux_size},{aux_size}]",
                 f"patch_size=[{aux_patch},{aux_patch},{aux_patch}]", "dmri_map=FA"],
    }
    base = []
    for m in modalities:
        base += [f"dataset.{m}.{kv}" for kv in [f"records=[{records}]",
                                                f"data_root={cohort_root}", "studies=[DEMO]"]
                 + sections[m]]
    steps = 200 if len(modalities) == 1 else 100 * len(modalities)
    base += ["dataset.memoize=true", "dataset.mixing=proportional",
             f"training.output_dir={out / 'runs'}", f"training.seed={seed}",
             f"training.max_steps={steps}", "training.eval_steps=50",
             "training.logging_steps=10", "evaluation.split=test"]
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
    """Ask one held-out subject's sex from each modality's scan."""
    from umbrella.inference import BrainAssistant

    assistant, question, answers = BrainAssistant(model_dir), SEX.questions[0], {}
    subject = test[0].subject_id
    for m in modalities:
        rec = next((r for r in test if r.subject_id == subject and r.modalities == (m,)), None)
        if rec is None:
            continue
        try:
            answers[m] = assistant.ask(question, [(im.modality, im.path) for im in rec.images])
        except (UmbrellaError, ValueError) as exc:
            log(f"      {m}: cannot ask yet ({type(exc).__name__}: {exc})")
            continue
        log(f"      {subject} [{m}]: Q: {question}  A: {answers[m]}  (truth: {rec.answer})")
    first = next(iter(answers.values()), "")
    return question, first, test[0].answer, answers


def serve_command(run_dir: Path, eval_dir: Path, cohort_root: Path, modalities) -> str:
    """The `umbrella serve` command for a demo run: its model, evaluation and cohort."""
    roots = " ".join(f"--data-root {m}={cohort_root}" for m in modalities)
    return f"umbrella serve --model {run_dir} --eval {eval_dir} {roots}"


def run_demo(out: str | Path = "umbrella-demo", *, seed: int = 0, n_subjects: int = 200,
             image_size: int = 96, patch: int = 16, overrides: list[str] = (),
             progress: bool = True, log=print, modalities=("T1",), aux_size: int = 48,
             aux_patch: int = 8, n_frames: int = 24, sequence_length: int = 8) -> DemoResult:
    """Cohort -> records -> config -> train -> evaluate -> ask. ``modalities`` picks the scans
    trained on (one model for all); rsfMRI/dMRI use ``aux_size``^3 grids over the T1's field of
    view with ``aux_patch`` patches, rsfMRI runs of ``n_frames`` frames (TR 2 s)."""
    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.demo.modalities import DmriSettings, FmriSettings
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.evaluation.report import metrics_table
    from umbrella.training.run import train

    start, out = time.time(), Path(out).resolve()
    names = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    mods, problems = normalize_modalities(names)
    if problems:
        raise ConfigError(problems, source="run_demo")
    aux_voxel = FIELD_OF_VIEW_MM / aux_size
    log(f"[1/5] building the demo cohort ({n_subjects} subjects; {', '.join(mods)}) in "
        f"{out / 'cohort'}")
    cohort = build_demo_cohort(out / "cohort", n_subjects, seed=seed,
                               image_size=(image_size,) * 3, voxel_mm=FIELD_OF_VIEW_MM / image_size,
                               progress=progress, modalities=mods,
                               rsfmri=FmriSettings((aux_size,) * 3, aux_voxel, n_frames),
                               dmri=DmriSettings((aux_size,) * 3, aux_voxel))
    used = tuple(m for m in mods if m in names)
    records = write_sex_records(cohort, out / "records" / f"sex_{'_'.join(used)}.jsonl", seed,
                                modalities=used)
    cfg = demo_config(out, records, cohort.root, image_size, patch, seed, list(overrides),
                      modalities=used, aux_size=aux_size, aux_patch=aux_patch,
                      sequence_length=sequence_length)
    save_config(cfg, out / "demo.yaml")
    log(f"[2/5] training the '{cfg.model.preset}' preset on sex from {', '.join(used)} for "
        f"{cfg.training.max_steps} steps (config: {out / 'demo.yaml'})")
    trained = train(cfg, progress=progress)
    log(f"      trained in {trained.seconds:.0f} s, mean training loss {trained.train_loss:.3f}")
    log(f"[3/5] evaluating on the held-out '{cfg.evaluation.split}' split")
    splits = by_split(load_config_records(cfg))
    test = splits.get(cfg.evaluation.split, [])
    result = evaluate_records(trained.model_dir, test, trained.run_dir / "evaluation",
                              split=cfg.evaluation.split, scoring=cfg.evaluation.scoring,
                              batch_size=cfg.evaluation.batch_size, run_dir=trained.run_dir,
                              progress=progress, baseline_records=splits.get("train"),
                              windows=cfg.dataset.rsfMRI.eval_windows)
    log(metrics_table(result.metrics))
    per_modality = per_modality_accuracy(result.metrics, result.predictions, used)
    log(_accuracy_line(per_modality))
    log("[4/5] asking one held-out subject")
    question, answer, truth, answers = _ask(trained.model_dir, test, used, log)
    log(f"[5/5] done in {time.time() - start:.0f} s")
    log(f"      run folder: {trained.run_dir}\n      model:      {trained.model_dir}\n"
        f"      report:     {result.out_dir / 'report.md'}\n"
        f"      metrics:    {result.out_dir / 'metrics.json'}")
    log(f"      look at the scans and ask in a browser:\n        {serve_command(trained.run_dir, result.out_dir, cohort.root, used)}")
    return DemoResult(trained.run_dir, trained.model_dir, result.out_dir, result.metrics,
                      question, answer, truth, time.time() - start, per_modality, answers)
