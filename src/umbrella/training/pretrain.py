"""`umbrella pretrain`: the vision tower alone, supervised by the training split's answers.

A first stage before the VLM (issue 10's two-stage recipe, with a supervised first stage): the
tower the config would build (:func:`umbrella.model.build.vision_config`: preset, patch
embeddings, stems, population centering) reads every training image once per epoch, and one
linear head per (modality, task) on the mean of its last layer's tokens predicts the image's
answers: squared error of the standardised value for regression tasks, cross-entropy over the
options for classification tasks, summed over the tasks an image answers (an image asked for sex
and for age is one sample with two targets). AdamW with a one-cycle schedule, the training
split's augmentation (``dataset.<m>.augment``), the epoch of the lowest validation loss kept. No
language model: the tower learns from a signal as direct as a brain-age CNN's, which the answer
tokens of the VLM do not give it (benchmarks/README.md section 11, "Under scanner contrast").

Only the training split's answers are used for the weights; the validation split chooses the
epoch; the test split is never read. The VLM then starts from this tower with
``model.vision_init=<folder>`` (and, to keep it as trained, ``model.train_embeddings=frozen`` /
``model.train_vision=frozen``), or ``model.vision_init=pretrain``: `umbrella train` then runs this
stage itself first (:func:`first_stage`), into the default folder below.

Folder written (the tower first, the JSON last, each atomically; the JSON holds the tower file's
SHA-256, so a tower and a description of another run never pair)::

    <pretrain.output_dir>/        default <training.output_dir>/pretrain__<preset>__<hash>/seed_<n>
        vision_tower.safetensors  the tower's weights and buffers (BrainViTModel state dict)
        heads.safetensors         the kept epoch's linear heads (``<modality>__<task>.*``)
        pretrain.json             the tower's config, the heads' tasks, every epoch's validation
                                  loss and metrics, the kept epoch, split sizes, seconds, the
                                  SHA-256 of both weight files
        config.yaml               the resolved config

:func:`score` reads a folder back (:func:`load_pretrained`) and scores the tower's own heads on
any records (e.g. a held-out split, from a benchmark): what the first stage alone reaches.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from umbrella.config import UmbrellaConfig, config_to_dict, digest, save_config
from umbrella.data.cache import CACHE_VERSION, PreprocessCache
from umbrella.data.catalog import by_split, load_config_records, modality_inputs, model_geometry
from umbrella.data.collate import stack_images
from umbrella.data.dataset import InstructionDataset
from umbrella.data.records import Record
from umbrella.data.sampling import ModalityBatchSampler
from umbrella.errors import ConfigError, ModelError, RecordError
from umbrella.io import atomic_write_bytes, atomic_write_json
from umbrella.runtime import retain_freed_memory
from umbrella.task_registry import task_for_record

TOWER_FILE, HEADS_FILE, INFO_FILE = ("vision_tower.safetensors", "heads.safetensors",
                                     "pretrain.json")


@dataclass
class Item:
    """One image with every answer the split's records give for it."""

    modality: str
    record: Record  # the first record of the image: what the loader reads it through
    targets: dict[str, float | str] = field(default_factory=dict)


@dataclass
class Head:
    modality: str
    task: str
    kind: str  # regression | classification
    options: list[str] = field(default_factory=list)
    mean: float = 0.0  # regression: the training answers' mean and sd (targets standardised)
    sd: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.modality}__{self.task}"


def collect_items(records: list[Record]) -> tuple[list[Item], Counter]:
    """Single-image classification / regression records -> one item per image, its answers
    merged; returns the items and a count of records not used, by (task, reason). An answer the
    task cannot parse, or two different answers of one task for one image, raise RecordError."""
    items: dict[tuple[str, str], Item] = {}
    unused: Counter = Counter()
    for rec in records:
        spec = task_for_record(rec.task, rec.metadata)
        if spec is None or spec.kind not in ("classification", "regression"):
            unused[(rec.task, "free-text answers")] += 1
            continue
        if len(rec.images) != 1:
            unused[(rec.task, f"{len(rec.images)} images per question")] += 1
            continue
        value = spec.parse(rec.answer)
        if value is None:
            raise RecordError(f"answer {rec.answer!r} is not a valid {spec.name} answer",
                              record_id=rec.id, source=rec.source,
                              fix=f"write it as `umbrella prepare` does (e.g. "
                                  f"{spec.format_answer(spec.options[0] if spec.options else 1.0)!r})")
        image = rec.images[0]
        item = items.setdefault((image.modality, str(image.path)), Item(image.modality, rec))
        if rec.task in item.targets and item.targets[rec.task] != value:
            raise RecordError(f"image {image.path} answers {rec.task} with {value!r} here and "
                              f"{item.targets[rec.task]!r} in record {item.record.id!r}",
                              record_id=rec.id, source=rec.source,
                              fix="give each image one answer per task")
        item.targets[rec.task] = value
    return list(items.values()), unused


def make_heads(items: list[Item]) -> list[Head]:
    """One head per (modality, task) of the training items; regression targets standardised by
    the training answers."""
    heads = []
    for modality, task in sorted({(it.modality, t) for it in items for t in it.targets}):
        spec = task_for_record(task, next(it.record.metadata for it in items
                                          if it.modality == modality and task in it.targets))
        values = [it.targets[task] for it in items if it.modality == modality and task in it.targets]
        if spec.kind == "regression":
            arr = np.asarray(values, dtype=float)
            heads.append(Head(modality, task, "regression", mean=float(arr.mean()),
                              sd=float(arr.std()) if arr.std() > 0 else 1.0))
        else:
            heads.append(Head(modality, task, "classification", options=list(spec.options)))
    return heads


class TowerWithHeads(nn.Module):
    """The vision tower and one linear head per (modality, task) on the mean of its tokens."""

    def __init__(self, tower: nn.Module, heads: list[Head], dropout: float,
                 encoder_layers: bool = True):
        super().__init__()
        self.tower, self.specs, self.encoder_layers = tower, {h.key: h for h in heads}, encoder_layers
        width = tower.config.hidden_size
        self.heads = nn.ModuleDict({h.key: nn.Sequential(
            nn.Dropout(dropout), nn.Linear(width, 1 if h.kind == "regression" else len(h.options)))
            for h in heads})

    def forward(self, pixels: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        if self.encoder_layers:
            tokens = self.tower(pixels, modality=modality).last_hidden_state
        else:  # the patch embedding's tokens (stem, projection, positions)
            tokens = self.tower.embeddings[modality](pixels)
        pooled = tokens.mean(1)
        return {key: head(pooled) for key, head in self.heads.items()
                if self.specs[key].modality == modality}


def task_losses(outputs: dict[str, torch.Tensor], specs: dict[str, Head], targets: list[dict]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{task key: (mean loss over the images that answer it, each such image's unit error)}:
    squared error of the standardised value / absolute error in the task's unit for
    regression, cross-entropy / 0-1 error for classification."""
    out_losses = {}
    for key, out in outputs.items():
        h = specs[key]
        rows = [i for i, t in enumerate(targets) if h.task in t]
        if not rows:
            continue
        out = out[rows]
        if h.kind == "regression":
            y = torch.tensor([float(targets[i][h.task]) for i in rows], dtype=out.dtype)
            pred = out.squeeze(1)
            loss = nn.functional.mse_loss(pred, (y - h.mean) / h.sd)
            err = (pred.detach() * h.sd + h.mean - y).abs()
        else:
            y = torch.tensor([h.options.index(targets[i][h.task]) for i in rows])
            loss = nn.functional.cross_entropy(out, y)
            err = (out.detach().argmax(1) != y).float()
        out_losses[key] = (loss, err)
    return out_losses


def batch_loss(per_task: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Sum over the batch's tasks (:func:`task_losses`) of each task's mean loss over the images
    that answer it; None when no image answers any task."""
    return sum(loss for loss, _ in per_task.values()) if per_task else None


class _Images(Dataset):
    """Item index -> (modality, image tensor, targets), read through an images-only
    :class:`InstructionDataset` (cache, memo, augmentation, rsfMRI windows as training reads them)."""

    def __init__(self, items: list[Item], images: InstructionDataset):
        self.items, self.images = items, images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        (modality, tensor), = self.images.scoring_sample(index)["images"]
        return modality, tensor, self.items[index].targets


def _collate(samples):
    return (samples[0][0], stack_images([s[1] for s in samples], dtype=torch.float32,
                                        modality=samples[0][0]), [s[2] for s in samples])


def output_dir(cfg: UmbrellaConfig) -> Path:
    """pretrain.output_dir, else <training.output_dir>/pretrain__<preset>__<hash>/seed_<n>, the
    hash over what shapes the tower (dataset, model, pretrain sections, the preprocessing's
    version)."""
    if cfg.pretrain.output_dir:
        return Path(cfg.pretrain.output_dir)
    tree = config_to_dict(cfg)
    tree = {k: tree[k] for k in ("dataset", "model", "pretrain")}
    tree["model"] = {k: v for k, v in tree["model"].items() if k != "vision_init"}
    tree["preprocessing"] = CACHE_VERSION  # a tower of other inputs is not reused (first_stage)
    return (Path(cfg.training.output_dir) / f"pretrain__{cfg.model.preset}__{digest(tree)}"
            / f"seed_{cfg.training.seed}")


def _check(cfg: UmbrellaConfig) -> None:
    """What the config's own checks cannot see (the pretrain keys' ranges are checked on loading)."""
    problems = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("`umbrella pretrain` runs in one process (every rank would train and "
                        "write the same tower); run `umbrella pretrain -c CONFIG` without "
                        "torchrun first (model.vision_init=pretrain then reuses its tower)")
    if cfg.model.base:
        problems.append("model.base is set: `umbrella pretrain` trains the tower of model.preset; "
                        "unset model.base")
    if problems:
        raise ConfigError(problems)


def _image_kwargs(cfg: UmbrellaConfig) -> dict:
    """How an images-only InstructionDataset of this config reads its images."""
    cache = PreprocessCache(cfg.dataset.cache_dir) if cfg.dataset.cache_dir else None
    return dict(encoder=None, inputs=modality_inputs(cfg), seed=cfg.training.seed,
                memoize=cfg.dataset.memoize, cache=cache)


def _eval_loader(items: list[Item], cfg: UmbrellaConfig) -> DataLoader:
    """Every item once, unaugmented (rsfMRI: the first window), in batches of one modality."""
    images = InstructionDataset([it.record for it in items], windows="first", **_image_kwargs(cfg))
    sampler = ModalityBatchSampler([it.modality for it in items], cfg.pretrain.batch_size,
                                   mixing="round_robin", seed=cfg.training.seed)
    return DataLoader(_Images(items, images), batch_sampler=sampler, collate_fn=_collate,
                      num_workers=cfg.training.num_workers)


def _errors(net: TowerWithHeads, loader) -> tuple[list[float], dict[str, np.ndarray]]:
    """Every batch through the net in evaluation mode, without gradients: each batch's loss and,
    per task key, every image's unit error (absolute error / 0-1 error). Leaves the net's mode."""
    training, losses, errors = net.training, [], {}
    net.eval()
    with torch.no_grad():
        for modality, pixels, targets in loader:
            per_task = task_losses(net(pixels, modality), net.specs, targets)
            if per_task:
                losses.append(float(batch_loss(per_task)))
            for key, (_, err) in per_task.items():
                errors.setdefault(key, []).append(err)
    net.train(training)
    return losses, {k: torch.cat(v).double().numpy() for k, v in errors.items()}


def _metric(head: Head, errors: np.ndarray) -> dict[str, float]:
    """MAE (regression) or accuracy (classification) of a task's unit errors."""
    mean = float(errors.mean())
    return {"mae": mean} if head.kind == "regression" else {"accuracy": 1.0 - mean}


def _evaluate(net: TowerWithHeads, loader: DataLoader) -> dict:
    """Validation loss (mean over batches) and per task: MAE (regression) or accuracy, n."""
    losses, errors = _errors(net, loader)
    return {"loss": float(np.mean(losses)) if losses else math.nan,
            "tasks": {k: {**_metric(net.specs[k], e), "n": len(e)} for k, e in errors.items()}}


def _describe(metrics: dict) -> str:
    parts = [f"{k.split('__', 1)[1]} " + (f"MAE {v['mae']:.3f}" if "mae" in v
                                          else f"accuracy {v['accuracy']:.3f}")
             for k, v in metrics["tasks"].items()]
    return f"loss {metrics['loss']:.4f}" + ("; " + ", ".join(parts) if parts else "")


def pretrain(cfg: UmbrellaConfig, *, progress: bool = True, log=print) -> Path:
    """Train the tower on the training split's answers; returns the folder written."""
    from safetensors.torch import save

    from umbrella.model.build import vision_config
    from umbrella.model.modeling_brain_vit import BrainViTModel
    from umbrella.training.run import augmenter, environment

    _check(cfg)
    retain_freed_memory()
    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    p, seed = cfg.pretrain, cfg.training.seed
    splits = by_split(load_config_records(cfg))
    if not splits.get("train"):
        raise ConfigError("no record of the config is in the training split; `umbrella pretrain` "
                          "learns from the training split's answers")
    train_items, unused = collect_items(splits["train"])
    if not train_items:
        raise ConfigError("no training record is a one-image classification or regression "
                          "question: there is nothing for `umbrella pretrain` to learn from")
    for (task, why), n in sorted(unused.items()):
        log(f"pretrain: {n} training record(s) of task {task!r} not used ({why})")
    heads = make_heads(train_items)
    keys = {h.key for h in heads}
    val_items = [it for it in collect_items(splits.get("val", []))[0]
                 if any(f"{it.modality}__{t}" in keys for t in it.targets)]
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    augment = {m: augmenter(m, s) for m, s in cfg.dataset.enabled().items() if s.augment}
    train_images = InstructionDataset([it.record for it in train_items], augment=augment,
                                      windows="random", **_image_kwargs(cfg))
    sampler = ModalityBatchSampler([it.modality for it in train_items], p.batch_size,
                                   mixing=cfg.dataset.mixing, temperature=cfg.dataset.temperature,
                                   seed=seed)
    train_loader = DataLoader(_Images(train_items, train_images), batch_sampler=sampler,
                              collate_fn=_collate, num_workers=cfg.training.num_workers)
    val_loader = _eval_loader(val_items, cfg) if val_items else None

    torch.manual_seed(seed)
    tower = BrainViTModel(vision_config(cfg.model, model_geometry(cfg)))
    net = TowerWithHeads(tower, heads, p.head_dropout, p.encoder_layers)
    net.train()
    steps = p.epochs * len(sampler)
    opt = torch.optim.AdamW(net.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.learning_rate, total_steps=steps)
    tasks = ", ".join(f"{h.task} ({h.modality}, {h.kind})" for h in heads)
    log(f"pretrain: {len(train_items)} training / {len(val_items)} validation images; heads: "
        f"{tasks}; {p.epochs} epochs of {len(sampler)} steps")
    history, best, best_state = [], None, None
    select = val_loader is not None and p.keep_best  # else the last epoch is kept
    start = time.time()
    bar = tqdm(total=steps, desc="pretrain", disable=not progress)
    for epoch in range(p.epochs):
        train_images.set_epoch(epoch)
        sampler.set_epoch(epoch)
        running = []
        for modality, pixels, targets in train_loader:
            loss = batch_loss(task_losses(net(pixels, modality), net.specs, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(running)),
                 "seconds": round(time.time() - start, 1)}
        if val_loader is not None:
            entry["val"] = _evaluate(net, val_loader)
            log(f"pretrain epoch {epoch + 1}/{p.epochs}: validation {_describe(entry['val'])} "
                f"({entry['seconds']:.0f} s)")
        history.append(entry)
        if not (select and best and entry["val"]["loss"] >= best["val"]["loss"]):
            best, best_state = entry, copy.deepcopy(net.state_dict())
    bar.close()

    files = {}
    for name, prefix in ((TOWER_FILE, "tower."), (HEADS_FILE, "heads.")):
        files[name] = save({k[len(prefix):]: v.detach().contiguous()
                            for k, v in best_state.items() if k.startswith(prefix)},
                           metadata={"format": "pt"})
        atomic_write_bytes(out / name, files[name])
    save_config(cfg, out / "config.yaml")
    info = {"vision_config": _tower_signature(tower.config),
            "sha256": hashlib.sha256(files[TOWER_FILE]).hexdigest(),
            "heads_sha256": hashlib.sha256(files[HEADS_FILE]).hexdigest(),
            "heads": [h.__dict__ for h in heads], "epochs": history,
            "kept_epoch": best["epoch"], "encoder_layers": p.encoder_layers,
            "selection": "val_loss" if select else "last",
            "train_images": len(train_items),
            "val_images": len(val_items),
            "unused_records": [{"task": t, "reason": w, "records": n}
                               for (t, w), n in sorted(unused.items())],
            "seconds": round(time.time() - start, 1), "env": environment()}
    atomic_write_json(out / INFO_FILE, info)
    log(f"pretrain: kept epoch {best['epoch']} of {p.epochs}"
        + (f" (validation {_describe(best['val'])})" if "val" in best else "")
        + f"; written: {out}")
    return out


AUTO = "pretrain"  # model.vision_init=pretrain: `umbrella train` runs this stage first


def first_stage(cfg: UmbrellaConfig, *, progress: bool = True, log=print) -> UmbrellaConfig:
    """``cfg`` with ``model.vision_init=pretrain`` resolved: the tower of :func:`pretrain` on
    this config (its folder :func:`output_dir`, shared with a separate `umbrella pretrain` of the
    same config and seed), trained now unless that folder already holds a complete one (its
    pretrain.json, written last), then named in ``model.vision_init``. Any other value: ``cfg``
    unchanged. Under torchrun a complete tower is reused; training one is refused by
    :func:`pretrain` (one process)."""
    if cfg.model.vision_init != AUTO:
        return cfg
    folder = output_dir(cfg)
    if (folder / INFO_FILE).is_file():
        log(f"pretrain: reusing the tower in {folder} (same config and seed; delete the folder "
            "to train it again)")
    else:
        log(f"pretrain: training the vision tower first (model.vision_init=pretrain) into {folder}")
        folder = pretrain(cfg, progress=progress, log=log)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vision_init=str(folder)))


def _tower_signature(config) -> dict:
    """What must agree for a saved tower to load into another: sizes and every modality's spec."""
    return json.loads(json.dumps({
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "modalities": config.modalities}))


def load_vision_init(tower, folder: str | Path, log=print) -> dict:
    """Load a tower written by :func:`pretrain` into ``tower`` (a BrainViTModel) in place.

    Sizes must agree and every modality both have must have the same spec (geometry, embedding,
    stem, centering); a modality only the model has keeps its fresh weights, one only the file
    has is skipped (both logged). Raises ConfigError naming model.vision_init and each difference.
    Returns {"loaded": [modalities], "fresh": [...], "skipped": [...]}.
    """
    from safetensors.torch import load

    folder = Path(folder)
    key = f"model.vision_init={str(folder)!r}"
    info, data = _read_folder(folder, key, TOWER_FILE)
    saved, mine = info["vision_config"], _tower_signature(tower.config)
    problems = [f"{key}: the pretrained tower has {k}={saved[k]}, this config's {mine[k]}"
                for k in mine if k != "modalities" and saved[k] != mine[k]]
    shared = [m for m in mine["modalities"] if m in saved["modalities"]]
    for m in shared:
        a, b = saved["modalities"][m], mine["modalities"][m]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                problems.append(f"{key}: modality {m}: the pretrained tower has {k}={a.get(k)}, "
                                f"this config's {b.get(k)}")
    if not shared:
        problems.append(f"{key}: the pretrained tower reads {', '.join(saved['modalities'])}, "
                        f"this model {', '.join(mine['modalities'])}: no modality in common")
    if problems:
        raise ConfigError(problems)
    fresh = [m for m in mine["modalities"] if m not in shared]
    skipped = [m for m in saved["modalities"] if m not in mine["modalities"]]
    state = {k: v for k, v in load(data[TOWER_FILE]).items()
             if not any(k.startswith(f"embeddings.{m}.") for m in skipped)}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    allowed = tuple(f"embeddings.{m}." for m in fresh)
    wrong = [k for k in missing if not k.startswith(allowed)] + list(unexpected)
    if wrong:
        raise ModelError(f"{folder / TOWER_FILE} does not match the tower: "
                         f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    log(f"vision tower initialised from {folder} (epoch {info.get('kept_epoch')}; "
        f"{', '.join(shared)}" + (f"; fresh: {', '.join(fresh)}" if fresh else "")
        + (f"; not in this model: {', '.join(skipped)}" if skipped else "") + ")")
    return {"loaded": shared, "fresh": fresh, "skipped": skipped}


_SHA_KEYS = {TOWER_FILE: "sha256", HEADS_FILE: "heads_sha256"}


def _read_folder(folder: Path, key: str, *names: str) -> tuple[dict, dict[str, bytes]]:
    """pretrain.json and the named weight files of a pretrain folder, each file read once and
    checked against the SHA-256 the JSON holds; ConfigError (naming ``key``) otherwise."""
    missing = [n for n in (INFO_FILE, *names) if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"{key}: {folder} holds no {' / '.join(missing)}; point at a folder "
                          "written by `umbrella pretrain` (it prints the folder)")
    info = json.loads((folder / INFO_FILE).read_text())
    data = {n: (folder / n).read_bytes() for n in names}
    for n, blob in data.items():
        if hashlib.sha256(blob).hexdigest() != info.get(_SHA_KEYS[n]):
            raise ConfigError(f"{key}: {n} is not the file {INFO_FILE} describes (its SHA-256 "
                              "differs); run `umbrella pretrain` again into this folder")
    return info, data


def load_pretrained(folder: str | Path) -> tuple[TowerWithHeads, UmbrellaConfig]:
    """The tower and heads a :func:`pretrain` folder holds (its config.yaml rebuilds them), in
    evaluation mode, with the config."""
    from safetensors.torch import load

    from umbrella.config import load_config
    from umbrella.model.build import vision_config
    from umbrella.model.modeling_brain_vit import BrainViTModel

    folder = Path(folder)
    info, data = _read_folder(folder, f"pretrain folder {str(folder)!r}", TOWER_FILE, HEADS_FILE)
    cfg = load_config(folder / "config.yaml")
    net = TowerWithHeads(BrainViTModel(vision_config(cfg.model, model_geometry(cfg))),
                         [Head(**h) for h in info["heads"]], cfg.pretrain.head_dropout,
                         info["encoder_layers"])
    net.tower.load_state_dict(load(data[TOWER_FILE]))
    net.heads.load_state_dict(load(data[HEADS_FILE]))
    return net.eval(), cfg


def score(folder: str | Path, records: list[Record], *, seed: int = 0, resamples: int = 1000,
          progress: bool = False) -> dict[str, dict]:
    """The first stage alone: a :func:`pretrain` folder's tower and heads answer ``records``
    (one-image classification / regression questions of the heads' tasks; others are ignored).
    Per head key: task, modality, n (images), ``mae`` or ``accuracy`` and its 95% percentile
    bootstrap interval over images (``ci``)."""
    from umbrella.evaluation.metrics import bootstrap_ci

    net, cfg = load_pretrained(folder)
    items = [it for it in collect_items(records)[0]
             if any(f"{it.modality}__{t}" in net.specs for t in it.targets)]
    loader = _eval_loader(items, cfg) if items else []
    _, errors = _errors(net, tqdm(loader, desc="score", disable=not progress))
    out = {}
    for key, e in errors.items():
        h = net.specs[key]
        metric = _metric(h, e)
        (name,) = metric
        out[key] = {"task": h.task, "modality": h.modality, "n": len(e), **metric,
                    "ci": bootstrap_ci(lambda rows, e=e, h=h: _metric(h, e[rows]), len(e),
                                       resamples=resamples, seed=seed)[name]}
    return out
