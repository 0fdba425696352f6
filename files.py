"""Reading and writing the project's small files: every file is written atomically (a reader,
or a run killed at any moment, sees the old file or the new one, whole), and a JSON file that
does not parse is one clear error naming it."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_atomic(path, content) -> None:
    """Write `content` (str, bytes, or a function that writes the temporary path it is given)
    to a temporary file in the same folder, fsync it, then os.replace it over `path`: a reader,
    or a run killed at any moment, only ever sees the old file or the new one, whole.
    Every file this project writes goes through here."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave it empty
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    """obj as indented JSON (one trailing newline), written atomically."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
