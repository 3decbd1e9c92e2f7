"""`umbrella prepare` options from flags and from a YAML file with the same keys.

    umbrella prepare --config abcd.yaml --out records/          # flags win over the file

    # abcd.yaml: every key is a prepare flag with '_' for '-'
    phenotype: tables/abcd_p_demo.csv
    study: ABCD
    tasks: [sex, age]
    bids: rawdata/
    session_column: eventname
    sex_column: demo_sex_v2
    sex_coding: {1: male, 2: female}
    column: {cognition: nihtbx_totalcomp_uncorrected}
    studies: {ABCD: {sex_other: [3, 4, 777, 999]}}      # any studies.<NAME>.<field>

:func:`prepare_arguments` turns the merged options into the keyword arguments of
:func:`umbrella.tasks.prepare.prepare`; every problem names the flag (or YAML key) to fix.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from umbrella.errors import ConfigError

# key -> (flag, what it holds); the YAML file takes the same keys
KEYS = {
    "phenotype": ("--phenotype", "the CSV / TSV table, or a list of tables to join"),
    "out": ("--out", "the output folder"),
    "tasks": ("--tasks", "a list or comma list of tasks"),
    "study": ("--study", "ABCD, UKB, HCP, HBN, ABIDE or your own name"),
    "image": ("--image", "a mapping MODALITY: PATTERN"),
    "image_root": ("--image-root", "a folder"),
    "bids": ("--bids", "a BIDS folder"),
    "subject_column": ("--subject-column", "a column"),
    "session_column": ("--session-column", "a column"),
    "sex_column": ("--sex-column", "a column"),
    "sex_coding": ("--sex-coding", "a mapping CODE: male|female"),
    "age_column": ("--age-column", "a column"),
    "age_unit": ("--age-unit", "years or months"),
    "column": ("--column", "a mapping TASK: COLUMN"),
    "ratios": ("--ratios", "three numbers"),
    "seed": ("--seed", "an integer"),
    "studies": ("--set studies.<NAME>.<field>=VALUE", "a mapping NAME: {field: value}"),
}


def _err(message: str) -> ConfigError:
    return ConfigError(message, source="prepare")


def read_options_file(path: str | Path) -> dict:
    """The YAML file's options, checked against :data:`KEYS`."""
    path = Path(path)
    if not path.is_file():
        raise _err(f"--config {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as exc:
        raise _err(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise _err(f"--config {path} must be a mapping of prepare options ({', '.join(KEYS)})")
    unknown = [k for k in tree if k not in KEYS]
    if unknown:
        raise _err(f"--config {path}: unknown keys {unknown}; known: {', '.join(KEYS)}")
    return tree


def parse_sex_coding(text: str) -> dict[str, str]:
    """'1=male,2=female' -> {'1': 'male', '2': 'female'}."""
    out = {}
    for item in (p.strip() for p in str(text).split(",") if p.strip()):
        code, sep, label = item.partition("=")
        if not sep or label.strip().lower() not in ("male", "female"):
            raise _err(f"--sex-coding {text!r}: each item is CODE=male or CODE=female, e.g. "
                       "--sex-coding 1=male,2=female")
        out[code.strip()] = label.strip().lower()
    if not out:
        raise _err("--sex-coding is empty; e.g. --sex-coding 1=male,2=female")
    return out


def parse_set(items: list[str]) -> dict[str, dict]:
    """['studies.ABCD.tr=0.8'] -> {'ABCD': {'tr': 0.8}}; values are read as YAML."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 3 or parts[0] != "studies" or not all(parts):
            raise _err(f"--set {item!r} must be studies.<NAME>.<field>=VALUE, e.g. "
                       "--set studies.ABCD.sex_other=[3,4,777,999]")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out.setdefault(parts[1], {})[parts[2]] = parsed
    return out


def merge_options(from_file: dict, flags: dict) -> dict:
    """The file's options with every flag that was given (not None / empty) on top; mappings
    (image, column, studies) merge key by key."""
    merged = dict(from_file)
    for key, value in flags.items():
        if value is None or value == {} or value == []:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            if key == "studies":
                value = {n: {**merged[key].get(n, {}), **v} for n, v in value.items()}
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _listed(value) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(t) for t in value]


def prepare_arguments(options: dict) -> tuple[Path | list[Path], Path, dict]:
    """(phenotype, out, keyword arguments of prepare) from merged options."""
    missing = [KEYS[k][0] for k in ("phenotype", "out", "tasks", "study") if not options.get(k)]
    if missing:
        raise _err(f"missing {', '.join(missing)} (a flag, or a key of --config)")
    for key in ("image", "column", "sex_coding", "studies"):
        if options.get(key) is not None and not isinstance(options[key], dict):
            raise _err(f"{KEYS[key][0]}: expected {KEYS[key][1]}, got {options[key]!r}")
    ratios = options.get("ratios", (0.7, 0.15, 0.15))
    try:
        ratios = tuple(float(x) for x in (ratios.split(",") if isinstance(ratios, str)
                                          else ratios))
    except (TypeError, ValueError) as exc:
        raise _err(f"--ratios {ratios!r} must be three numbers, e.g. 0.7,0.15,0.15") from exc
    study = str(options["study"])
    studies = options.get("studies") or {}
    others = [n for n in studies if str(n).lower() != study.lower()]
    if others:
        raise _err(f"--set studies.{others[0]}...: this run prepares study {study!r}; write "
                   f"studies.{study}.<field>")
    coding = options.get("sex_coding")
    kwargs = {
        "tasks": _listed(options["tasks"]), "study": study,
        "images": {str(k): str(v) for k, v in (options.get("image") or {}).items()} or None,
        "bids_root": Path(options["bids"]) if options.get("bids") else None,
        "image_root": Path(options["image_root"]) if options.get("image_root") else None,
        "subject_column": options.get("subject_column"),
        "session_column": options.get("session_column"),
        "sex_column": options.get("sex_column"), "age_column": options.get("age_column"),
        "sex_coding": {str(k): str(v) for k, v in coding.items()} if coding else None,
        "age_unit": options.get("age_unit"),
        "columns": {str(k): str(v) for k, v in (options.get("column") or {}).items()} or None,
        "ratios": ratios, "seed": int(options.get("seed", 12345)),
        "study_overrides": next(iter(studies.values()), None),
    }
    tables = options["phenotype"]
    tables = [Path(t) for t in tables] if isinstance(tables, list) else Path(tables)
    if isinstance(tables, list) and len(tables) == 1:
        tables = tables[0]
    return tables, Path(options["out"]), kwargs


__all__ = ["KEYS", "merge_options", "parse_set", "parse_sex_coding", "prepare_arguments",
           "read_options_file"]
