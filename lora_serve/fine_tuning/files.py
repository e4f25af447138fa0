"""``FileStore``: uploaded training files under one directory, named by ids the server makes.

Each file is ``<root>/<id>.jsonl`` with its metadata in ``<root>/<id>.json``. Ids are ``file-`` + random
hex, generated here; a request's id is checked against that pattern before it touches the disk, so no
path ever comes from a request.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import parse_jsonl

_ID = re.compile(r"^file-[0-9a-f]{24}$")
PURPOSE = "fine-tune"


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's metadata, as OpenAI's file object reports it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    examples: int


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class FileStore:
    """Training files under ``root`` (created if missing); ``max_bytes`` bounds one file."""

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def add(self, filename: str, data: bytes, purpose: str) -> StoredFile:
        """Validate and store an upload; ``ValueError`` (a ``DataError`` for the content) if it is refused."""
        if purpose != PURPOSE:
            raise ValueError(f"purpose is {purpose!r}; this server accepts only {PURPOSE!r} files")
        if len(data) > self.max_bytes:
            raise ValueError(f"the file is {len(data)} bytes, over this server's limit of {self.max_bytes} bytes")
        examples = len(parse_jsonl(data))
        file_id = f"file-{secrets.token_hex(12)}"
        stored = StoredFile(file_id, len(data), int(time.time()), os.path.basename(filename or "upload.jsonl"),
                            purpose, examples)
        write_atomic(self.root / f"{file_id}.jsonl", data)
        write_atomic(self.root / f"{file_id}.json", json.dumps(asdict(stored)).encode())
        return stored

    def get(self, file_id: str) -> StoredFile:
        """A file's metadata; ``KeyError`` for an id that is malformed or not stored."""
        path = self._path(file_id, ".json")
        try:
            return StoredFile(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise KeyError(file_id) from None

    def content(self, file_id: str) -> bytes:
        """A stored file's bytes (``KeyError`` if there is none)."""
        self.get(file_id)
        return self._path(file_id, ".jsonl").read_bytes()

    def list(self) -> list[StoredFile]:
        """Every stored file, newest first."""
        files = [self.get(p.stem) for p in self.root.glob("file-*.json") if _ID.match(p.stem)]
        return sorted(files, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, file_id: str) -> None:
        """Remove a file (``KeyError`` if there is none); jobs that already read it keep their copy."""
        self.get(file_id)
        self._path(file_id, ".jsonl").unlink(missing_ok=True)
        self._path(file_id, ".json").unlink()

    def _path(self, file_id: str, suffix: str) -> Path:
        if not isinstance(file_id, str) or not _ID.match(file_id):
            raise KeyError(file_id)
        return self.root / f"{file_id}{suffix}"
