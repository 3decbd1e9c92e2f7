"""The project's exception types.

Every message names what failed (record id, file path, config key) and how to fix it.
Raise these where the fact is known; never ``assert`` on user input.
"""

from __future__ import annotations

from pathlib import Path


class UmbrellaError(Exception):
    """Base class for every error the project raises on purpose."""


class ConfigError(UmbrellaError):
    """A configuration file or override is wrong. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"invalid configuration{f' in {source}' if source else ''}"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}:\n{body}")


class RecordError(UmbrellaError):
    """An instruction record is malformed. Names the record id, the file and (for JSONL) the line."""

    def __init__(self, message: str, *, record_id: str | None = None,
                 source: str | Path | None = None, line: int | None = None, fix: str | None = None):
        self.record_id, self.source, self.line = record_id, source, line
        where = []
        if record_id is not None:
            where.append(f"record {record_id!r}")
        if source is not None:
            where.append(f"in {source}" + (f" line {line}" if line is not None else ""))
        text = (" ".join(where) + ": " if where else "") + message
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)


class VolumeError(UmbrellaError):
    """An image file cannot be read or has content that cannot be used. Names the file."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 record_id: str | None = None, fix: str | None = None):
        self.path, self.record_id = path, record_id
        where = []
        if record_id is not None:
            where.append(f"record {record_id!r}")
        if path is not None:
            where.append(f"file {path}")
        text = (", ".join(where) + ": " if where else "") + message
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)


class ModelError(UmbrellaError):
    """A model cannot be built, loaded or fed (e.g. image tokens vs image features mismatch)."""
