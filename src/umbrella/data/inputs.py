"""How each modality's images become arrays: the reader, its settings and its token count.

    T1      3D NIfTI               -> (D, H, W)       volumes.preprocess_volume
    dMRI    3D map or 4D DWI+grads -> (D, H, W)       dmri.preprocess_dmri (map computed by dipy)
    rsfMRI  4D NIfTI/frame folder  -> (T, D, H, W)    fmri.preprocess_fmri; windows taken later

A model folder stores these settings (``preprocessing.json``) so `ask` and `evaluate` read scans
exactly as training did. ``cache_params`` is what the preprocessing cache keys on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from umbrella.data.dmri import preprocess_dmri
from umbrella.data.fmri import FRAME_PATTERN, FmriSpec, preprocess_fmri, window_starts
from umbrella.data.records import ImageRef
from umbrella.data.volumes import VolumeSpec, preprocess_volume
from umbrella.errors import VolumeError


@dataclass(frozen=True)
class ModalityInput:
    modality: str
    spec: VolumeSpec | FmriSpec
    tokens: int
    dmri_map: str = "FA"

    @property
    def is_fmri(self) -> bool:
        return isinstance(self.spec, FmriSpec)

    def preprocess(self, image: ImageRef, record_id: str | None = None) -> np.ndarray:
        """The whole preprocessed image: (D, H, W), or (T, D, H, W) for an rsfMRI run."""
        if self.is_fmri:
            return preprocess_fmri(image.path, self.spec, record_id=record_id)
        if self.modality == "dMRI":
            return preprocess_dmri(image.path, self.spec, kind=self.dmri_map, bval=image.bval,
                                   bvec=image.bvec, record_id=record_id)
        return preprocess_volume(image.path, self.spec, record_id=record_id)

    def cache_params(self) -> dict:
        params = {"modality": self.modality, "spec": self.spec.to_dict()}
        if self.modality == "dMRI":
            params["map"] = self.dmri_map
        return params

    def extra_sources(self, image: ImageRef) -> tuple:
        if image.bval is None and image.bvec is None:  # every image but a DWI series
            return ()
        return tuple(p for p in (image.bval, image.bvec) if p is not None)

    def window_starts(self, n_frames: int) -> list[int]:
        s = self.spec
        return window_starts(n_frames, s.sequence_length, s.stride_within_seq, s.stride_between_seq)

    def to_dict(self) -> dict:
        return {"modality": self.modality, "kind": "fmri" if self.is_fmri else "volume",
                "spec": self.spec.to_dict(), "tokens": self.tokens, "dmri_map": self.dmri_map}

    @classmethod
    def from_dict(cls, d: dict) -> ModalityInput:
        spec_cls = FmriSpec if d.get("kind") == "fmri" else VolumeSpec
        return cls(d["modality"], spec_cls.from_dict(d["spec"]), int(d["tokens"]),
                   d.get("dmri_map", "FA"))


def count_frames(path: Path, record_id: str | None = None) -> int:
    """Frames of an rsfMRI run from the header (4D NIfTI) or the file names (frame folder)."""
    path = Path(path)
    if path.is_dir():  # names only: one listing, no stat or path object per frame
        return sum(1 for name in os.listdir(path) if FRAME_PATTERN.match(name))
    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # nibabel raises many types for bad files
        raise VolumeError(f"cannot read the header: {exc}", path=path, record_id=record_id,
                          fix="check the file is a valid 4D NIfTI") from exc
    if len(shape) != 4:
        raise VolumeError(f"rsfMRI must be 4D, this image is {len(shape)}D {shape}", path=path,
                          record_id=record_id, fix="point the record at the 4D BOLD series")
    return int(shape[3])
