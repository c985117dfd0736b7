"""Small files written whole (reports, a database directory's model.json): never half-written,
never written through a link planted at a temporary name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path`: into a temporary file created exclusively in the same
    directory (a name nobody else holds, so nothing planted there is followed), then renamed over
    `path`. On any failure `path` is unchanged and the temporary file is gone."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
