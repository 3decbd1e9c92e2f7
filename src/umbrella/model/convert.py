"""A pretrained LLaVA -> BrainLlava: keep its vision encoder layers, projector and LLM.

What changes and what is kept::

    base LLaVA                                   BrainLlava
    tower 2D patch + position embeddings   -->   one new 3D/4D patch embedding per modality
    CLIP pre_layrnorm                      -->   dropped (see below)
    encoder layers 0..k-1 (k: feature layer) -->  layers.0..k-1, weights copied one to one
    encoder layers k.. and post-layernorm  -->   dropped: LLaVA never reads them
    projector, LLM, lm_head                -->   the same modules (weights not copied, moved)
    vision_feature_layer (e.g. -2 of 24)   -->   the same features: -1 of the k=23 kept layers
    vision_feature_select_strategy         -->   "full" (the brain tower has no CLS token)
    <image> token id, tokenizer            -->   the base's, with a chat template for its format

Layers past the feature layer are dropped rather than carried: they would receive no gradient,
which breaks DDP without ``find_unused_parameters`` and wastes memory under every freeze policy.

CLIP's ``pre_layrnorm`` normalises the sum of CLIP's 2D patch and position embeddings; both are
replaced by freshly initialised 3D embeddings whose scale is learnt, and every encoder layer is
pre-norm (``layer_norm1`` before attention, ``layer_norm2`` before the MLP), so the layers see
normalised inputs whatever the embedding scale. Carrying it would need a per-modality norm in the
tower's config; SigLIP towers have no such norm. It is therefore dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from umbrella.data.prompts import (  # noqa: F401  (re-exported for callers of convert)
    CHAT_FORMATS,
    CHATML,
    VICUNA,
    VICUNA_SYSTEM,
    VICUNA_TEMPLATE,
    ChatFormat,
)
from umbrella.data.records import IMAGE_PLACEHOLDER
from umbrella.data.tokenizer import IM_END, IM_START
from umbrella.errors import ModelError
from umbrella.model.build import BrainLlavaForConditionalGeneration
from umbrella.model.configuration_brain_vit import BrainViTConfig
from umbrella.model.modeling_brain_vit import BrainPatchEmbedding, BrainViTModel


def convert_pretrained_llava(base: str | Path, modalities: dict[str, dict], *, dtype=None):
    """Load a pretrained LLaVA and turn it into a BrainLlava for ``modalities``.

    base: a hub name (``llava-hf/llava-interleave-qwen-0.5b-hf``, ``llava-hf/llava-1.5-7b-hf``)
    or a local folder; only local files are read when ``HF_HUB_OFFLINE=1``.
    modalities: {name: {image_size, patch_size[, in_channels]}}, as for ``build_brain_llava``.
    Returns (model, tokenizer, chat_format) with chat_format "chatml" or "vicuna".
    """
    source = _load_source(str(base), dtype)
    tokenizer = _load_tokenizer(str(base))
    chat = chat_format_of(source.config.text_config, tokenizer, str(base))
    _check_vocabulary(source.config, tokenizer, chat, str(base))
    model = _assemble(source, modalities, str(base))
    tokenizer.chat_template = chat.template
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(chat.end_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, chat.name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_source(base: str, dtype) -> LlavaForConditionalGeneration:
    fix = ("give a local folder holding a saved LlavaForConditionalGeneration (config.json, "
           "*.safetensors, tokenizer files), or download it once with HF_HUB_OFFLINE unset")
    try:
        config = AutoConfig.from_pretrained(base, local_files_only=_offline())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.base={base!r}: cannot read its config ({exc}); fix: {fix}") from exc
    if config.model_type != "llava":
        raise ModelError(f"model.base={base!r} is a {config.model_type!r} model, not LLaVA "
                         "(LlavaForConditionalGeneration); choose a llava-hf/* checkpoint such as "
                         "llava-hf/llava-interleave-qwen-0.5b-hf")
    try:
        return LlavaForConditionalGeneration.from_pretrained(
            base, dtype=dtype if dtype is not None else "auto", local_files_only=_offline())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.base={base!r}: cannot load its weights ({exc}); fix: {fix}") from exc


def _load_tokenizer(base: str):
    try:
        return AutoTokenizer.from_pretrained(base, local_files_only=_offline())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.base={base!r}: cannot load its tokenizer ({exc}); fix: save the "
                         "base's tokenizer files (tokenizer.json, tokenizer_config.json) in that "
                         "folder") from exc


def chat_format_of(text_config, tokenizer, base: str = "the base") -> ChatFormat:
    """ChatML when the tokenizer knows <|im_start|>/<|im_end|> (Qwen); Vicuna for a Llama LLM
    whose end token is </s> (LLaVA-1.5). Anything else raises, naming what was found."""
    vocab = tokenizer.get_vocab()
    if IM_START in vocab and IM_END in vocab:
        return CHATML
    if text_config.model_type == "llama" and tokenizer.eos_token == VICUNA.end_token:
        return VICUNA
    raise ModelError(f"model.base={base!r}: cannot tell its chat format (LLM "
                     f"{text_config.model_type!r}, end token {tokenizer.eos_token!r}); supported "
                     f"are ChatML (Qwen-based, {IM_START}/{IM_END} tokens) and Vicuna "
                     "USER:/ASSISTANT: (Llama, </s>); choose such a base")


def _check_vocabulary(config: LlavaConfig, tokenizer, chat: ChatFormat, base: str) -> None:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_id != config.image_token_id:
        raise ModelError(f"model.base={base!r}: the tokenizer maps {IMAGE_PLACEHOLDER} to "
                         f"{image_id} but the model's image_token_id is {config.image_token_id}; "
                         "use the tokenizer saved with this LLaVA checkpoint")
    if len(tokenizer) > config.text_config.vocab_size:
        raise ModelError(f"model.base={base!r}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"LLM only {config.text_config.vocab_size} embeddings; use the tokenizer "
                         "saved with this LLaVA checkpoint")
    if tokenizer.convert_tokens_to_ids(chat.end_token) in (None, tokenizer.unk_token_id):
        raise ModelError(f"model.base={base!r}: its tokenizer has no {chat.end_token} token, which "
                         f"ends every answer in the {chat.name} format")


def feature_layers(vision_feature_layer: int | list[int], num_layers: int):
    """The base's feature layer(s) -> (encoder layers to keep, the same layer(s) counted from the
    end of the kept stack). hidden_states hold the embeddings then each layer's output, so index i
    (or i - num_layers - 1) is the output of layer i."""
    single = isinstance(vision_feature_layer, int)
    wanted = [vision_feature_layer] if single else list(vision_feature_layer)
    absolute = [i if i >= 0 else num_layers + 1 + i for i in wanted]
    if not wanted or any(not 1 <= a <= num_layers for a in absolute):
        raise ModelError(f"vision_feature_layer={vision_feature_layer} does not select encoder "
                         f"layer outputs of a {num_layers}-layer tower")
    keep = max(absolute)
    moved = [a - keep - 1 for a in absolute]
    return keep, moved[0] if single else moved


def _encoder_layers(tower, base: str):
    inner = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if layers is None:
        raise ModelError(f"model.base={base!r}: its vision tower {type(tower).__name__} has no "
                         "encoder.layers; CLIP and SigLIP towers are supported")
    return layers


def _brain_tower(source: LlavaForConditionalGeneration, modalities: dict[str, dict], base: str):
    """The new tower: fresh per-modality embeddings + copies of the base's kept encoder layers."""
    vc = source.config.vision_config
    layers = _encoder_layers(source.model.vision_tower, base)
    keep, feature_layer = feature_layers(source.config.vision_feature_layer, len(layers))
    config = BrainViTConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                            num_hidden_layers=keep, num_attention_heads=vc.num_attention_heads,
                            hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps,
                            attention_dropout=vc.attention_dropout, modalities=modalities)
    tower = BrainViTModel(config)
    for i in range(keep):
        try:
            tower.layers[i].load_state_dict(layers[i].state_dict(), strict=True)
        except RuntimeError as exc:
            raise ModelError(f"model.base={base!r}: encoder layer {i} of {type(layers[i]).__name__} "
                             f"does not match a SiglipEncoderLayer ({exc})") from exc
    for module in tower.modules():
        if isinstance(module, BrainPatchEmbedding):
            std = config.initializer_range  # cut at 2 std (torch's default cut is ±2 absolute)
            torch.nn.init.trunc_normal_(module.position_embedding, std=std, a=-2 * std, b=2 * std)
    return tower.to(next(layers.parameters()).dtype), feature_layer


def _assemble(source: LlavaForConditionalGeneration, modalities: dict[str, dict],
              base: str) -> BrainLlavaForConditionalGeneration:
    """BrainLlava around the base's own projector, LLM and lm_head modules (no copy of the LLM)."""
    tower, feature_layer = _brain_tower(source, modalities, base)
    sc = source.config
    config = LlavaConfig(vision_config=tower.config, text_config=sc.text_config,
                         image_token_id=sc.image_token_id,
                         projector_hidden_act=sc.projector_hidden_act,
                         multimodal_projector_bias=sc.multimodal_projector_bias,
                         vision_feature_select_strategy="full", vision_feature_layer=feature_layer,
                         tie_word_embeddings=sc.tie_word_embeddings)
    with torch.device("meta"):  # a skeleton: every part is replaced below
        model = BrainLlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.multi_modal_projector = source.model.multi_modal_projector
    model.model.language_model = source.model.language_model
    model.lm_head = source.lm_head
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"model.base={base!r}: conversion left {len(left)} tensors unset "
                         f"(first: {left[0]}); report this with the base's name")
    model.generation_config = source.generation_config
    return model
