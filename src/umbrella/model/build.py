"""BrainLlava: ``LlavaForConditionalGeneration`` with the brain vision tower, built from a preset.

Presets are named functions over one builder (:func:`build_brain_llava`). Images reach the model
grouped by modality; :class:`BrainLlavaForConditionalGeneration` runs each group through its own
patch embedding and hands the projected features, in order of appearance, to LLaVA, which scatters
them into the ``<image>`` placeholder positions (``mm_encoder_outputs``).

Optional token pooling (``token_pool``, off by default): the tower's output tokens of each image are
average-pooled over the spatial token grid before the projector, e.g. ``token_pool=2`` turns the
6×6×6 = 216 tokens of a 96³ image with 16³ patches into 3×3×3 = 27, ``token_pool="all"`` into one
(the mean of the tower's tokens, which `umbrella pretrain`'s linear heads read). The pool is stored in the
config (``vision_token_pool``), so a reloaded model pools the same way; prompts must then expand
each ``<image>`` to :func:`pooled_tokens` of its modality (:func:`tokens_per_image` of the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
from transformers.modeling_outputs import BaseModelOutputWithPooling

import umbrella.model  # noqa: F401  (registers the tower with the Auto classes)
from umbrella.config import ModelConfig
from umbrella.errors import ConfigError, ModelError
from umbrella.geometry import (
    check_modality,
    normalize_token_pool,
    pooled_tokens,
    resolve_token_pool,
    stem_plan,
    token_grid,
)
from umbrella.model.configuration_brain_vit import BrainViTConfig
from umbrella.model.modeling_brain_vit import enable_output_cache


@dataclass(frozen=True)
class Preset:
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vision_intermediate_size: int | None = None  # None: 4 × vision_hidden_size
    text_intermediate_size: int | None = None  # None: 4 × text_hidden_size
    # rows of the LM's embedding and output tables; None: the tokenizer's size. Never fewer rows
    # than the tokenizer has; extra rows stay unused (Qwen2 likewise pads 151,646 tokens to 151,936)
    text_vocab_size: int | None = None
    tie_word_embeddings: bool = False  # output layer shares the input embedding table
    rope_theta: float = 10000.0


def tiny() -> Preset:
    """CPU-sized: trains the demo in about a minute on 2 cores."""
    return Preset(64, 2, 4, 128, 2, 4, 2)


def small() -> Preset:
    """A single-GPU experiment size."""
    return Preset(384, 6, 6, 512, 8, 8, 4)


def qwen2_half_b() -> Preset:
    """A 0.5B-class model, random init: the LM has Qwen2-0.5B's shape (hidden 896, 24 layers, 14
    query / 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings, RoPE base 10^6; about
    494 M parameters) and the tower SigLIP-base's encoder (hidden 768, 12 layers, 12 heads, MLP
    3072; about 85 M). Sized for one GPU with bf16, SDPA and gradient checkpointing, or ZeRO-2/3."""
    return Preset(768, 12, 12, 896, 24, 14, 2, vision_intermediate_size=3072,
                  text_intermediate_size=4864, text_vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=1_000_000.0)


PRESETS = {"tiny": tiny, "small": small, "0.5b": qwen2_half_b}


def resolve_preset(cfg: ModelConfig) -> Preset:
    if cfg.preset not in PRESETS:
        raise ModelError(f"unknown model.preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]()
    overrides = {f: getattr(cfg, f) for f in ("vision_hidden_size", "vision_layers", "vision_heads",
                                               "text_hidden_size", "text_layers", "text_heads")
                 if getattr(cfg, f) is not None}
    return replace(preset, **overrides)


def with_patch_embed(cfg: ModelConfig, modalities: dict[str, dict]) -> dict[str, dict]:
    """``modalities`` with ``model.patch_embed`` (rsfMRI: ``model.rsfmri_embed`` unless "auto"; and,
    for "conv", ``model.stem_channels`` and ``model.stem_style``) written into each spec that
    does not name its own ``embed``, and ``center`` where ``model.center_inputs`` is on (not for
    connectivity). A geometry error stays the ValueError of :class:`BrainViTConfig`; a patch the
    stem cannot be built for raises ConfigError naming the config keys and the fix."""
    out, problems = {}, []
    for name, spec in modalities.items():
        embed = cfg.patch_embed
        if name == "rsfMRI" and cfg.rsfmri_embed != "auto":
            embed = cfg.rsfmri_embed
        out[name] = spec = {"embed": embed, **spec}
        # a connectivity embedding reads correlations, which no per-voxel offset or global scale
        # changes: centering there would only subtract the population's mean series (noise)
        if cfg.center_inputs and spec["embed"] != "connectivity":
            spec.setdefault("center", True)
        if spec["embed"] == "conv":
            spec.setdefault("stem_channels", list(cfg.stem_channels))
            spec.setdefault("stem_style", cfg.stem_style)
            geometry = check_modality(name, {**spec, "embed": "linear"})
            try:
                stem_plan(name, {**geometry, "stem_channels": spec["stem_channels"]})
            except ValueError as exc:
                problems.append(f"model.patch_embed=conv: {exc}")
        elif spec["embed"] == "connectivity":
            key = "model.rsfmri_embed" if name == "rsfMRI" else "model.patch_embed"
            try:
                check_modality(name, spec)
            except ValueError as exc:
                problems.append(f"{key}=connectivity: {exc}")
    if problems:
        raise ConfigError(problems)
    return out


def vision_config(cfg: ModelConfig, modalities: dict[str, dict]) -> BrainViTConfig:
    """The vision tower's config for ``modalities`` under ``cfg`` (preset, overrides, patch
    embeddings): the tower :func:`build_brain_llava` builds and ``umbrella pretrain`` trains."""
    p = resolve_preset(cfg)
    return BrainViTConfig(hidden_size=p.vision_hidden_size,
                          intermediate_size=p.vision_intermediate_size or 4 * p.vision_hidden_size,
                          num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                          modalities=with_patch_embed(cfg, modalities))


def build_brain_llava(cfg: ModelConfig, modalities: dict[str, dict], tokenizer,
                      seed: int | None = None, *,
                      token_pool: int | str | Sequence[int] | None = None
                      ) -> BrainLlavaForConditionalGeneration:
    """A randomly initialised BrainLlava for ``modalities`` ({name: {image_size, patch_size, ...}}).

    Each modality's patch embedding is ``cfg.patch_embed`` (linear | conv; rsfMRI:
    ``cfg.rsfmri_embed`` unless "auto", which may also be connectivity) unless its spec names its
    own ``embed`` (see :func:`with_patch_embed`).

    ``token_pool`` (default None: off): average-pool each image's tokens over the spatial token
    grid by this window before the projector (2 -> 216 tokens become 27 at 96³ / patch 16;
    ``"all"``: the whole grid, one token per image and time block).
    """
    if cfg.base is not None:
        raise ModelError(f"model.base={cfg.base!r}: converting a pretrained LLaVA is not "
                         "implemented yet; leave model.base unset to build from model.preset")
    pool = normalize_token_pool(token_pool)
    p = resolve_preset(cfg)
    vision = vision_config(cfg, modalities)
    for name, spec in vision.modalities.items():  # checked geometry; raises if the pool misfits
        pooled_tokens(spec, pool, name)
    if seed is not None:
        torch.manual_seed(seed)
    text = Qwen2Config(vocab_size=max(len(tokenizer), p.text_vocab_size or 0),
                       hidden_size=p.text_hidden_size, rope_theta=p.rope_theta,
                       intermediate_size=p.text_intermediate_size or 4 * p.text_hidden_size,
                       num_hidden_layers=p.text_layers,
                       num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads,
                       max_position_embeddings=max(2048, cfg.max_length),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None, tie_word_embeddings=p.tie_word_embeddings)
    extra = {} if pool is None else {"vision_token_pool": token_pool_setting(pool)}
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="full",
                         vision_feature_layer=-1, tie_word_embeddings=p.tie_word_embeddings,
                         **extra)
    model = BrainLlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def token_pool_setting(token_pool: int | str | Sequence[int]) -> list[int] | str:
    """The model config's ``vision_token_pool`` for ``token_pool``: "all", or [d, h, w]."""
    pool = normalize_token_pool(token_pool) or (1, 1, 1)
    return pool if isinstance(pool, str) else list(pool)


def tokens_per_image(model, modality: str) -> int:
    """Visual tokens one image of ``modality`` gives the LLM (after the model's token pooling)."""
    spec = model.config.vision_config.modalities[modality]
    return pooled_tokens(spec, getattr(model.config, "vision_token_pool", None), modality)


def pool_tokens(features: torch.Tensor, spec: dict,
                pool: tuple[int, int, int] | str) -> torch.Tensor:
    """(B, N, C) tower tokens of one modality -> (B, N / prod(pool), C), averaged over each
    ``pool`` window of the spatial token grid (time blocks are kept; ``"all"``: the whole grid)."""
    pool = resolve_token_pool(pool, spec) or (1, 1, 1)
    b, n, c = features.shape
    blocks, gd, gh, gw = token_grid(spec)
    if n != blocks * gd * gh * gw:
        raise ModelError(f"{n} tower tokens do not match the token grid {(blocks, gd, gh, gw)}")
    x = features.reshape(b * blocks, gd, gh, gw, c).permute(0, 4, 1, 2, 3)
    x = F.avg_pool3d(x, kernel_size=pool, stride=pool)  # (B * blocks, C, gd', gh', gw')
    return x.flatten(2).transpose(1, 2).reshape(b, -1, c)


class BrainLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose ``pixel_values`` may hold images of several modalities.

    ``pixel_values`` is either one tensor (B_img, C, D, H, W) of the tower's only modality, as in plain
    LLaVA, or ``{modality: (n, C, D, H, W)}`` with ``image_order`` [(modality, index), ...] giving the
    images' order of appearance in ``input_ids``. The config stays a plain ``LlavaConfig``: weights
    saved from this class load into ``LlavaForConditionalGeneration`` too.
    """

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Weights are saved under the module's own parameter names (the transformers 5 layout), not
        the legacy LLaVA names: the Trainer then restores checkpoints with a plain state-dict load."""
        return super().save_pretrained(save_directory, *args,
                                       save_original_format=save_original_format, **kwargs)

    def image_features(self, pixel_values: dict[str, torch.Tensor],
                       image_order: list[tuple[str, int]]) -> list[torch.Tensor]:
        """One (N_modality, text_hidden) tensor per image, in ``image_order``; N_modality is
        :func:`tokens_per_image` (after token pooling, when the config asks for it)."""
        cfg = self.config
        per_modality = {}
        for modality, pixels in pixel_values.items():
            if self._token_pool() is None:
                out = self.model.get_image_features(
                    pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                    modality=modality)
                per_modality[modality] = out.pooler_output
            else:
                per_modality[modality] = self._pooled_features(pixels, modality)
        return [per_modality[m][i] for m, i in image_order]

    def _token_pool(self) -> tuple[int, int, int] | str | None:
        return normalize_token_pool(getattr(self.config, "vision_token_pool", None))

    def _pooled_features(self, pixels: torch.Tensor, modality: str) -> torch.Tensor:
        """pixels (n, C, D, H, W[, T]) -> (n, pooled tokens, text_hidden): tower, selected
        layer, average pooling over the token grid, projector."""
        cfg = self.config
        if cfg.vision_feature_select_strategy != "full" or not isinstance(cfg.vision_feature_layer, int):
            raise ModelError("token pooling needs vision_feature_select_strategy='full' and one "
                             "vision_feature_layer (a tower without a CLS token)")
        tower = self.model.vision_tower(pixels, modality=modality, return_dict=True)
        selected = tower.hidden_states[cfg.vision_feature_layer]
        spec = cfg.vision_config.modalities[modality]
        return self.model.multi_modal_projector(pool_tokens(selected, spec, self._token_pool()))

    def encode_images(self, pixel_values: dict[str, torch.Tensor],
                      image_order: list[tuple[str, int]]) -> dict:
        """``mm_encoder_outputs`` for LLaVA's forward / generate."""
        feats = self.image_features(pixel_values, image_order)
        return {"image": BaseModelOutputWithPooling(pooler_output=feats)}

    def _check_placeholders(self, input_ids, feats: list[torch.Tensor]) -> None:
        if input_ids is None:
            return
        n_tokens = int((input_ids == self.config.image_token_id).sum())
        n_feats = sum(int(f.shape[0]) for f in feats)
        if n_tokens != n_feats:
            raise ModelError(f"input_ids hold {n_tokens} image tokens but the {len(feats)} images "
                             f"give {n_feats} features; expand each <image> to its modality's "
                             "token count")

    def forward(self, input_ids=None, pixel_values=None, image_order=None, attention_mask=None,
                labels=None, mm_encoder_outputs=None, **kwargs):
        """input_ids (B, L) with every <image> already expanded to its modality's token count."""
        if torch.is_tensor(pixel_values):  # plain LLaVA form (one modality): the same path
            modality = self.model.vision_tower._pick_modality(None)
            image_order = [(modality, i) for i in range(pixel_values.shape[0])]
            pixel_values = {modality: pixel_values}
        if isinstance(pixel_values, dict):
            if image_order is None:
                raise ModelError("pixel_values is a dict of modalities: pass image_order too")
            if image_order:
                mm_encoder_outputs = self.encode_images(pixel_values, image_order)
                self._check_placeholders(input_ids, mm_encoder_outputs["image"].pooler_output)
            pixel_values = None
        return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                               attention_mask=attention_mask, labels=labels,
                               mm_encoder_outputs=mm_encoder_outputs, **kwargs)


def load_brain_llava(path: str | Path, device: str | torch.device = "cpu",
                     embedding_cache_mb: float = ModelConfig.embedding_cache_mb):
    """Reload a saved BrainLlava (safetensors) and its tokenizer from ``path``, in evaluation
    mode, its patch embeddings' outputs memoised per input image (``embedding_cache_mb``, 0:
    off; :class:`umbrella.model.modeling_brain_vit.OutputCache`)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} holds no saved model (config.json missing); point at a run's "
                         "model/ folder or the run folder")
    model = BrainLlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    enable_output_cache(model, embedding_cache_mb)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
