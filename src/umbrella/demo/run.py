"""`umbrella demo`: build the embedded cohort, train the tiny preset on T1 sex, evaluate, ask.

Everything lands under ``--out`` (default ``umbrella-demo/``)::

    cohort/      NIfTI images, phenotype.csv, cohort.json
    records/     sex_T1.jsonl (LLaVA form, subject-level stratified splits)
    demo.yaml    the config used: rerun with `umbrella train -c <out>/demo.yaml`
    runs/...     the run folder (model, checkpoints, logs) and evaluation/
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umbrella.config import UmbrellaConfig, load_config, save_config
from umbrella.demo.cohort import DemoCohort, build_demo_cohort
from umbrella.io import atomic_write_jsonl
from umbrella.tasks.conversations import classification_record, subject_splits
from umbrella.tasks.registry import SEX

DEMO_SPLITS = (0.6, 0.2, 0.2)


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


def write_sex_records(cohort: DemoCohort, path: Path, seed: int) -> Path:
    """One T1 sex question per subject, split by subject and stratified by sex."""
    split = subject_splits([s.subject_id for s in cohort.subjects],
                           [s.sex for s in cohort.subjects], DEMO_SPLITS, seed=12345 + seed)
    rng = np.random.default_rng(seed)
    rows = [classification_record(SEX, subject_id=s.subject_id, answer=s.sex,
                                  images=[{"modality": "T1", "path": s.t1_path}], study="DEMO",
                                  split=split[s.subject_id], rng=rng, metadata={"age": s.age})
            for s in cohort.subjects]
    return atomic_write_jsonl(path, rows)


def demo_config(out: Path, records: Path, cohort_root: Path, image_size: int, patch: int,
                seed: int, overrides: list[str]) -> UmbrellaConfig:
    base = [f"dataset.T1.records=[{records}]", f"dataset.T1.data_root={cohort_root}",
            f"dataset.T1.image_size=[{image_size},{image_size},{image_size}]",
            f"dataset.T1.patch_size=[{patch},{patch},{patch}]", "dataset.T1.studies=[DEMO]",
            "dataset.memoize=true", f"training.output_dir={out / 'runs'}",
            f"training.seed={seed}", "training.max_steps=200", "training.eval_steps=50",
            "training.logging_steps=10", "evaluation.split=test"]
    return load_config(None, base + list(overrides))


def run_demo(out: str | Path = "umbrella-demo", *, seed: int = 0, n_subjects: int = 200,
             image_size: int = 96, patch: int = 16, overrides: list[str] = (),
             progress: bool = True, log=print) -> DemoResult:
    from umbrella.evaluation.evaluate import evaluate_records
    from umbrella.evaluation.report import metrics_table
    from umbrella.inference import BrainAssistant
    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.training.run import train

    start, out = time.time(), Path(out).resolve()
    log(f"[1/5] building the demo cohort ({n_subjects} subjects) in {out / 'cohort'}")
    cohort = build_demo_cohort(out / "cohort", n_subjects, seed=seed,
                               image_size=(image_size,) * 3, voxel_mm=2.1 * 96 / image_size,
                               progress=progress)
    records = write_sex_records(cohort, out / "records" / "sex_T1.jsonl", seed)
    cfg = demo_config(out, records, cohort.root, image_size, patch, seed, list(overrides))
    save_config(cfg, out / "demo.yaml")
    log(f"[2/5] training the '{cfg.model.preset}' preset on T1 sex for "
        f"{cfg.training.max_steps} steps (config: {out / 'demo.yaml'})")
    trained = train(cfg, progress=progress)
    log(f"      trained in {trained.seconds:.0f} s, mean training loss {trained.train_loss:.3f}")
    log(f"[3/5] evaluating on the held-out '{cfg.evaluation.split}' split")
    test = by_split(load_config_records(cfg)).get(cfg.evaluation.split, [])
    result = evaluate_records(trained.model_dir, test, trained.run_dir / "evaluation",
                              split=cfg.evaluation.split, scoring=cfg.evaluation.scoring,
                              batch_size=cfg.evaluation.batch_size, run_dir=trained.run_dir,
                              progress=progress)
    log(metrics_table(result.metrics))
    log("[4/5] asking one question about a held-out subject")
    rec = test[0]
    assistant = BrainAssistant(trained.model_dir)
    question = SEX.questions[0]
    answer = assistant.ask(question, [(im.modality, im.path) for im in rec.images])
    log(f"      {rec.subject_id}: Q: {question}  A: {answer}  (truth: {rec.answer})")
    log(f"[5/5] done in {time.time() - start:.0f} s")
    log(f"      run folder: {trained.run_dir}\n      model:      {trained.model_dir}\n"
        f"      report:     {result.out_dir / 'report.md'}\n"
        f"      metrics:    {result.out_dir / 'metrics.json'}")
    return DemoResult(trained.run_dir, trained.model_dir, result.out_dir, result.metrics,
                      question, answer, rec.answer, time.time() - start)
