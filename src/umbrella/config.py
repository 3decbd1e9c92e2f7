"""Typed configuration: dataclasses + YAML + dotlist overrides.

Sections mirror the YAML known from the original UMBRELLA: ``dataset.{T1,rsfMRI,dMRI}``, ``model``,
``training``, ``evaluation``, ``tracking``. Unknown keys and wrong types are errors that name the key
and the nearest valid one; all problems are reported together in one :class:`ConfigError`.

    cfg = load_config("configs/demo.yaml", ["training.max_steps=20"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from umbrella.errors import ConfigError, ModelError
from umbrella.geometry import STEM_STYLES, normalize_token_pool

MODALITIES = ("T1", "rsfMRI", "dMRI")


@dataclass
class AugmentRanges:
    """Ranges of the training-split augmentation (``dataset.<m>.augment: true``); 0 drops that
    transform. Defaults: what the learning benchmark measured on the realistic cohort
    (benchmarks/README.md section 11): left-right flips, rotations up to +-5 deg and translations
    up to +-4 voxels (8.4 mm at the default 2.1 mm grid; the benchmark's +-2 voxels at 4 mm), no
    scaling and no intensity change. Scaling by a few per cent erases a scale effect of that
    order (sex through brain size, ~2 % in radius), and neither it nor the intensity change was
    ever measured to help; the project first shipped +-5 % and +-0.1."""

    flip_prob: float = 0.5  # probability of a left-right flip
    rotate_deg: float = 5.0  # rotation, uniform +- per axis
    scale: float = 0.0  # scaling by 1 +- this, per axis
    translate_vox: float = 4.0  # translation, uniform +- voxels per axis
    intensity: float = 0.0  # intensity scaling by 1 +- this, then a shift of +- this
    gamma: float = 0.0  # contrast curve: power uniform on [1 / (1 + this), 1 + this]


@dataclass
class ModalityConfig:
    """One modality's data and geometry. A section with no ``records`` is skipped."""

    studies: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)  # JSON/JSONL files (each record names its split)
    data_root: str = ""  # relative image paths resolve against this folder
    image_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    patch_size: list[int] = field(default_factory=lambda: [16, 16, 16])
    voxel_size: list[float] | None = None  # resample to this spacing (mm) before fitting the shape
    # without voxel_size, crop_pad resamples to field_of_view / max(image_size) mm, isotropic
    # (96 -> 2.1 mm): the input's longest axis covers this many mm of the head at any file
    # spacing; null keeps the file's spacing
    field_of_view: float | None = 201.6
    spatial: str = "crop_pad"  # crop_pad | resize
    normalize: str = "zscore_brain"  # zscore_brain | percentile | none
    augment: bool = False  # random flips/affine (MONAI) on the training split
    augment_ranges: AugmentRanges = field(default_factory=AugmentRanges)
    # rsfMRI only: image_size/patch_size then carry a 4th (time) entry, e.g. [96,96,96,20]
    sequence_length: int = 20  # frames per window
    stride_within_seq: int = 1  # step between frames of a window
    stride_between_seq: int = 1  # step between window starts
    eval_windows: str = "first"  # first | all (predictions averaged per subject)
    # dMRI only: scalar map computed from a 4D DWI series (with bval/bvec) during `cache`
    dmri_map: str = "FA"  # FA | MD | AD | RD

    @property
    def enabled(self) -> bool:
        return bool(self.records)


@dataclass
class DatasetConfig:
    T1: ModalityConfig = field(default_factory=ModalityConfig)
    rsfMRI: ModalityConfig = field(default_factory=ModalityConfig)
    dMRI: ModalityConfig = field(default_factory=ModalityConfig)
    tasks: list[str] = field(default_factory=list)  # keep only these tasks (empty: all)
    memoize: bool = False  # keep decoded volumes in RAM (float16) after first use: small cohorts
    cache_dir: str | None = None  # preprocessing cache (`umbrella cache`); used when present
    mixing: str = "proportional"  # proportional | round_robin | temperature (modality batches)
    temperature: float = 2.0  # for mixing=temperature: p(m) ~ n_m ** (1 / temperature)
    pad_to_multiple_of: int = 8  # text padding (0: pad to the longest only)
    on_bad_sample: str = "error"  # error | skip (replace deterministically, count, log)
    max_bad_fraction: float = 0.01  # with skip: stop when more than this fraction failed

    def enabled(self) -> dict[str, ModalityConfig]:
        return {m: getattr(self, m) for m in MODALITIES if getattr(self, m).enabled}


@dataclass
class ModelConfig:
    """Preset name plus optional overrides (null keeps the preset's value)."""

    preset: str = "tiny"
    base: str | None = None  # a pretrained LLaVA (hub name or folder); None builds from the preset
    dtype: str | None = None  # weights of a converted base: float32 | bfloat16 | float16 (None: as saved)
    vision_hidden_size: int | None = None
    vision_layers: int | None = None
    vision_heads: int | None = None
    text_hidden_size: int | None = None
    text_layers: int | None = None
    text_heads: int | None = None
    vocab_size: int = 512  # target size of the byte-level BPE trained on the records' text
    train_vision: str = "full"  # vision encoder layers: full | frozen | lora
    # the modalities' patch embeddings (stems, projections, positions, centering): full | frozen
    # (kept as loaded, BatchNorm / centering statistics included: e.g. over model.vision_init)
    train_embeddings: str = "full"
    # a vision tower trained by `umbrella pretrain` (its folder): loaded into the fresh model's
    # tower before training; its geometry and sizes must match this config's (None: random init).
    # The word `pretrain`: `umbrella train` runs `umbrella pretrain` on this config first (or
    # reuses the tower of an earlier one with the same config and seed) and loads it
    vision_init: str | None = None
    train_projector: str = "full"  # full | frozen | lora
    train_llm: str = "full"  # full | frozen | lora
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 1024  # longest tokenised conversation accepted (image tokens included)
    # average-pool each image's token grid n×n×n before the projector (1: off); "all": the whole
    # grid into one token per image (the mean of the tower's tokens, as `umbrella pretrain` reads)
    token_pool: Union[int, str] = 1  # noqa: UP007 (OmegaConf reads typing.Union, not int | str)
    patch_embed: str = "linear"  # linear (one linear map per patch) | conv (strided conv stem, same tokens)
    stem_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # conv stem stage widths
    # the conv stem's stages: strided (Conv3d k3 stride 2 + GroupNorm + GELU) | pooled (Conv3d k3
    # stride 1 + BatchNorm + ReLU + 2x max-pool, as brain-age CNNs build them)
    stem_style: str = "strided"
    # rsfMRI's embedding: auto (= patch_embed) | linear | conv | connectivity (each patch a region,
    # its token a linear map of its row of the window's correlation matrix; the time patch must
    # span the window)
    rsfmri_embed: str = "auto"
    # subtract the training population's mean image (running statistics saved with the weights)
    # before the patch embedding, and scale the deviations to unit size (PopulationCentering);
    # without it the tiny preset learned neither sex nor age on the realistic cohort
    center_inputs: bool = True
    # MiB of RAM (shared by the modalities) for the outputs of patch embeddings that cannot change
    # (frozen over a pretrained tower, or any at evaluation), keyed by the input image's content:
    # each distinct image (and flipped copy) is embedded once, not at every step (0: off; not
    # saved with the model)
    embedding_cache_mb: int = 1024


@dataclass
class TrainingConfig:
    output_dir: str = "runs"
    run_name: str | None = None  # default: <task>__<preset>__<config hash>
    seed: int = 0
    max_steps: int = 150
    batch_size: int = 16
    eval_batch_size: int = 16
    learning_rate: float = 1e-3
    # the vision tower's peak learning rate (patch embeddings / stems and encoder layers), as
    # LLaVA's mm_vision_tower_lr; None: learning_rate. The scheduler scales it like the others
    vision_learning_rate: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 20
    lr_scheduler: str = "cosine"  # cosine | linear | constant_with_warmup
    gradient_accumulation_steps: int = 1
    eval_steps: int = 50  # validation loss every N steps (0: never)
    save_steps: int = 0  # checkpoint every N steps (0: only the final model)
    logging_steps: int = 10
    num_workers: int = 0  # DataLoader workers
    threads: int = 0  # torch threads (0: all cores)
    resume: str = "none"  # none | auto (newest complete checkpoint) | a checkpoint folder
    save_total_limit: int = 3  # checkpoints kept (oldest deleted first)
    deepspeed: str | None = None  # DeepSpeed JSON, e.g. configs/deepspeed/zero2.json
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16
    generation_log_every: int = 1  # answer fixed validation prompts every N evaluations (0: off)
    generation_log_samples: int = 4
    # which weights become the run's model: auto (val_loss when a validation split exists and
    # eval_steps > 0, else none) | none (the last step's) | val_loss | metric (task metric on val)
    select_best: str = "auto"
    early_stopping_patience: int = 0  # stop after N evaluations without improvement (0: off)
    early_stopping_min_delta: float = 0.0  # an improvement must beat the best by more than this
    # regression answers: soft targets for their digits, N(answer, s * sd of the task's training
    # answers) marginalised per digit (umbrella.data.numeric_labels); 0: one-hot digits
    numeric_label_smoothing: float = 0.0
    # regression answers: add w * ((expected number - answer) / sd)^2, the number the model's
    # digit distributions expect (teacher-forced); 0: off (umbrella.data.numeric_labels)
    numeric_ev_loss: float = 0.0
    # task -> weight of its answers' tokens in the training loss, e.g. {sex: 2.0} (tasks not named:
    # 1); validation loss and selection stay unweighted
    task_loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    split: str = "test"
    scoring: str = "likelihood"  # likelihood | generate
    batch_size: int = 8
    max_new_tokens: int = 16
    # regression answers: expected value | median of the model's distribution over candidate
    # numbers (Bayes-optimal for squared | absolute error), or generate (greedy decoding)
    regression: str = "expected"
    regression_step: float | None = None  # candidate spacing; None: the answers' resolution (0.1)
    # fit the classical reference (ridge / logistic regression on coarse features of the same
    # preprocessed inputs, training split) and show it with a verdict beside the model
    reference: bool = True
    truth: str | None = None  # a cohort's truth file (JSON): its "achievable" figures are shown


@dataclass
class PretrainConfig:
    """`umbrella pretrain`: the vision tower alone, supervised by the training split's answers
    (each image's classification and regression targets, one linear head per task on the mean of
    the tower's tokens), before the VLM is trained on it (``model.vision_init``)."""

    output_dir: str | None = None  # default: <training.output_dir>/pretrain__<preset>__<hash>
    epochs: int = 12
    batch_size: int = 16
    learning_rate: float = 2e-3  # one-cycle peak (AdamW)
    weight_decay: float = 1e-3
    head_dropout: float = 0.5  # dropout before each task's linear head
    keep_best: bool = True  # keep the epoch of the lowest validation loss (else the last)
    # the heads read the encoder layers' output (true) or the patch embeddings' tokens (false: only
    # the embeddings learn; the encoder layers are saved as initialised, to be trained in the VLM)
    encoder_layers: bool = True


@dataclass
class TrackingConfig:
    report_to: str = "none"  # none | tensorboard | wandb | mlflow
    project: str = "umbrella"


@dataclass
class UmbrellaConfig:
    # a measured recipe (umbrella.recipes.RECIPES) laid under the config's own keys: none (the
    # defaults below: a quick pipeline check) | t1_two_stage (T1 records alone)
    recipe: str = "none"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # per-study overrides of the registry (umbrella.data.studies), e.g. {ABCD: {tr: 0.8}}
    studies: dict[str, Any] = field(default_factory=dict)


# numeric keys with bounds, by leaf name in every section that has it (training.batch_size and
# pretrain.batch_size alike): name -> (low, low inclusive, high or None: exclusive); None stays
# allowed where the type is
_BOUNDS = {"vision_learning_rate": (0.0, False, None), "learning_rate": (0.0, False, None),
           "batch_size": (1, True, None), "weight_decay": (0.0, True, None),
           "numeric_ev_loss": (0.0, True, None), "numeric_label_smoothing": (0.0, True, None),
           "epochs": (1, True, None), "head_dropout": (0.0, True, 1.0),
           "embedding_cache_mb": (0, True, None)}

_CHOICES = {
    "spatial": ("crop_pad", "resize"),
    "normalize": ("zscore_brain", "percentile", "none", "zscore_run", "zscore_run_bgmin",
                  "zscore_voxel"),
    "eval_windows": ("first", "all"),
    "train_vision": ("full", "frozen", "lora"),
    "train_projector": ("full", "frozen", "lora"),
    "train_llm": ("full", "frozen", "lora"),
    "train_embeddings": ("full", "frozen"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "dtype": (None, "float32", "bfloat16", "float16"),
    "dmri_map": ("FA", "MD", "AD", "RD"),
    "mixing": ("proportional", "round_robin", "temperature"),
    "on_bad_sample": ("error", "skip"),
    "lr_scheduler": ("cosine", "linear", "constant_with_warmup"),
    "scoring": ("likelihood", "generate"),
    "patch_embed": ("linear", "conv"),
    "stem_style": STEM_STYLES,
    "rsfmri_embed": ("auto", "linear", "conv", "connectivity"),
    "regression": ("expected", "median", "generate"),
    "select_best": ("auto", "none", "val_loss", "metric"),
    "report_to": ("none", "tensorboard", "wandb", "mlflow"),
}


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """{'a': {'b': 1}} -> [('a.b', 1)]; a dict below a leaf field is kept whole by the caller."""
    if not isinstance(tree, dict) or not tree:
        return [(prefix, tree)]
    out = []
    for key, value in tree.items():
        out += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _schema_node(path: str) -> tuple[Any, str | None]:
    """Walk the dataclass schema along a dotted path. Returns (node, error)."""
    node: Any = UmbrellaConfig
    walked = []
    for part in path.split("."):
        if not (isinstance(node, type) and is_dataclass(node)):
            return None, f"'{'.'.join(walked)}' takes a value, not a section (got '{path}')"
        names = {f.name: f for f in fields(node)}
        if part not in names:
            near = difflib.get_close_matches(part, list(names), n=1, cutoff=0.5)
            where = ".".join(walked) or "the top level"
            hint = f"; did you mean '{'.'.join(walked + near)}'?" if near else \
                f"; valid keys in {where}: {', '.join(names)}"
            return None, f"unknown key '{path}'{hint}"
        walked.append(part)
        factory = names[part].default_factory
        if factory is dict:  # a free-form mapping: any sub-key is accepted
            return names[part], None
        node = factory if factory is not MISSING and is_dataclass(factory) else names[part]
    return node, None


def _check_leaf(path: str, value: Any) -> str | None:
    """Type/choice check of one leaf through OmegaConf's validation."""
    node, err = _schema_node(path)
    if err:
        return err
    base = OmegaConf.structured(UmbrellaConfig)
    try:
        OmegaConf.update(base, path, value, merge=True)
    except (OmegaConfBaseException, ValueError) as exc:
        first = str(exc).splitlines()[0]
        return f"bad value for '{path}': {value!r} ({first})"
    name = path.rsplit(".", 1)[-1]
    if name in _CHOICES and value not in _CHOICES[name]:
        return f"bad value for '{path}': {value!r}; choose one of {', '.join(_CHOICES[name])}"
    if path == "model.token_pool":
        try:
            normalize_token_pool(value)
        except ModelError as exc:
            return f"bad value for '{path}': {exc}"
    if name in _BOUNDS and value is not None:
        low, inclusive, high = _BOUNDS[name]
        above = float(value) >= low if inclusive else float(value) > low
        if not above or (high is not None and not float(value) < high):
            rule = f"{'>=' if inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
            return f"bad value for '{path}': {value!r}; it must be {rule}"
    return None


def _validate(tree: dict, source: str) -> None:
    problems = [p for path, value in _flatten(tree) if path and (p := _check_leaf(path, value))]
    if problems:
        raise ConfigError(problems, source=source)


def _parse_overrides(overrides: list[str]) -> dict:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError([f"override {o!r} is not KEY=VALUE (e.g. training.max_steps=20)" for o in bad])
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> UmbrellaConfig:
    """Defaults <- YAML file <- dotlist overrides, validated; returns the typed dataclass."""
    merged = OmegaConf.structured(UmbrellaConfig)
    layers: list[tuple[dict, str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist", source=str(path))
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from exc
        if not isinstance(tree, dict):
            raise ConfigError("the top level must be a mapping of sections", source=str(path))
        layers.append((tree, str(path)))
    if overrides:
        layers.append((_parse_overrides(list(overrides)), "command-line overrides"))
    for tree, source in layers:
        _validate(tree, source)
    recipe = _recipe(layers)
    if recipe is not None:  # beneath the file's and the command line's own keys
        merged = OmegaConf.merge(merged, recipe)
    for tree, _ in layers:
        merged = OmegaConf.merge(merged, tree)
    cfg: UmbrellaConfig = OmegaConf.to_object(merged)
    if recipe is not None:
        _check_recipe(cfg)
    return cfg


def _recipe(layers: list[tuple[dict, str]]) -> dict | None:
    """The tree of the recipe the layers name (the last ``recipe`` key wins), or None."""
    from umbrella.recipes import RECIPES

    named = [(tree["recipe"], source) for tree, source in layers if "recipe" in tree]
    if not named or named[-1][0] in (None, "none"):
        return None
    name, source = named[-1]
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r}; choose one of none, {', '.join(RECIPES)}",
                          source=source)
    return RECIPES[name]


def _check_recipe(cfg: UmbrellaConfig) -> None:
    """t1_two_stage was measured on T1 records alone: other modalities with records are refused."""
    others = [m for m in cfg.dataset.enabled() if m != "T1"]
    if others:
        raise ConfigError(f"recipe={cfg.recipe!r} trains T1 records alone, but "
                          f"{', '.join(f'dataset.{m}.records' for m in others)} "
                          f"{'is' if len(others) == 1 else 'are'} set; train those without the "
                          "recipe (recipe=none) or leave their records out")


def digest(tree: dict) -> str:
    """8 hex digits naming a config tree (sorted JSON, SHA-256): the hash in run folder names."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def config_to_dict(cfg: UmbrellaConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential",
                          "credentials"})
REDACTED = "<redacted: read it from the environment>"


def redact_secrets(obj: Any) -> Any:
    """A copy of ``obj`` whose string values under secret-looking keys (a ``_``/``-`` separated
    word of the key is key, token, secret, password, ...: ``api_key``, ``hf_token``) are
    replaced by :data:`REDACTED`. Numbers under such keys are kept."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            words = set(str(k).lower().replace("-", "_").split("_"))
            secret = bool(words & SECRET_WORDS) and isinstance(v, str) and v != ""
            out[k] = REDACTED if secret else redact_secrets(v)
        return out
    if isinstance(obj, list):
        return [redact_secrets(v) for v in obj]
    return obj


def _redact_free_form(tree: dict, node=UmbrellaConfig) -> dict:
    """``tree`` (a config as a dict) with :func:`redact_secrets` applied to its free-form
    mappings (``studies``, ``training.task_loss_weights``): the schema's own keys hold no secret,
    though a name may look like one (``model.token_pool: all``)."""
    for f in fields(node):
        if f.default_factory is dict:
            tree[f.name] = redact_secrets(tree[f.name])
        elif f.default_factory is not MISSING and is_dataclass(f.default_factory):
            _redact_free_form(tree[f.name], f.default_factory)
    return tree


def save_config(cfg: UmbrellaConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically, with secret-looking values redacted (the
    config has no key fields; this guards the free-form sections such as ``studies``)."""
    from umbrella.io import atomic_write_text

    data = _redact_free_form(config_to_dict(cfg))
    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
