"""`umbrella train`: config -> run folder with the trained model.

Run folder layout (enough to evaluate and to ask)::

    <output_dir>/<task>__<preset>__<hash>/seed_<n>/
        config.yaml        resolved config
        env.json           host, versions, threads
        splits.json        subject -> split actually used
        log_history.json   training/validation losses per step
        best.json          the selected step (training.select_best) and every evaluation's value
        checkpoints/       intermediate checkpoints (training.save_steps)
        model/             the selected (else the last) weights (safetensors) + tokenizer +
                           preprocessing.json + tasks.json
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

import umbrella
from umbrella.config import TrainingConfig, UmbrellaConfig, config_to_dict, digest, save_config
from umbrella.data.cache import CacheKeys, PreprocessCache
from umbrella.data.catalog import (
    by_split,
    cached_images,
    load_config_records,
    modality_inputs,
    model_geometry,
    save_preprocessing,
)
from umbrella.data.collate import BrainCollator
from umbrella.data.dataset import BadSamplePolicy, InstructionDataset
from umbrella.data.numeric_labels import NumericLabels
from umbrella.data.prompts import PromptEncoder
from umbrella.data.tokenizer import record_texts, train_tokenizer
from umbrella.data.volumes import VolumeAugment
from umbrella.errors import ConfigError
from umbrella.io import atomic_write_json
from umbrella.model.build import build_brain_llava, token_pool_setting, with_patch_embed
from umbrella.model.modeling_brain_vit import enable_output_cache, output_cache_counts
from umbrella.model.trainable import apply_trainable_policy, save_trained
from umbrella.runtime import retain_freed_memory, retaining
from umbrella.task_registry import TASKS
from umbrella.tasks.known import save_tasks
from umbrella.training.best import KeepBest, resolve_criterion, whole_weights
from umbrella.training.callbacks import (
    MARKER,
    CheckpointMarker,
    EpochSetter,
    GenerationLogger,
    GracefulStop,
    PartMetrics,
    ReleaseIdleGrads,
    checkpoint_complete,
    latest_complete_checkpoint,
)
from umbrella.training.pretrain import first_stage
from umbrella.training.trainer import UmbrellaTrainer
from umbrella.training.validation import ValidationMetric


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    train_loss: float
    seconds: float
    best: dict | None = None  # best.json's content when a checkpoint was selected


def run_dir_for(cfg: UmbrellaConfig, task_names: list[str]) -> Path:
    """<output_dir>/<task>__<preset>__<hash of the config>/seed_<n>."""
    tree = config_to_dict(cfg)
    tree["training"] = {k: v for k, v in tree["training"].items()
                        if k not in ("output_dir", "run_name", "seed", "num_workers", "threads",
                                     "resume")}
    task = "+".join(sorted(set(task_names))) or "chat"
    name = cfg.training.run_name or f"{task}__{cfg.model.preset}__{digest(tree)}"
    return Path(cfg.training.output_dir) / name / f"seed_{cfg.training.seed}"


def environment() -> dict:
    import transformers

    return {"host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "umbrella": umbrella.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
            "retain_freed_memory": retaining(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _tokenizer_corpus(records) -> list[str]:
    texts = list(record_texts(records))
    for task in TASKS.values():
        texts += list(task.questions) + list(task.options)
    return texts


def augmenter(modality: str, section) -> VolumeAugment:
    """The training split's augmentation of one modality from its ``augment_ranges``
    (flips along the left-right axis only: the canonical RAS+ x axis)."""
    if modality == "rsfMRI":
        raise ConfigError("dataset.rsfMRI.augment=true: augmentation applies to 3D volumes (T1, "
                          "dMRI); rsfMRI training already draws a random window per step. Set "
                          "dataset.rsfMRI.augment=false")
    try:
        return VolumeAugment(flip_axes=(0,), **asdict(section.augment_ranges))
    except ValueError as exc:
        raise ConfigError(f"dataset.{modality}.augment_ranges: {exc}") from exc


def _datasets(cfg: UmbrellaConfig, splits: dict, encoder: PromptEncoder, run_dir: Path):
    inputs = modality_inputs(cfg)
    augment = {m: augmenter(m, s) for m, s in cfg.dataset.enabled().items() if s.augment}
    cache = PreprocessCache(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else None
    common = dict(encoder=encoder, inputs=inputs, seed=cfg.training.seed,
                  max_length=cfg.model.max_length, memoize=cfg.dataset.memoize, cache=cache)
    def policy():
        return BadSamplePolicy(cfg.dataset.on_bad_sample, cfg.dataset.max_bad_fraction,
                               run_dir / "bad_samples.jsonl")

    smoothing, ev_weight = cfg.training.numeric_label_smoothing, cfg.training.numeric_ev_loss
    common["numeric"] = (NumericLabels(encoder.tok, splits["train"], smoothing, ev_weight)
                         if smoothing > 0 or ev_weight > 0 else None)
    if common["numeric"] is not None and not common["numeric"].sigma:
        key = "numeric_label_smoothing" if smoothing > 0 else "numeric_ev_loss"
        value = smoothing if smoothing > 0 else ev_weight
        raise ConfigError(f"training.{key}={value} applies to regression "
                          "answers, but no training record is one (a numeric answer that varies, "
                          "with metadata.task_spec.kind 'regression', as `umbrella prepare` "
                          "writes); set it to 0 or add such records")
    train = InstructionDataset(splits["train"], augment=augment, windows="random",
                               bad_samples=policy(), **common)
    val = (InstructionDataset(splits["val"], windows="first", bad_samples=policy(), **common)
           if splits.get("val") else None)
    return inputs, train, val


def data_source(cfg: UmbrellaConfig, records) -> str:
    """One line saying where training reads images from: the preprocessing cache (and how many
    of the referenced images it already holds, per modality) or decoding."""
    d = cfg.dataset
    if not d.cache_dir:
        how = "kept in RAM after first use (dataset.memoize)" if d.memoize else "at every access"
        return (f"images: decoded from the source files, {how}; set dataset.cache_dir and run "
                "`umbrella cache` to preprocess them once")
    cached, keys = PreprocessCache(d.cache_dir).keys(), CacheKeys()  # one listing, no stat per entry
    total, ready = Counter(), Counter()
    for _rec, image, mod, params in cached_images(cfg, records):  # no job objects kept
        total[image.modality] += 1
        ready[image.modality] += keys.key(image.path, image.modality, params,
                                          mod.extra_sources(image)) in cached
    counts = ", ".join(f"{m} {ready[m]}/{n} ready" for m, n in total.items())
    missing = sum(total.values()) - sum(ready.values())
    return (f"images: from the preprocessing cache {d.cache_dir} ({counts})"
            + (f"; {missing} will be built on first use (`umbrella cache` builds them in parallel)"
               if missing else ""))


def make_model(cfg: UmbrellaConfig, train_records):
    """A converted pretrained LLaVA (model.base) or a fresh preset with a tokenizer trained on the
    training records; the tower of ``umbrella pretrain`` where model.vision_init names one; then
    the freeze / LoRA policy."""
    m = cfg.model
    if m.base:
        from umbrella.model.convert import convert_pretrained_llava

        dtype = getattr(torch, m.dtype) if m.dtype else None
        model, tokenizer, _ = convert_pretrained_llava(
            m.base, with_patch_embed(m, model_geometry(cfg)), dtype=dtype)
        if m.token_pool != 1:  # read by the model at every forward, saved with its config
            model.config.vision_token_pool = token_pool_setting(m.token_pool)
    else:
        tokenizer = train_tokenizer(_tokenizer_corpus(train_records), m.vocab_size)
        model = build_brain_llava(m, model_geometry(cfg), tokenizer, seed=cfg.training.seed,
                                  token_pool=m.token_pool)
    if m.vision_init:
        from umbrella.training.pretrain import load_vision_init

        load_vision_init(model.model.vision_tower, m.vision_init)
    model = apply_trainable_policy(model, vision=m.train_vision, projector=m.train_projector,
                                   llm=m.train_llm, lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                                   lora_dropout=m.lora_dropout, embeddings=m.train_embeddings)
    enable_output_cache(model, m.embedding_cache_mb)
    return model, tokenizer


def _precision(choice: str) -> dict:
    cuda = torch.cuda.is_available()
    if choice == "auto":
        choice = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if choice in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"training.precision={choice} needs a CUDA device; use fp32 or auto on CPU")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def check_devices() -> None:
    """One GPU per process: more local ranks than visible CUDA devices is refused up front
    (NCCL would stop at the first collective with 'Duplicate GPU detected')."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and torch.cuda.is_available() and torch.cuda.device_count() < local:
        raise ConfigError(
            f"{local} processes per node but {torch.cuda.device_count()} CUDA device(s) visible: "
            f"launch with --nproc_per_node {torch.cuda.device_count()}, or train on CPU with "
            "CUDA_VISIBLE_DEVICES= (gloo)")


def _arguments(cfg: UmbrellaConfig, run_dir: Path, has_val: bool, progress: bool):
    t = cfg.training
    evaluate = has_val and t.eval_steps > 0
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler, gradient_accumulation_steps=t.gradient_accumulation_steps,
        eval_strategy="steps" if evaluate else "no", eval_steps=t.eval_steps if evaluate else None,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, report_to=[] if cfg.tracking.report_to == "none"
        else [cfg.tracking.report_to], run_name=run_dir.parent.name,
        dataloader_num_workers=t.num_workers, seed=t.seed, remove_unused_columns=False,
        disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(), save_only_model=False,
        ddp_find_unused_parameters=False, deepspeed=t.deepspeed,
        activation_checkpointing=t.gradient_checkpointing, **_precision(t.precision))


def resume_checkpoint(cfg: UmbrellaConfig, run_dir: Path) -> str | None:
    """training.resume: none | auto (newest complete checkpoint, if any) | a checkpoint folder."""
    choice = cfg.training.resume
    if choice == "none":
        return None
    if choice == "auto":
        found = latest_complete_checkpoint(run_dir / "checkpoints")
        return str(found) if found else None
    if not checkpoint_complete(Path(choice)):
        raise ConfigError(f"training.resume={choice!r} is not a complete checkpoint folder "
                          f"(no valid {MARKER}); use training.resume=auto to pick the newest one")
    return choice


_TRACKING_ENV_SET: dict[str, str] = {}  # what _tracking_env itself put in the environment


def _tracking_env(cfg: UmbrellaConfig, run_dir: Path) -> None:
    """Trackers write under this run's folder; keys only ever come from the environment.

    A variable the user exported is kept; one this function set for an earlier run in the same
    process (a notebook, a sweep) is replaced, so each run's tracker files land in its own folder.
    """
    wanted = {"WANDB_PROJECT": cfg.tracking.project, "WANDB_DIR": str(run_dir),
              "MLFLOW_EXPERIMENT_NAME": cfg.tracking.project,
              # MLflow's file store is in maintenance mode: a SQLite file in the run folder
              "MLFLOW_TRACKING_URI": f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"}
    for name, value in wanted.items():
        if name not in os.environ or os.environ[name] == _TRACKING_ENV_SET.get(name):
            os.environ[name] = value
            _TRACKING_ENV_SET[name] = value


def _finish_trackers(cfg: UmbrellaConfig) -> None:
    """Close this run's wandb run (transformers leaves it open): its files are flushed now, and a
    later train() in the same process starts a run of its own instead of logging into this one."""
    if cfg.tracking.report_to == "wandb":
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
            wandb.teardown()  # wandb keeps settings (WANDB_DIR) per process until torn down


def _callbacks(cfg, model, encoder, train_set, val_set, run_dir, keeper=None):
    parts = PartMetrics(model)
    # KeepBest before CheckpointMarker: its files in a checkpoint are covered by the marker
    callbacks = [EpochSetter(train_set), ReleaseIdleGrads(model), *([keeper] if keeper else []),
                 CheckpointMarker(), GracefulStop(), parts]
    if val_set is not None and cfg.training.generation_log_every > 0:
        callbacks.append(GenerationLogger(model, encoder, val_set, run_dir / "generations.jsonl",
                                          every=cfg.training.generation_log_every,
                                          samples=cfg.training.generation_log_samples,
                                          max_new_tokens=cfg.evaluation.max_new_tokens))
    return callbacks, parts


def train(cfg: UmbrellaConfig, *, progress: bool = True, extra_callbacks=()) -> TrainResult:
    """Train BrainLlava on the configured records; returns where the run and the model are."""
    start = time.time()
    check_devices()
    retain_freed_memory()
    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    set_seed(cfg.training.seed)
    records = load_config_records(cfg)
    splits = by_split(records)
    if not splits.get("train"):
        raise ConfigError(f"no records with split 'train' (found splits: {', '.join(splits) or 'none'})")
    run_dir = run_dir_for(cfg, [r.task for r in records])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_json(run_dir / "env.json", environment())
    atomic_write_json(run_dir / "splits.json", {r.subject_id: r.split for r in records})
    _tracking_env(cfg, run_dir)
    criterion = selection_criterion(cfg, bool(splits.get("val")))
    weights = task_loss_weights(cfg, splits["train"])
    resume = resume_checkpoint(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(data_source(cfg, records), flush=True)
        notice = pipeline_check_notice(cfg, splits["train"])
        if notice:
            print(notice, flush=True)
    cfg = first_stage(cfg, progress=progress)  # model.vision_init=pretrain: the tower first

    model, tokenizer = make_model(cfg, splits["train"])
    encoder = PromptEncoder(tokenizer)
    inputs, train_set, val_set = _datasets(cfg, splits, encoder, run_dir)
    keeper = None if criterion == "none" else KeepBest(
        model, criterion, run_dir, patience=cfg.training.early_stopping_patience,
        min_delta=cfg.training.early_stopping_min_delta, resume_from=resume)
    callbacks, parts = _callbacks(cfg, model, encoder, train_set, val_set, run_dir, keeper)
    trainer = UmbrellaTrainer(
        model=model, args=_arguments(cfg, run_dir, val_set is not None, progress),
        train_dataset=train_set, eval_dataset=val_set,
        data_collator=BrainCollator(
            tokenizer.pad_token_id, pad_to_multiple_of=cfg.dataset.pad_to_multiple_of or None,
            # on CPU images are cast to float32 while batching; a GPU gets float16 and casts there
            image_dtype=None if torch.cuda.is_available() else torch.float32),
        callbacks=callbacks + list(extra_callbacks), mixing=cfg.dataset.mixing,
        vision_learning_rate=cfg.training.vision_learning_rate,
        task_loss_weights=weights,
        temperature=cfg.dataset.temperature, part_metrics=parts,
        val_metrics=ValidationMetric(val_set, encoder, splits["train"])
        if criterion == "metric" else None)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        _finish_trackers(cfg)
    best = keeper.finish() if keeper is not None else None  # the best weights back into the model
    with whole_weights(trainer.model):  # DeepSpeed ZeRO-3: gathered (all ranks), else a no-op
        if trainer.is_world_process_zero():
            save_model(trainer.model, tokenizer, inputs, run_dir / "model")
            save_tasks(splits["train"], run_dir / "model")  # what `ask` / `serve` may be asked
            atomic_write_json(run_dir / "log_history.json", trainer.state.log_history)
            counts = output_cache_counts(trainer.model)
            if counts["hits"]:
                print(f"patch embeddings: {counts['hits']} images from the cache, "
                      f"{counts['misses']} embedded ({counts['entries']} kept; "
                      "model.embedding_cache_mb)", flush=True)
    return TrainResult(run_dir, run_dir / "model", float(result.training_loss), time.time() - start,
                       best)


def task_loss_weights(cfg: UmbrellaConfig, train_records) -> dict[str, float]:
    """``training.task_loss_weights``, checked: every weight > 0 and every task named among the
    training records' tasks (a misspelt task would otherwise weigh nothing, silently)."""
    weights = {str(k): float(v) for k, v in cfg.training.task_loss_weights.items()}
    tasks = sorted({r.task for r in train_records})
    problems = [f"training.task_loss_weights.{t}={w}: a weight must be > 0" for t, w in weights.items()
                if not w > 0]
    problems += [f"training.task_loss_weights names task {t!r}, which no training record has "
                 f"(training tasks: {', '.join(tasks)})" for t in weights if t not in tasks]
    if problems:
        raise ConfigError(problems)
    return weights


PIPELINE_CHECK_SUBJECTS = 200  # from this many training subjects the notice below is printed


def pipeline_check_notice(cfg: UmbrellaConfig, train_records) -> str | None:
    """A note when a cohort-sized training split meets the project's defaults, a quick pipeline
    check (``training.max_steps`` left at 150, no recipe): on 1,400 training subjects those
    defaults read age at 10.8 years MAE against the ridge reference's 4.9, the recipe 4.6 on the
    same files (benchmarks/README.md section 14). None otherwise."""
    subjects = len({r.subject_id for r in train_records})
    if (cfg.recipe != "none" or cfg.training.max_steps != TrainingConfig.max_steps
            or subjects < PIPELINE_CHECK_SUBJECTS):
        return None
    enabled = set(cfg.dataset.enabled())
    advice = ("add `recipe: t1_two_stage` to the config (or recipe=t1_two_stage on the command "
              "line), as the train.yaml `umbrella prepare` writes does" if enabled == {"T1"} else
              "set training.max_steps and the model's settings for your modalities "
              "(benchmarks/README.md section 11 lists what was measured on rsfMRI)")
    return (f"note: training.max_steps={cfg.training.max_steps} and the other defaults are a quick "
            f"pipeline check, not a recipe that learns from {subjects:,} training subjects: "
            f"{advice}")


def selection_criterion(cfg: UmbrellaConfig, has_val: bool) -> str:
    """training.select_best resolved (none | val_loss | metric), checked with early stopping."""
    t = cfg.training
    criterion = resolve_criterion(t.select_best, has_val, t.eval_steps)
    if t.early_stopping_patience and criterion == "none":
        raise ConfigError(f"training.early_stopping_patience={t.early_stopping_patience} watches "
                          "the selection criterion, but training.select_best resolves to none; "
                          "set select_best=val_loss or metric (with a validation split and "
                          "eval_steps > 0), or early_stopping_patience=0")
    return criterion


def best_summary(best: dict | None) -> str | None:
    """One line for the end of `umbrella train`: what was kept as the model, and why it stopped."""
    if not best or best.get("step") is None:
        return None
    line = (f"best: {best['criterion']} {best['value']:.4g} at step {best['step']} of "
            f"{best['last_step']} (kept as the model; best.json lists every evaluation)")
    stopped = best["early_stopping"]["stopped"]
    if stopped:
        line += f"\nearly stopping at step {stopped['step']}: {stopped['reason']}"
    return line


def save_model(model, tokenizer, inputs, folder: Path) -> Path:
    """Model (safetensors), tokenizer and preprocessing settings, written to a temp folder first."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    save_trained(model, tmp, tokenizer)  # LoRA adapters are kept unmerged beside the weights
    save_preprocessing(inputs, tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        import shutil

        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder
