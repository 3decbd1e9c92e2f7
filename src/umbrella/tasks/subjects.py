"""Subject and session identifiers: how a phenotype table's ids meet the ids in image paths.

Cohorts spell one subject several ways. ABCD tables hold ``NDAR_INV0A4P0LWM`` (columns
``src_subject_id`` and ``subjectkey``) while their BIDS tree holds ``sub-NDARINV0A4P0LWM``,
because a BIDS label may hold letters and digits only. HCP ids are numbers (``100307``) that a
spreadsheet may have turned into ``100307.0``; BIDS conversions may pad them (``sub-0042``).

:func:`subject_key` maps every such spelling to one key, in this order:

1. surrounding white space is dropped; a ``sub-`` prefix (any case) is dropped;
2. every character that is not a letter or a digit is dropped (BIDS's rule for labels:
   ``NDAR_INV0A4P0LWM`` -> ``NDARINV0A4P0LWM``);
3. case is folded (``ndarinv0a4p0lwm``);
4. an all-digit key loses its leading zeros (``0042`` -> ``42``), and a float-looking id from a
   spreadsheet (``100307.0``) is read as the integer it is.

Two table ids with the same key are an error (prepare names both). :func:`session_key` does the
same for sessions after dropping a ``ses-`` prefix, so ABCD's ``eventname``
``baseline_year_1_arm_1`` meets BIDS's ``ses-baselineYear1Arm1`` and UK Biobank's instance
``2`` (column ``21003-2.0``, bulk file ``1234567_20252_2_0``) meets ``ses-2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]")
_FLOAT_ID = re.compile(r"^\d+\.0+$")
_SES_IN_PATH = re.compile(r"(?:^|[/_])ses-([0-9A-Za-z]+)")
_UKB_BULK = re.compile(r"(?:^|[/_])\d{7}_\d{5}_(\d+)_\d+(?:[/._]|$)")  # eid_field_instance_array
_UKB_COLUMN = re.compile(r"^(?P<field>\d+)-(?P<instance>\d+)\.(?P<array>\d+)$")  # ukbconv: 21003-2.0


def clean_id(raw) -> str:
    """The id as written, stripped; a spreadsheet's ``100307.0`` becomes ``100307``."""
    text = str(raw).strip()
    return text.split(".")[0] if _FLOAT_ID.match(text) else text


def subject_key(raw) -> str:
    """The matching key of a subject id (see the module docstring); '' for an empty id."""
    text = str(raw).strip()
    if _FLOAT_ID.match(text):
        text = text.split(".")[0]
    if text[:4].lower() == "sub-":
        text = text[4:]
    key = _NOT_ALNUM.sub("", text).casefold()
    return (key.lstrip("0") or "0") if key.isdigit() else key


def session_key(raw) -> str:
    """The matching key of a session label: ``ses-`` dropped, then as :func:`subject_key`."""
    text = "" if raw is None else str(raw).strip()
    if text[:4].lower() == "ses-":
        text = text[4:]
    return subject_key(text) if text else ""


def session_in_path(path: str) -> str:
    """The session a file's path names: a BIDS ``ses-<label>`` part, else the instance of a
    UK Biobank bulk name (``1234567_20252_2_0``); '' when none. Returned as written."""
    text = str(path).replace("\\", "/")
    found = _SES_IN_PATH.findall(text)
    if found:
        return found[-1]
    bulk = _UKB_BULK.findall(text)
    return bulk[-1] if bulk else ""


def ukb_instance_column(column: str, session: str) -> str | None:
    """The same UK Biobank field at another instance: ('21003-2.0', '3') -> '21003-3.0';
    None when ``column`` is not field-coded or ``session`` is not an instance number."""
    m = _UKB_COLUMN.match(str(column))
    if m is None or not str(session).isdigit():
        return None
    return f"{m['field']}-{int(session)}.{m['array']}"


@dataclass
class IdMatch:
    """How the table's subjects met one modality's images (for the summary)."""

    modality: str
    table_ids: int  # distinct subjects in the table
    image_ids: int  # distinct subjects with at least one file
    matched: int
    table_only: list[str] = field(default_factory=list)  # a few table ids with no image
    images_only: list[str] = field(default_factory=list)  # a few image ids not in the table

    def to_dict(self) -> dict:
        return {"table_ids": self.table_ids, "image_ids": self.image_ids, "matched": self.matched,
                "unmatched_table_examples": self.table_only,
                "unmatched_image_examples": self.images_only}

    def describe(self) -> str:
        text = (f"{self.modality}: {self.matched} of {self.table_ids} table subjects matched "
                f"{self.image_ids} subjects with images")
        if self.table_only:
            text += f"; table only, e.g. {', '.join(self.table_only)}"
        if self.images_only:
            text += f"; images only, e.g. {', '.join(self.images_only)}"
        return text


def match_ids(modality: str, table_ids: dict[str, str], image_ids: dict[str, str],
              examples: int = 3) -> IdMatch:
    """``table_ids`` / ``image_ids``: {key: id as written}. Counts and a few unmatched of each."""
    both = table_ids.keys() & image_ids.keys()
    return IdMatch(modality, len(table_ids), len(image_ids), len(both),
                   [table_ids[k] for k in sorted(table_ids.keys() - both)][:examples],
                   [image_ids[k] for k in sorted(image_ids.keys() - both)][:examples])


__all__ = ["IdMatch", "clean_id", "match_ids", "session_in_path", "session_key", "subject_key",
           "ukb_instance_column"]
