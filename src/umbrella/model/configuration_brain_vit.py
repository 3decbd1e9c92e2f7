"""Configuration of the brain vision tower: one patch embedding per modality, a shared encoder.

Plain values only; validated on construction. Registered with ``AutoConfig`` under
``model_type = "umbrella_brain_vit"`` so that ``LlavaConfig(vision_config=...)`` builds, saves and
reloads it like any other tower.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from umbrella.geometry import check_modality, num_patches


@strict
class BrainViTConfig(PreTrainedConfig):
    r"""
    modalities (`dict[str, dict]`):
        Per modality: ``in_channels``, ``image_size`` (D, H, W) or (D, H, W, T) and ``patch_size`` of
        the same rank. Each modality gets its own patch embedding and position table;
        ``image_size / patch_size`` per axis, multiplied, gives its tokens. ``embed`` chooses the
        patch embedding: "linear" (default: one linear map per patch) or "conv" (a strided
        convolutional stem of ``stem_channels`` widths, the same token grid; see
        :func:`umbrella.geometry.stem_plan`).
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
        self.modalities = {m: check_modality(m, s) for m, s in self.modalities.items()}
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        super().__post_init__(**kwargs)

    def tokens_per_image(self, modality: str) -> int:
        return num_patches(self.modalities[modality])
