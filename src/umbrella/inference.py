"""`umbrella ask`: answer a question about one subject's scans with a trained model.

Scans are preprocessed exactly as in training (the model folder's ``preprocessing.json``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from umbrella.data.catalog import load_preprocessing
from umbrella.data.records import IMAGE_PLACEHOLDER, Turn
from umbrella.data.prompts import PromptEncoder
from umbrella.data.volumes import preprocess_volume
from umbrella.errors import ConfigError
from umbrella.evaluation.scoring import generate_answers
from umbrella.model.build import load_brain_llava


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder (holding model/) or the model folder itself."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"{path} is neither a run folder (with model/) nor a model folder "
                      "(with config.json); pass the folder `umbrella train` printed")


class BrainAssistant:
    """Keeps a model loaded to answer several questions."""

    def __init__(self, model: str | Path, device: str = "cpu"):
        self.model_dir = resolve_model_dir(model)
        self.model, self.tokenizer = load_brain_llava(self.model_dir, device)
        self.encoder = PromptEncoder(self.tokenizer)
        self.inputs = load_preprocessing(self.model_dir)

    def load_images(self, images: list[tuple[str, str | Path]]) -> list[tuple[str, torch.Tensor]]:
        out = []
        for modality, path in images:
            if modality not in self.inputs:
                raise ConfigError(f"this model reads {', '.join(self.inputs)}, not {modality!r}")
            vol = preprocess_volume(path, self.inputs[modality].spec)
            out.append((modality, torch.from_numpy(vol)[None]))
        return out

    def ask(self, question: str, images: list[tuple[str, str | Path]],
            max_new_tokens: int = 32) -> str:
        """One answer. ``<image>`` placeholders are prepended for images the question lacks."""
        missing = len(images) - question.count(IMAGE_PLACEHOLDER)
        if missing < 0:
            raise ConfigError(f"the question has {question.count(IMAGE_PLACEHOLDER)} <image> "
                              f"placeholders but {len(images)} images were given")
        text = (IMAGE_PLACEHOLDER + "\n") * missing
        turns = (Turn("user", text + question), Turn("assistant", ""))
        sample = {"images": self.load_images(images), "turns": turns,
                  "image_tokens": [self.inputs[m].tokens for m, _ in images]}
        return generate_answers(self.model, self.encoder, [sample], max_new_tokens)[0]
