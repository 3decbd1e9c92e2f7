"""Model: the brain vision tower (registered with the Auto classes on import) and BrainLlava."""

from transformers import AutoConfig, AutoModel

from umbrella.model.configuration_brain_vit import BrainViTConfig
from umbrella.model.modeling_brain_vit import BrainViTModel

AutoConfig.register(BrainViTConfig.model_type, BrainViTConfig, exist_ok=True)
AutoModel.register(BrainViTConfig, BrainViTModel, exist_ok=True)

__all__ = ["BrainViTConfig", "BrainViTModel"]
