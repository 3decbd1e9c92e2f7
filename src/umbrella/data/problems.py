"""What `umbrella validate` reports: the kinds of problem and warning, and one problem."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = {  # kind -> what it means; the order of the summary table
    "malformed_json": "a line (or a .json file) is not valid JSON",
    "malformed_record": "a record's structure is wrong (turns, roles, images)",
    "missing_key": "a record lacks a required key",
    "unknown_modality": "an image names a modality other than T1, rsfMRI, dMRI",
    "image_count": "<image> placeholders and images differ in number",
    "no_records": "a records file holds no record",
    "duplicate_id": "a record id is used more than once",
    "subject_in_two_splits": "one subject appears in two splits",
    "unparseable_answer": "the answer names none or several of the task's options",
    "path_escapes_root": "an image path resolves outside its data root",
    "missing_file": "a file or folder does not exist",
    "corrupt_file": "a file cannot be read (corrupt, truncated, broken header)",
    "wrong_dims": "an image has the wrong number of dimensions for its modality",
    "zero_size": "an image has a zero-size dimension",
    "nan_inf": "an image holds NaN or Inf voxels",
    "constant": "an image is constant (blank)",
    "fmri_too_short": "an rsfMRI run has fewer frames than one window",
    "dmri_no_gradients": "a 4D diffusion series has no bval / bvec",
    "dmri_bad_gradients": "bval / bvec cannot be read or do not match the series",
    "implausible_answer": "a numeric answer lies outside the task's plausible range",
    "duplicate_scan": "one scan (same file or same voxels) is named under two subject ids",
    "no_orientation": "a NIfTI has sform and qform codes 0: no usable orientation",
}
WARNING_KINDS = {  # reported, but do not fail validation
    "fmri_no_tr": "an rsfMRI run has no TR in its header and its study's TR is unknown",
    "head_cropped": "the configured geometry cuts off part of the head",
    "extreme_anisotropy": "the voxels are much longer along one axis than another",
}
MIN_KEPT = 0.99  # warn when the spatial fitting keeps less of the head than this
MAX_FOV_MM = 500.0  # a wider image is not a head: its header's voxel sizes are wrong
MAX_ANISOTROPY = 3.0  # warn when the longest voxel side exceeds this many times the shortest


@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    record_id: str | None  # None where no record can be named (a whole file, an id-less line)
    file: str | None  # the file to fix: the records file for record problems, else the image
    message: str  # what is wrong
    fix: str  # how to fix it
    line: int | None = None  # line of a JSONL records file

    def describe(self) -> str:
        """One line: ``record X | file Y [line N] | message | fix: ...``."""
        rid = "-" if self.record_id is None else self.record_id
        where = self.file or "-"
        if self.line is not None:
            where += f" line {self.line}"
        return f"record {rid} | file {where} | {self.message} | fix: {self.fix}"


def split_fix(text: str) -> tuple[str, str]:
    """'message (fix: how)' -> ('message', 'how'); no fix -> (text, '')."""
    if text.endswith(")") and " (fix: " in text:
        head, _, tail = text.rpartition(" (fix: ")
        return head, tail[:-1]
    return text, ""
