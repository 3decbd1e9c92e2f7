"""BrainLlava: ``LlavaForConditionalGeneration`` with the brain vision tower, built from a preset.

Presets are named functions over one builder (:func:`build_brain_llava`). Images reach the model
grouped by modality; :class:`BrainLlavaForConditionalGeneration` runs each group through its own
patch embedding and hands the projected features, in order of appearance, to LLaVA, which scatters
them into the ``<image>`` placeholder positions (``mm_encoder_outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
from transformers.modeling_outputs import BaseModelOutputWithPooling

import umbrella.model  # noqa: F401  (registers the tower with the Auto classes)
from umbrella.config import ModelConfig
from umbrella.errors import ModelError
from umbrella.model.configuration_brain_vit import BrainViTConfig


@dataclass(frozen=True)
class Preset:
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int


def tiny() -> Preset:
    """CPU-sized: trains the demo in about a minute on 2 cores."""
    return Preset(64, 2, 4, 128, 2, 4, 2)


def small() -> Preset:
    """A single-GPU experiment size."""
    return Preset(384, 6, 6, 512, 8, 8, 4)


PRESETS = {"tiny": tiny, "small": small}


def resolve_preset(cfg: ModelConfig) -> Preset:
    if cfg.preset not in PRESETS:
        raise ModelError(f"unknown model.preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]()
    overrides = {f: getattr(cfg, f) for f in ("vision_hidden_size", "vision_layers", "vision_heads",
                                               "text_hidden_size", "text_layers", "text_heads")
                 if getattr(cfg, f) is not None}
    return replace(preset, **overrides)


def build_brain_llava(cfg: ModelConfig, modalities: dict[str, dict], tokenizer,
                      seed: int | None = None) -> BrainLlavaForConditionalGeneration:
    """A randomly initialised BrainLlava for ``modalities`` ({name: {image_size, patch_size, ...}})."""
    if cfg.base is not None:
        raise ModelError(f"model.base={cfg.base!r}: converting a pretrained LLaVA is not "
                         "implemented yet; leave model.base unset to build from model.preset")
    p = resolve_preset(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    vision = BrainViTConfig(hidden_size=p.vision_hidden_size, intermediate_size=4 * p.vision_hidden_size,
                            num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                            modalities=modalities)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=p.text_hidden_size,
                       intermediate_size=4 * p.text_hidden_size, num_hidden_layers=p.text_layers,
                       num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads,
                       max_position_embeddings=max(2048, cfg.max_length),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="full",
                         vision_feature_layer=-1, tie_word_embeddings=False)
    model = BrainLlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tokens_per_image(model, modality: str) -> int:
    return model.config.vision_config.tokens_per_image(modality)


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
        """One (N_modality, text_hidden) tensor per image, in ``image_order``."""
        cfg = self.config
        per_modality = {}
        for modality, pixels in pixel_values.items():
            out = self.model.get_image_features(
                pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                modality=modality)
            per_modality[modality] = out.pooler_output
        return [per_modality[m][i] for m, i in image_order]

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


def load_brain_llava(path: str | Path, device: str | torch.device = "cpu"):
    """Reload a saved BrainLlava (safetensors) and its tokenizer from ``path``."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} holds no saved model (config.json missing); point at a run's "
                         "model/ folder or the run folder")
    model = BrainLlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
