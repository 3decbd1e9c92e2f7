"""Instruction records: JSON / JSONL conversations about one or more brain images.

Two input forms parse to the same :class:`Record`:

LLaVA form::

    {"id": "sub-0001_sex", "subject_id": "sub-0001", "study": "ABCD", "task": "sex", "split": "train",
     "images": [{"modality": "T1", "path": "sub-0001/T1w.nii.gz"}],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the sex of this subject?"},
                       {"from": "gpt", "value": "female"}]}

chat form::

    {"id": ..., "messages": [
        {"role": "user", "content": [{"type": "image", "modality": "T1", "path": "..."},
                                     {"type": "text", "text": "What is the sex of this subject?"}]},
        {"role": "assistant", "content": "female"}], ...}

In the chat form, content parts are joined with a newline, each image part becoming ``<image>``.
Relative image paths resolve against the modality's data root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umbrella.config import MODALITIES
from umbrella.data.heap import long_lived
from umbrella.errors import RecordError

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}
_META_KEYS = ("subject_id", "study", "task", "split")


@dataclass(frozen=True)
class ImageRef:
    modality: str
    path: Path  # resolved against the data root
    bval: Path | None = None  # dMRI series only: gradient files (else found beside the image)
    bvec: Path | None = None


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str  # user turns carry one "<image>" per image, in order of appearance


@dataclass(frozen=True)
class Record:
    id: str
    images: tuple[ImageRef, ...]
    turns: tuple[Turn, ...]
    subject_id: str
    study: str = ""
    task: str = ""
    split: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False)

    @property
    def answer(self) -> str:
        """The last assistant turn: the reference answer for evaluation."""
        return [t.text for t in self.turns if t.role == "assistant"][-1]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(im.modality for im in self.images))


class _Ctx:
    """Where a record came from, to build error messages."""

    def __init__(self, source: str, line: int | None, record_id: str | None = None):
        self.source, self.line, self.record_id = source, line, record_id

    def error(self, message: str, fix: str | None = None) -> RecordError:
        return RecordError(message, record_id=self.record_id, source=self.source, line=self.line,
                           fix=fix)


def _resolve_image(raw: Any, ctx: _Ctx, data_roots: dict[str, Path]) -> ImageRef:
    if not isinstance(raw, dict) or "modality" not in raw or "path" not in raw:
        raise ctx.error(f"image entry {raw!r} must be an object with 'modality' and 'path'",
                        fix='write {"modality": "T1", "path": "sub-01/T1w.nii.gz"}')
    modality = raw["modality"]
    if modality not in MODALITIES:
        raise ctx.error(f"unknown modality {modality!r}", fix=f"use one of {', '.join(MODALITIES)}")
    def resolve(value) -> Path:
        path = Path(str(value))
        if not path.is_absolute() and modality in data_roots:
            path = data_roots[modality] / path
        return path

    grads = [resolve(raw[k]) if raw.get(k) else None for k in ("bval", "bvec")]
    return ImageRef(modality, resolve(raw["path"]), *grads)


def _turns_llava(obj: dict, ctx: _Ctx) -> list[Turn]:
    turns = []
    for i, msg in enumerate(obj["conversations"]):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise ctx.error(f"conversations[{i}] must have 'from' and 'value'")
        role = _ROLES.get(str(msg["from"]))
        if role is None:
            raise ctx.error(f"conversations[{i}] has unknown speaker {msg['from']!r}",
                            fix="use 'human' or 'gpt'")
        turns.append(Turn(role, str(msg["value"])))
    return turns


def _content_text(content: Any, ctx: _Ctx, i: int, images: list) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ctx.error(f"messages[{i}].content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            images.append(part)
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise ctx.error(f"messages[{i}] has a content part {part!r} of unknown type",
                            fix="use {'type': 'image', ...} or {'type': 'text', 'text': ...}")
    return "\n".join(parts)


def _turns_chat(obj: dict, ctx: _Ctx) -> tuple[list[Turn], list]:
    turns, images = [], []
    for i, msg in enumerate(obj["messages"]):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ctx.error(f"messages[{i}] must have 'role' and 'content'")
        role = _ROLES.get(str(msg["role"]))
        if role is None:
            raise ctx.error(f"messages[{i}] has unknown role {msg['role']!r}",
                            fix="use 'system', 'user' or 'assistant'")
        turns.append(Turn(role, _content_text(msg["content"], ctx, i, images)))
    return turns, images


def _check_turns(turns: list[Turn], n_images: int, ctx: _Ctx) -> None:
    body = [t for t in turns if t.role != "system"]
    if not body or body[-1].role != "assistant":
        raise ctx.error("the conversation must end with an assistant answer")
    for prev, cur in zip(body, body[1:], strict=False):
        if prev.role == cur.role:
            raise ctx.error(f"two {cur.role} turns in a row", fix="alternate user and assistant")
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role != "user"):
        raise ctx.error("<image> may only appear in user turns")
    n_tokens = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_tokens != n_images:
        raise ctx.error(f"{n_tokens} <image> placeholders but {n_images} images",
                        fix="put exactly one <image> in the text per entry of 'images'")


def parse_record(obj: Any, *, source: str = "<memory>", line: int | None = None,
                 data_roots: dict[str, Path] | None = None) -> Record:
    """Parse one record in either form. Raises RecordError naming the record, file and line."""
    ctx = _Ctx(source, line)
    if not isinstance(obj, dict):
        raise ctx.error(f"a record must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise ctx.error("missing key 'id'", fix="give every record a unique id")
    ctx.record_id = str(obj["id"])
    if "conversations" in obj:
        if not isinstance(obj["conversations"], list):
            raise ctx.error("'conversations' must be a list")
        turns, raw_images = _turns_llava(obj, ctx), obj.get("images", [])
        if isinstance(raw_images, dict):
            raw_images = [raw_images]
    elif "messages" in obj:
        if not isinstance(obj["messages"], list):
            raise ctx.error("'messages' must be a list")
        turns, raw_images = _turns_chat(obj, ctx)
    else:
        raise ctx.error("missing key 'conversations' (LLaVA form) or 'messages' (chat form)")
    if not isinstance(raw_images, list):
        raise ctx.error("'images' must be a list")
    roots = {m: Path(p) for m, p in (data_roots or {}).items()}
    images = tuple(_resolve_image(im, ctx, roots) for im in raw_images)
    _check_turns(turns, len(images), ctx)
    if "subject_id" not in obj:
        raise ctx.error("missing key 'subject_id'", fix="splits are by subject: name the subject")
    meta = {k: v for k, v in obj.items()
            if k not in ("id", "conversations", "messages", "images", *_META_KEYS)}
    return Record(id=ctx.record_id, images=images, turns=tuple(turns),
                  subject_id=str(obj["subject_id"]), study=str(obj.get("study", "")),
                  task=str(obj.get("task", "")), split=str(obj.get("split", "")),
                  metadata=meta.get("metadata", meta), source=source)


def _json(text: str, path: Path, line: int | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"malformed JSON: {exc.msg} at column {exc.colno}", source=path,
                          line=line if line is not None else exc.lineno,
                          fix="repair or remove this line") from exc
    except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit integer, nesting too deep
        raise RecordError(f"unreadable JSON: {type(exc).__name__}: {str(exc)[:200]}", source=path,
                          line=line, fix="repair or remove this line") from exc


def decode_text(raw: bytes) -> str:
    """A records file's text as common tools write it: UTF-8 (a leading BOM dropped), else
    Windows-1252 (spreadsheet exports, Windows editors). Raises the UTF-8 UnicodeDecodeError when
    neither reads it. Line endings need nothing: a CR before the LF is JSON white space."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            raise exc from None


def _iter_raw(path: Path):
    """Yield (line number or None, parsed object) from a .json or .jsonl file."""
    try:
        text = decode_text(path.read_bytes())
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise RecordError(f"not UTF-8 or Windows-1252 text (byte {exc.object[exc.start]:#04x} "
                          f"at offset {exc.start})", source=path, line=line,
                          fix="save the records file as UTF-8") from exc
    if path.suffix == ".jsonl":
        # split on newlines only: U+2028 / U+0085 are legal inside JSON strings
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield n, _json(line, path, n)
        return
    data = _json(text, path, None)
    if not isinstance(data, list):
        raise RecordError("a .json records file must hold a list of records", source=path,
                          fix="wrap the records in [...] or use .jsonl, one record per line")
    for item in data:
        yield None, item


def load_records(path: str | Path, data_roots: dict[str, Path] | None = None) -> list[Record]:
    """Read every record of a JSON or JSONL file; duplicate ids are an error."""
    path = Path(path)
    if not path.is_file():
        raise RecordError("records file does not exist", source=path,
                          fix="check dataset.<modality>.records in the config")
    records, seen = [], {}
    with long_lived():  # see umbrella.data.heap: records are long-lived and acyclic
        for line, obj in _iter_raw(path):
            rec = parse_record(obj, source=str(path), line=line, data_roots=data_roots)
            if rec.id in seen:
                raise RecordError(f"duplicate id (first seen at line {seen[rec.id]})",
                                  record_id=rec.id, source=path, line=line,
                                  fix="make record ids unique")
            seen[rec.id] = line
            records.append(rec)
    return records


def record_to_llava(rec: Record, data_roots: dict[str, Path] | None = None) -> dict:
    """Serialise a record back to the LLaVA form (paths relative to the modality root when inside it)."""
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    images = []
    for im in rec.images:
        root = (data_roots or {}).get(im.modality)
        path = im.path
        if root is not None and Path(path).is_relative_to(root):
            path = Path(path).relative_to(root)
        entry = {"modality": im.modality, "path": str(path)}
        entry.update({k: str(v) for k, v in (("bval", im.bval), ("bvec", im.bvec)) if v})
        images.append(entry)
    out = {"id": rec.id, "subject_id": rec.subject_id, "study": rec.study, "task": rec.task,
           "split": rec.split, "images": images,
           "conversations": [{"from": speaker[t.role], "value": t.text} for t in rec.turns]}
    if rec.metadata:
        out["metadata"] = rec.metadata
    return out
