"""Files written whole or not at all: a crash in the middle of a write leaves the old contents."""

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, flushed to the disk and then renamed over
    ``path``: a reader, or a crash at any moment, finds the old file or the new one, never a part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
