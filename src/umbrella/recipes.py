"""Measured training recipes: the settings `umbrella prepare` writes into ``train.yaml`` and
``benchmarks/learning.py`` measures, kept in one place so that both are the same.

``T1_TWO_STAGE`` (benchmarks/README.md section 11, "A pretrained tower under scanner contrast"
and "2,000 VLM steps"): T1 resampled to 4 mm in a 48 x 64 x 48 grid (192 x 256 x 192 mm, any
file orientation and spacing: images are read RAS+ and resampled), the pooled convolutional stem
[8, 16, 32, 64] without population centering, left-right flips of the training images; first
`umbrella pretrain` (16 epochs, one linear head per task on the tower) run by `umbrella train`
itself (``model.vision_init=pretrain``), then the VLM on that tower, frozen, reading each scan as
one token (the mean of the tower's tokens, ``model.token_pool=all``), 2,000 steps at a
peak rate of 5e-4 with weight decay 0.1, validated every 500, the best validation task metric
kept; each image decoded and resampled once and kept in RAM in float16 (``dataset.memoize``).
On the realistic demo cohort (2,000 subjects, scanner contrast, 3 seeds) it read age at 0.71 x
the classical reference's MAE and sex level with the reference (0.886 against 0.885); on the same
generator's cohort handed over as BIDS, PIR, 3 mm (benchmarks/unseen_layout.py) at 0.77 x and
level (0.871 against 0.870). benchmarks/README.md sections 11 and 14.
"""

from __future__ import annotations

from typing import Any

from umbrella.config import _flatten

T1_TWO_STAGE: dict[str, Any] = {
    "dataset": {"T1": {
        "image_size": [48, 64, 48], "patch_size": [16, 16, 16], "voxel_size": [4.0, 4.0, 4.0],
        "augment": True,
        "augment_ranges": {"rotate_deg": 0.0, "scale": 0.0, "translate_vox": 0.0,
                           "intensity": 0.0}},
        # decoded, resampled volumes kept in RAM (float16): 0.3 MB per image at this grid
        "memoize": True},
    # token_pool "all": the VLM reads each scan as one token, the mean of the tower's tokens (what
    # the first stage's linear heads read): kept validation score 0.7870 against 0.7819 with the
    # 36 tokens on the same towers, 3 of 3 seeds higher (benchmarks/README.md section 11, "One
    # token per scan")
    "model": {"patch_embed": "conv", "stem_style": "pooled", "stem_channels": [8, 16, 32, 64],
              "center_inputs": False, "vision_init": "pretrain", "train_embeddings": "frozen",
              "train_vision": "frozen", "token_pool": "all"},
    # 16 epochs rather than 12 (and 12 rather than 8), each by the VLM's kept validation score on
    # the mean of 3 seeds: 0.7900 against 0.7870 with one token per scan, 2 of 3 higher; 0.7819
    # against 0.7759 before (benchmarks/README.md section 11, "A first stage of 16 epochs")
    "pretrain": {"epochs": 16},
    "training": {"max_steps": 2000, "learning_rate": 5.0e-4, "weight_decay": 0.1,
                 "eval_steps": 500, "select_best": "metric", "generation_log_every": 0},
}


RECIPES: dict[str, dict[str, Any]] = {"t1_two_stage": T1_TWO_STAGE}  # the config's ``recipe`` key


def dotlist(tree: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """A recipe as command-line overrides (``KEY=VALUE``), leaving out the dotted keys in
    ``skip``: {"model": {"preset": "tiny"}} -> ["model.preset=tiny"]."""
    def text(value) -> str:
        if isinstance(value, list):
            return "[" + ",".join(map(str, value)) + "]"
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [f"{key}={text(value)}" for key, value in _flatten(tree) if key not in skip]
