"""Config -> the records and per-modality input settings a run uses.

Records of every enabled ``dataset.<modality>`` section are read once (a file named by several
sections is read once), filtered to ``dataset.tasks`` and grouped by split. One subject in two
splits is an error: splits are by subject.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from umbrella.config import ModalityConfig, UmbrellaConfig
from umbrella.data.fmri import FmriSpec
from umbrella.data.heap import long_lived
from umbrella.data.inputs import ModalityInput
from umbrella.data.records import Record, load_records
from umbrella.data.volumes import VolumeSpec
from umbrella.errors import ConfigError, ModelError, RecordError
from umbrella.geometry import check_modality, pooled_tokens

PREPROCESSING_FILE = "preprocessing.json"


def data_roots(cfg: UmbrellaConfig) -> dict[str, Path]:
    return {m: Path(s.data_root) for m, s in cfg.dataset.enabled().items() if s.data_root}


def volume_spec(section: ModalityConfig) -> VolumeSpec:
    return VolumeSpec(image_size=tuple(section.image_size[:3]),
                      voxel_size=tuple(section.voxel_size) if section.voxel_size else None,
                      spatial=section.spatial, normalize=section.normalize,
                      field_of_view=section.field_of_view)


def fmri_spec(section: ModalityConfig) -> FmriSpec:
    normalize = "zscore_run" if section.normalize == "zscore_brain" else section.normalize
    return FmriSpec(image_size=tuple(section.image_size[:3]),
                    sequence_length=section.sequence_length,
                    stride_within_seq=section.stride_within_seq,
                    stride_between_seq=section.stride_between_seq, normalize=normalize,
                    voxel_size=tuple(section.voxel_size) if section.voxel_size else None,
                    field_of_view=section.field_of_view)


def geometry(section: ModalityConfig, modality: str = "T1") -> dict:
    """The tower's view of a modality: channels, image size and patch size.

    rsfMRI adds time: image (D, H, W, sequence_length), patches (pd, ph, pw, pt) where pt is the
    4th patch entry, or the whole window when patch_size has 3 entries.
    """
    size, patch = list(section.image_size[:3]), list(section.patch_size)
    if modality == "rsfMRI":
        time_patch = patch[3] if len(patch) == 4 else section.sequence_length
        if len(section.image_size) == 4 and section.image_size[3] != section.sequence_length:
            raise ConfigError(f"dataset.rsfMRI.image_size[3]={section.image_size[3]} differs from "
                              f"sequence_length={section.sequence_length}; give 3 spatial sizes")
        return {"in_channels": 1, "image_size": size + [section.sequence_length],
                "patch_size": patch[:3] + [time_patch]}
    if len(section.image_size) != 3 or len(patch) != 3:
        raise ConfigError(f"dataset.{modality}: image_size and patch_size need 3 entries (D, H, W)")
    return {"in_channels": 1, "image_size": size, "patch_size": patch}


def modality_input(modality: str, section: ModalityConfig, token_pool: int | str = 1) -> ModalityInput:
    """What a model with this section's geometry needs: preprocessing spec and the visual tokens
    each ``<image>`` expands to (after ``model.token_pool``)."""
    spec = fmri_spec(section) if modality == "rsfMRI" else volume_spec(section)
    try:
        geom = _checked(modality, geometry(section, modality))
    except ValueError as exc:
        raise ConfigError(f"dataset.{modality}: {exc}") from exc
    try:
        tokens = pooled_tokens(geom, token_pool, modality)
    except ModelError as exc:
        raise ConfigError(f"model.token_pool={token_pool}: {exc}") from exc
    return ModalityInput(modality, spec, tokens, section.dmri_map)


def _checked(modality: str, geom: dict) -> dict:
    return check_modality(modality, geom)


def modality_inputs(cfg: UmbrellaConfig) -> dict[str, ModalityInput]:
    return {m: modality_input(m, s, cfg.model.token_pool) for m, s in cfg.dataset.enabled().items()}


def model_geometry(cfg: UmbrellaConfig) -> dict[str, dict]:
    return {m: geometry(s, m) for m, s in cfg.dataset.enabled().items()}


def load_config_records(cfg: UmbrellaConfig) -> list[Record]:
    enabled = cfg.dataset.enabled()
    if not enabled:
        raise ConfigError("no modality has records: set dataset.T1.records (or rsfMRI/dMRI) to "
                          "one or more JSON/JSONL files")
    roots, files = data_roots(cfg), []
    for section in enabled.values():
        files += [Path(f) for f in section.records if Path(f) not in files]
    with long_lived():  # no collector passes over the growing records; frozen when many
        records = [r for f in files for r in load_records(f, roots)]
    seen: dict[str, Record] = {}
    for rec in records:
        if rec.id in seen:
            raise RecordError(f"id also used in {seen[rec.id].source}", record_id=rec.id,
                              source=rec.source, fix="make record ids unique across files")
        seen[rec.id] = rec
    if cfg.dataset.tasks:
        records = [r for r in records if r.task in cfg.dataset.tasks]
    return records


def by_split(records: list[Record]) -> dict[str, list[Record]]:
    """Group records by split; a subject in two splits raises RecordError."""
    splits: dict[str, list[Record]] = defaultdict(list)
    subject_split: dict[str, tuple[str, Record]] = {}
    for rec in records:
        first = subject_split.setdefault(rec.subject_id, (rec.split, rec))
        if first[0] != rec.split:
            raise RecordError(f"subject {rec.subject_id!r} is in split {rec.split!r} here and in "
                              f"{first[0]!r} in record {first[1].id!r}", record_id=rec.id,
                              source=rec.source, fix="assign each subject to exactly one split")
        splits[rec.split].append(rec)
    return dict(splits)


def save_preprocessing(inputs: dict[str, ModalityInput], folder: Path) -> dict:
    from umbrella.io import atomic_write_json

    info = {m: i.to_dict() for m, i in inputs.items()}
    atomic_write_json(Path(folder) / PREPROCESSING_FILE, info)
    return info


def load_preprocessing(folder: Path) -> dict[str, ModalityInput]:
    path = Path(folder) / PREPROCESSING_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the model folder was not written by umbrella train")
    info = json.loads(path.read_text())
    return {m: ModalityInput.from_dict({"modality": m, **v}) for m, v in info.items()}


def cached_images(cfg: UmbrellaConfig, records: list[Record] | None = None):
    """Yield ``(record, image, modality input, cache params)`` once per distinct (modality,
    path) referenced by the config's records; the params dict is shared per modality.

    Allocates nothing that outlives an image (no tuple per image in the seen-set): at 45,000
    images in a process that holds the records, surviving containers made the garbage
    collector's passes over the heap the largest cost of indexing."""
    inputs = modality_inputs(cfg)
    params = {m: inp.cache_params() for m, inp in inputs.items()}  # once, not per image
    seen: dict[str, set] = {m: set() for m in inputs}
    for rec in records if records is not None else load_config_records(cfg):
        for image in rec.images:
            done = seen.get(image.modality)
            if done is None or image.path in done:
                continue
            done.add(image.path)
            yield rec, image, inputs[image.modality], params[image.modality]


def cache_jobs(cfg: UmbrellaConfig, records: list[Record] | None = None) -> list:
    """One preprocessing job per distinct image referenced by the config's records."""
    from functools import partial

    from umbrella.data.cache import CacheJob

    return [CacheJob(image.path, image.modality, params, partial(mod.preprocess, image, rec.id),
                     mod.extra_sources(image))
            for rec, image, mod, params in cached_images(cfg, records)]
