"""Configuration of the brain vision tower: one patch embedding per modality, a shared encoder.

Plain values only; validated on construction. Registered with ``AutoConfig`` under
``model_type = "umbrella_brain_vit"`` so that ``LlavaConfig(vision_config=...)`` builds, saves and
reloads it like any other tower.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

KNOWN_MODALITIES = ("T1", "rsfMRI", "dMRI")
PATCH_EMBEDS = ("linear", "conv")
DEFAULT_STEM_CHANNELS = (16, 32, 64, 128)


def _check_modality(name: str, spec: dict) -> dict:
    """Normalise one modality spec and check its geometry; raises ValueError naming the modality."""
    if name not in KNOWN_MODALITIES:
        raise ValueError(f"unknown modality {name!r} in vision_config.modalities; "
                         f"choose from {', '.join(KNOWN_MODALITIES)}")
    image_size = [int(v) for v in spec["image_size"]]
    patch_size = [int(v) for v in spec["patch_size"]]
    if len(image_size) != len(patch_size) or len(image_size) not in (3, 4):
        raise ValueError(f"{name}: image_size {image_size} and patch_size {patch_size} must both be "
                         "(D, H, W) or, for 4D inputs such as rsfMRI windows, (D, H, W, T)")
    for axis, (size, patch) in enumerate(zip(image_size, patch_size, strict=True)):
        if patch <= 0 or size % patch:
            raise ValueError(f"{name}: image_size[{axis}]={size} is not a multiple of "
                             f"patch_size[{axis}]={patch}; change one of them")
    out = {"in_channels": int(spec.get("in_channels", 1)), "image_size": image_size,
           "patch_size": patch_size, "embed": spec.get("embed", "linear")}
    if out["embed"] not in PATCH_EMBEDS:
        raise ValueError(f"{name}: embed={out['embed']!r} is not a patch embedding; choose one of "
                         f"{', '.join(PATCH_EMBEDS)} (config key model.patch_embed)")
    if out["embed"] == "conv":
        out["stem_channels"] = [int(c) for c in spec.get("stem_channels", DEFAULT_STEM_CHANNELS)]
        stem_plan(name, out)  # raises when the patch cannot be built from stride-2 stages
    return out


def _twos(n: int) -> int:
    """How many times 2 divides n."""
    return (n & -n).bit_length() - 1


def stem_plan(name: str, spec: dict) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """The convolutional stem of a ``conv`` modality: (stride of each 3x3x3 stage, kernel = stride
    of the final projection), both per spatial axis (D, H, W).

    Each axis's patch is split into stride-2 stages while it stays even, the odd rest going to
    the final projection, so the token grid is the linear patches' grid: patch 16 -> four stages
    (2, 2, 2) and a 1x1x1 projection; patch (16, 16, 12) -> stage strides (2, 2, 2), (2, 2, 2),
    (2, 2, 1), (2, 2, 1) and a (1, 1, 3) projection. Stage i has ``stem_channels[i]`` channels.
    Raises ValueError, naming the modality and the fix, when no axis allows a stride-2 stage or
    ``stem_channels`` gives fewer widths than there are stages.
    """
    patch = spec["patch_size"][:3]
    twos = [_twos(p) for p in patch]
    stages = max(twos)
    if stages == 0:
        raise ValueError(f"{name}: patch_size {spec['patch_size']} has no even spatial entry, so the "
                         "convolutional stem (model.patch_embed=conv) has no stride-2 stage to build; "
                         "use an even patch size (e.g. 16) or model.patch_embed=linear")
    widths = spec["stem_channels"]
    if len(widths) < stages or any(c <= 0 for c in widths):
        raise ValueError(f"{name}: patch_size {spec['patch_size']} needs {stages} stride-2 stem "
                         f"stages but model.stem_channels={widths} gives {len(widths)} positive "
                         f"widths; give at least {stages} (e.g. "
                         f"{[16 * 2 ** i for i in range(stages)]})")
    strides = [tuple(2 if i < t else 1 for t in twos) for i in range(stages)]
    rest = tuple(p >> t for p, t in zip(patch, twos, strict=True))
    return strides, rest


def num_patches(spec: dict) -> int:
    """Visual tokens one image of this modality becomes."""
    return math.prod(s // p for s, p in zip(spec["image_size"], spec["patch_size"], strict=True))


@strict
class BrainViTConfig(PreTrainedConfig):
    r"""
    modalities (`dict[str, dict]`):
        Per modality: ``in_channels``, ``image_size`` (D, H, W) or (D, H, W, T) and ``patch_size`` of
        the same rank. Each modality gets its own patch embedding and position table;
        ``image_size / patch_size`` per axis, multiplied, gives its tokens. ``embed`` chooses the
        patch embedding: "linear" (default: one linear map per patch) or "conv" (a strided
        convolutional stem of ``stem_channels`` widths, the same token grid; see
        :func:`stem_plan`).
    """

    model_type = "umbrella_brain_vit"
    base_config_key = "vision_config"

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    modalities: dict | None = None

    def __post_init__(self, **kwargs):
        if self.modalities is None:
            self.modalities = {"T1": {"in_channels": 1, "image_size": [96, 96, 96],
                                      "patch_size": [16, 16, 16]}}
        if not self.modalities:
            raise ValueError("vision_config.modalities is empty: give at least one modality")
        self.modalities = {m: _check_modality(m, s) for m, s in self.modalities.items()}
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        super().__post_init__(**kwargs)

    def tokens_per_image(self, modality: str) -> int:
        return num_patches(self.modalities[modality])
