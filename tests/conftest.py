"""Test-wide settings: offline, caches in a temp folder, two threads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.gettempdir()) / "umbrella-test-cache"
for _var, _sub in (("NILEARN_DATA", "nilearn"), ("DIPY_HOME", "dipy"), ("HF_HOME", "hf"),
                   ("MPLCONFIGDIR", "mpl")):
    os.environ.setdefault(_var, str(_CACHE / _sub))
    Path(os.environ[_var]).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(2)
