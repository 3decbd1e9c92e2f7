"""Finding a cohort's image files and the subject and session each one belongs to.

Two layouts:

* a BIDS tree: ``sub-<label>/[ses-<label>/]anat/*_T1w.nii.gz``, ``func/*_bold.nii.gz``,
  ``dwi/*_dwi.nii.gz`` (rsfMRI keeps ``task-rest`` runs when a subject has any);
* a path pattern per modality, relative to the image root, with ``{subject}`` (the id as the
  table writes it, or as the path writes it: ids are matched through
  :func:`umbrella.tasks.subjects.subject_key`), ``{label}`` (the same without ``sub-``),
  ``{session}`` (optional) and glob characters, e.g.
  ``derivatives/freesurfer/{subject}/mri/T1.mgz`` or ``bulk/{subject}_20252_{session}_0/T1/T1.nii.gz``.
  Every file the pattern matches is one scan.

A file's session comes from ``{session}``, else a ``ses-<label>`` part of its path, else a UK
Biobank bulk name (``<eid>_<field>_<instance>_<array>``); '' when none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from umbrella.errors import ConfigError
from umbrella.tasks.subjects import session_in_path, session_key, subject_key

MODALITIES = ("T1", "rsfMRI", "dMRI")
BIDS_IMAGES = {"T1": ("anat", ("_T1w.nii.gz", "_T1w.nii")),
               "rsfMRI": ("func", ("_bold.nii.gz", "_bold.nii")),
               "dMRI": ("dwi", ("_dwi.nii.gz", "_dwi.nii"))}
_FIELD = re.compile(r"\{(subject|label|session)\}")


@dataclass(frozen=True)
class ImageFile:
    path: Path
    subject: str  # the id as the path writes it
    session: str = ""  # the session as the path writes it ('' when none)

    @property
    def key(self) -> tuple[str, str]:
        return subject_key(self.subject), session_key(self.session)


def discover_bids(root: Path, modalities=MODALITIES) -> dict[str, list[ImageFile]]:
    """{modality: [ImageFile]} of a BIDS tree; subject = the label without ``sub-``."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"BIDS root {root} is not a folder (--bids)", source="prepare")
    found: dict[str, list[ImageFile]] = {m: [] for m in modalities}
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        for modality in modalities:
            folder, suffixes = BIDS_IMAGES[modality]
            files = sorted({f for s in suffixes for pattern in (f"{folder}/*{s}",
                                                                f"ses-*/{folder}/*{s}")
                            for f in sub.glob(pattern)})
            if modality == "rsfMRI" and any("task-rest" in f.name for f in files):
                files = [f for f in files if "task-rest" in f.name]
            found[modality] += [ImageFile(f, sub.name[4:], session_in_path(
                str(f.relative_to(sub)))) for f in files]
    return found


def _pattern_regex(pattern: str) -> re.Pattern:
    """A regex matching the paths ``pattern`` globs, capturing subject and session."""
    out, seen, pos = [], set(), 0
    for m in _FIELD.finditer(pattern):
        out.append(_glob_regex(pattern[pos:m.start()]))
        name = "subject" if m[1] in ("subject", "label") else "session"
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
        seen.add(name)
        pos = m.end()
    out.append(_glob_regex(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


def _glob_regex(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in text[i + 1:]:
            end = text.index("]", i + 1)
            out.append("[" + text[i + 1:end].replace("!", "^", 1) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def pattern_files(pattern: str, root: Path) -> list[ImageFile]:
    """Every file or folder ``pattern`` matches under ``root`` (see the module docstring)."""
    if "{subject}" not in pattern and "{label}" not in pattern:
        raise ConfigError(f"--image pattern {pattern!r} has no {{subject}}: write where the "
                          "subject id goes, e.g. T1=images/{subject}_T1w.nii.gz",
                          source="prepare")
    path = Path(pattern)
    full = path if path.is_absolute() else Path(root) / path
    anchor = Path(full.anchor)
    relative = full.relative_to(anchor).as_posix()
    regex = _pattern_regex(relative)
    out = []
    for hit in sorted(anchor.glob(_FIELD.sub("*", relative))):
        m = regex.match(hit.relative_to(anchor).as_posix())
        if m is None:
            continue
        subject = m["subject"]
        session = m.groupdict().get("session") or session_in_path(hit.as_posix())
        out.append(ImageFile(hit, subject, session))
    return out


def example_path(pattern: str, subject: str, root: Path) -> Path:
    """Where ``pattern`` looks for ``subject`` (for error messages)."""
    text = pattern.replace("{label}", subject[4:] if subject.startswith("sub-") else subject)
    text = text.replace("{subject}", subject).replace("{session}", "<session>")
    path = Path(text)
    return path if path.is_absolute() else Path(root) / path


def collect_images(images: dict[str, str] | None, bids_root: Path | None,
                   image_root: Path) -> tuple[dict[str, list[ImageFile]], dict[str, Path]]:
    """({modality: [ImageFile]}, {modality: data root}) from patterns and / or a BIDS tree;
    a pattern wins over the BIDS tree for its modality."""
    images = dict(images or {})
    bad = [m for m in images if m not in MODALITIES]
    if bad:
        raise ConfigError(f"unknown modality {bad[0]!r} in --image {bad[0]}=...; use "
                          f"{', '.join(MODALITIES)}", source="prepare")
    if not images and bids_root is None:
        raise ConfigError("no images: pass --image T1='path/{subject}_T1w.nii.gz' or --bids DIR "
                          "(images= / bids_root= in Python)", source="prepare")
    out: dict[str, list[ImageFile]] = {}
    roots: dict[str, Path] = {}
    if bids_root is not None:
        for modality, files in discover_bids(bids_root, [m for m in MODALITIES
                                                         if m not in images]).items():
            if files:
                out[modality], roots[modality] = files, Path(bids_root).resolve()
    for modality, pattern in images.items():
        out[modality], roots[modality] = pattern_files(pattern, image_root), Path(image_root)
    return out, roots


__all__ = ["ImageFile", "collect_images", "discover_bids", "example_path", "pattern_files"]
